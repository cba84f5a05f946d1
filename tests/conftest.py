"""Test harness: Triton's interpreter on CPU-only machines, seeds, global switches restored, NaN-poisoned outputs."""

from __future__ import annotations

import os

import torch

# Decided before triton (and so fastunet.kernels) is imported: the @triton.jit decorator reads it then.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastunet.kernels import INTERPRET, poison_outputs  # noqa: E402

DEVICE = torch.device("cpu") if INTERPRET else torch.device("cuda")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    """Every buffer a launcher allocates starts as NaN: an element a kernel forgets to write cannot pass."""
    with poison_outputs():
        yield


@pytest.fixture(autouse=True)
def _ieee_fp32_by_default():
    """fp32 runs as IEEE fp32 in every test (TF32 off, as PyTorch's own suite does), so fp32 checks hold the kernels
    and the references to the strict budget on a GPU too; the TF32 tests turn it on with the ``tf32`` fixture. The
    switches are restored after each test."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def ieee_fp32():
    """fp32 without TF32 (the default of every test; kept for the tests that say so explicitly)."""
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def tf32():
    """fp32 convolutions on TF32 tensor cores, PyTorch's default for cuDNN convs (restored after the test)."""
    torch.backends.cudnn.allow_tf32 = True
