"""``convert``'s verification run: a probe size the source accepts, and failures reported as coming from it."""

from __future__ import annotations

import pytest
import torch
from milesial_layout import MilesialUNet
from test_convert import float64_output

import fastunet
from fastunet import ConversionError, ConvertedUNet
from tolerances import assert_network_close, precision_key


class _SixteenOnlyUNet(MilesialUNet):
    """A source whose forward accepts only H and W divisible by 16, as some public U-Nets check."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % 16 or x.shape[-1] % 16:
            raise ValueError(f"input size must be divisible by 16, got {tuple(x.shape[-2:])}")
        return MilesialUNet.forward(self, x)  # by name: the converted module is no instance of this class


class _RefusingUNet(MilesialUNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this forward refuses every input")


@pytest.mark.parametrize("depth", [2, 3])
def test_a_source_that_accepts_only_some_sizes_converts(device, depth):
    torch.manual_seed(0)
    model = _SixteenOnlyUNet(3, 2, True, width=4, depth=depth).eval()
    fast = fastunet.convert(model)
    assert isinstance(fast, ConvertedUNet)
    fast = fast.to(device)
    x = torch.randn(1, 3, 16, 32, device=device)
    with torch.no_grad():
        out = fast(x)
    assert fast.last_backend != "reference"
    assert_network_close(out, float64_output(model, x), precision_key(torch.float32, device))


def test_a_source_that_rejects_every_probe_is_a_conversion_error():
    torch.manual_seed(0)
    for verify in (True, False):  # the forward is what convert reads: it must run, checked or not
        with pytest.raises(ConversionError, match=r"_RefusingUNet: convert runs .*raised on every probe input") as info:
            fastunet.convert(_RefusingUNet(3, 2, True, width=4, depth=2).eval(), verify=verify)
        assert "this forward refuses every input" in str(info.value)
        assert isinstance(info.value.__cause__, RuntimeError)
