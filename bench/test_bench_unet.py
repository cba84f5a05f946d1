"""pytest-benchmark suite: each stage of the fused forward, the standalone head, and the whole network, per provider.

Groups: ``stage <config> <index> <label> <dtype>`` (one launch of the fused forward against the same math in eager
PyTorch and torch.compile) and ``network <config> <dtype>``. Every provider's output is checked against eager PyTorch
before it is timed, on random (not zero) data.

Two clocks: pytest-benchmark's own table (wall time of synchronized calls, warm-up rounds excluded), and in
``extra_info`` the median of ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, warm-up excluded):
``median_ms`` with the TFLOP/s and GB/s it gives. The bytes are the fused forward's compulsory traffic, so for the
torch providers GB/s is an effective rate (they move more bytes than that).

Run on a GPU: ``pytest bench/ --benchmark-group-by=group`` (options: ``bench/conftest.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fastunet.parity import NETWORK_BUDGETS, math_mode, network_error
from fastunet.tooling.providers import (
    eager_stage,
    make_input,
    make_model,
    network_callable,
    stage_callable,
    stage_tensors,
)
from fastunet.tooling.shapes import BenchConfig, Stage
from fastunet.tooling.trace import summarize, trace_config

pytest.importorskip("pytest_benchmark", reason="the benchmark suite needs pytest-benchmark")
pytestmark = pytest.mark.gpu
TRACED_ELEMENT_SIZE = 2  # stages are traced in fp16


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_close(outputs, expected, dtype: torch.dtype, what: str) -> None:
    """Outputs within twice the whole-network budget of eager PyTorch (both sides carry their own rounding)."""
    budget = NETWORK_BUDGETS[math_mode(dtype, "cuda")]
    for got, want in zip(outputs, expected, strict=True):
        error = network_error(got, want)
        assert error.rel_l2 <= 2 * budget.rel_l2 and error.max_norm <= 2 * budget.max_norm, (
            f"{what}: differs from eager PyTorch by rel-L2 {error.rel_l2:.2e}, max-norm {error.max_norm:.2e}"
        )


def _time(benchmark, fn: Callable, group: str, flops: int, nbytes: int, options: dict) -> None:
    """Time ``fn`` after a first call that compiles and autotunes: pytest-benchmark rounds (each synchronized),
    then ``do_bench`` for the CUDA-event median in ``extra_info``."""
    import triton.testing

    fn()
    torch.cuda.synchronize()

    def target() -> None:
        fn()
        torch.cuda.synchronize()

    benchmark.group = group
    benchmark.extra_info.update({"flops": flops, "bytes": nbytes, "gflop": flops / 1e9, "mbytes": nbytes / 1e6})
    benchmark.pedantic(target, rounds=options["rounds"], warmup_rounds=options["warmup"], iterations=1)
    median_ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    benchmark.extra_info.update(
        {
            "median_ms": median_ms,
            "timer": "triton.testing.do_bench median (CUDA events, warm-up excluded)",
            "tflops": flops / (median_ms / 1e3) / 1e12,
            "gbps": nbytes / (median_ms / 1e3) / 1e9,
        }
    )


def test_stage(benchmark, stage: Stage, provider: str, dtype: torch.dtype, bench_options: dict) -> None:
    tensors = stage_tensors(stage, dtype, "cuda")
    fn = stage_callable(stage, provider, tensors, bench_options["max_autotune_mode"])
    if provider != "torch-eager":
        _check_close(fn(), eager_stage(stage, tensors)(), dtype, f"{provider} {stage.id}")
    group = f"stage {stage.config} {stage.index:02d} {stage.label} ({stage.kind}) {_dtype_name(dtype)}"
    nbytes = (stage.bytes_read + stage.bytes_written) * dtype.itemsize // TRACED_ELEMENT_SIZE
    _time(benchmark, fn, group, stage.flops, nbytes, bench_options)


def test_network(benchmark, net_config: BenchConfig, provider: str, dtype: torch.dtype, bench_options: dict) -> None:
    model = make_model(net_config, dtype, "cuda")
    x = make_input(net_config, dtype, "cuda")
    fn = network_callable(model, x, provider, bench_options["max_autotune_mode"])
    if provider == "fastunet":
        fn()
        assert fn.module.last_backend == "triton", fn.module.last_backend_reason
    if provider != "torch-eager":
        _check_close((fn(),), (network_callable(model, x, "torch-eager")(),), dtype, f"{provider} {net_config.name}")
    totals = summarize(trace_config(net_config.model_kwargs(), net_config.input_shape(), dtype))
    nbytes = totals["bytes_read"] + totals["bytes_written"]
    group = f"network {net_config.name} {_dtype_name(dtype)}"
    _time(benchmark, fn, group, totals["flops"], nbytes, bench_options)
    benchmark.extra_info["images_per_s"] = net_config.batch / (benchmark.extra_info["median_ms"] / 1e3)
