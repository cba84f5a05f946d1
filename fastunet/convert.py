"""``convert``: turn a supported U-Net module into a :class:`fastunet.FastUNet` over the same tensors."""

from __future__ import annotations

from torch import nn

from fastunet.model import FastUNet
from fastunet.reference import UNet


def convert(module: nn.Module) -> FastUNet:
    """A FastUNet computing what ``module`` computes, sharing its parameter and buffer tensors.

    Supported layouts: :class:`fastunet.UNet` (a FastUNet is returned as it is). Any other module raises a
    ``TypeError`` naming what it is; no approximate conversion is attempted.
    """
    if isinstance(module, FastUNet):
        return module
    if isinstance(module, UNet):
        return FastUNet.from_reference(module)
    raise TypeError(
        f"convert() supports fastunet.UNet layouts; got {type(module).__module__}.{type(module).__qualname__}"
    )
