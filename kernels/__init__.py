"""Triton kernels of fastunet, installed as ``fastunet.kernels``.

Each family lives in its own module: ``@triton.jit`` kernels plus typed launchers (tensor in, tensor out).
"""

from fastunet.kernels._common import INTERPRET, launch_log, poison_outputs
from fastunet.kernels.conv import conv2d_nhwc, conv_transpose2x2_nhwc

__all__ = ["INTERPRET", "conv2d_nhwc", "conv_transpose2x2_nhwc", "launch_log", "poison_outputs"]
