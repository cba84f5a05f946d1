"""``convert`` on wrapped models: DataParallel, DistributedDataParallel and ``torch.compile`` around a supported
U-Net convert the model inside, say so, and the result computes what the wrapped model computes."""

from __future__ import annotations

import copy

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
    assert_network_close(out, copy.deepcopy(inner).cpu().double()(x.double().cpu()), precision_key(out.dtype, device))


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


def test_identity_and_dropout_in_a_double_conv_are_no_ops(device):
    """``nn.Identity`` in place of a norm and dropout layers between the convs: eval-mode no-ops, converted as such
    (the float64 verification run checks the source's own forward agrees)."""
    torch.manual_seed(2)
    model = MilesialUNet(3, 2, bilinear=True, width=4, depth=2)
    first, norm, relu, second, norm2, relu2 = model.inc.double_conv
    model.inc.double_conv = nn.Sequential(first, nn.Identity(), relu, nn.Dropout2d(0.5), second, norm2, relu2)
    up_convs = model.up1.conv.double_conv
    model.up1.conv.double_conv = nn.Sequential(*up_convs[:3], nn.Dropout(0.2), *up_convs[3:], nn.Identity())
    model.eval()
    fast = fastunet.convert(model).to(device).eval()
    x = torch.randn(2, 3, 9, 12, device=device)
    with torch.no_grad():
        out = fast(x)
    assert fast.last_backend != "reference"
    assert_network_close(out, copy.deepcopy(model).cpu().double()(x.double().cpu()), precision_key(out.dtype, device))
