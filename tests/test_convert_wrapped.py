"""``convert`` on wrapped models: DataParallel, DistributedDataParallel and ``torch.compile`` around a supported
U-Net convert the model inside, say so, and the result computes what the wrapped model computes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from milesial_layout import MilesialUNet
from torch import nn

import fastunet
from fastunet import ConvertedUNet, FastUNet, UNet, UnwrappedModuleWarning
from tolerances import assert_network_close, precision_key


def _shares_tensors(fast: nn.Module, inner: nn.Module) -> bool:
    ours = dict(fast.named_parameters()) | dict(fast.named_buffers())
    theirs = dict(inner.named_parameters()) | dict(inner.named_buffers())
    return ours.keys() == theirs.keys() and all(ours[name] is theirs[name] for name in ours)


@pytest.mark.parametrize("wrap", ["data-parallel", "compiled", "compiled-data-parallel"])
def test_wrapped_models_convert(device, wrap):
    torch.manual_seed(1)
    inner = UNet(3, 2, 4, 2, upsample="bilinear", norm="batch").eval()
    wrapped = {
        "data-parallel": lambda: nn.DataParallel(inner),
        "compiled": lambda: torch.compile(inner),
        "compiled-data-parallel": lambda: torch.compile(nn.DataParallel(inner)),
    }[wrap]()
    with pytest.warns(UnwrappedModuleWarning, match="converted the UNet inside"):
        fast = fastunet.convert(wrapped)
    assert isinstance(fast, FastUNet) and _shares_tensors(fast, inner)
    fast = fast.to(device).eval()
    x = torch.randn(2, 3, 12, 10, device=device)
    with torch.no_grad():
        out = fast(x)
    assert fast.last_backend != "reference"
    assert_network_close(out, inner.double()(x.double().cpu()), precision_key(out.dtype, device))


def test_unwrapped_model_gives_no_warning(recwarn):
    fastunet.convert(UNet(3, 2, 4, 1))
    assert not [w for w in recwarn if issubclass(w.category, UnwrappedModuleWarning)]


def test_distributed_data_parallel_converts(tmp_path):
    """DDP in a one-process gloo group on the CPU: the milesial layout inside converts with its own keys."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        inner = MilesialUNet(3, 2, bilinear=True, width=4, depth=2)
        wrapped = nn.parallel.DistributedDataParallel(inner)
        with pytest.warns(UnwrappedModuleWarning, match="inside DistributedDataParallel"):
            fast = fastunet.convert(wrapped)
    finally:
        dist.destroy_process_group()
    assert isinstance(fast, ConvertedUNet) and _shares_tensors(fast, inner)
    assert fast.state_dict().keys() == inner.state_dict().keys()


def test_wrapper_around_an_unsupported_model_is_still_refused():
    with pytest.raises(fastunet.ConversionError), pytest.warns(UnwrappedModuleWarning):
        fastunet.convert(nn.DataParallel(nn.Sequential(nn.Conv2d(3, 3, 3))))
