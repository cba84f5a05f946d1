"""fastunet: a U-Net forward for PyTorch on fused Triton kernels, tested for parity with a reference U-Net."""

from fastunet.convert import ConversionError, ConvertedUNet, UnwrappedModuleWarning, convert
from fastunet.model import FastUNet, FastUNetFallbackWarning
from fastunet.reference import UNet
from fastunet.tooling.trace import summarize, trace

__all__ = [
    "ConversionError",
    "ConvertedUNet",
    "FastUNet",
    "FastUNetFallbackWarning",
    "UNet",
    "UnwrappedModuleWarning",
    "convert",
    "summarize",
    "trace",
]
__version__ = "0.1.0"
