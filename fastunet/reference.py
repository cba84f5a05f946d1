"""Pure-PyTorch U-Net: the architecture definition and the parity oracle for :class:`fastunet.FastUNet`.

::

    x ─ enc0 ─────────────────────────────── cat ─ dec0 ─ head ─ logits
          └ pool ─ enc1 ──────────────── cat ─ dec1 ┘up
                     └ pool ─ enc2 ─ cat ─ dec2 ┘up
                               └ pool ─ enc3 (bottleneck at depth 3) ┘up

    enc_i, dec_i: double conv (conv3x3 [+ BatchNorm] + ReLU, twice), base_channels * 2**i channels
    pool:         2x2 max-pool (floor mode)
    up:           ConvTranspose2d(k=2, s=2) halving channels, or 2x bilinear / nearest keeping them
    cat:          cat([skip, up], dim=1), the upsampled map zero-padded (centered) to the skip's size
    head:         1x1 conv to num_classes logits
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

UPSAMPLE_MODES = ("transpose", "bilinear", "nearest")
NORMS = (None, "batch")


def min_input_size(depth: int) -> int:
    """Smallest H (and W) that survives ``depth`` 2x2 poolings with a non-empty map at every level."""
    return 2**depth


def check_input(x: torch.Tensor, in_channels: int, depth: int) -> None:
    """Validate a U-Net input; raise with what was expected and what was given."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D (N, C, H, W) input, got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point input (float32, float16 or bfloat16), got {x.dtype}")
    if x.shape[1] != in_channels:
        raise ValueError(f"expected input with {in_channels} channels, got {x.shape[1]} (input shape {tuple(x.shape)})")
    smallest = min_input_size(depth)
    if x.shape[2] < smallest or x.shape[3] < smallest:
        raise ValueError(
            f"input spatial size {x.shape[2]}x{x.shape[3]} is too small for depth {depth}: "
            f"H and W must be at least {smallest}"
        )


def center_pad(up: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero-pad ``up`` to (height, width), the extra row/column going to the bottom/right."""
    dy, dx = height - up.shape[-2], width - up.shape[-1]
    if dy == 0 and dx == 0:
        return up
    return F.pad(up, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])


class DoubleConv(nn.Module):
    """conv3x3 [+ BatchNorm] + ReLU, twice. The convs carry a bias only when there is no norm."""

    def __init__(self, in_channels: int, out_channels: int, norm: str | None, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        bias = norm is None
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias, **factory)
        self.norm1 = nn.BatchNorm2d(out_channels, **factory) if norm == "batch" else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias, **factory)
        self.norm2 = nn.BatchNorm2d(out_channels, **factory) if norm == "batch" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(x)))


class UpBlock(nn.Module):
    """Upsample the low-resolution map, concatenate it after the skip map, double conv."""

    def __init__(
        self,
        low_channels: int,
        skip_channels: int,
        out_channels: int,
        upsample: str,
        align_corners: bool,
        norm: str | None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.upsample = upsample
        self.align_corners = align_corners
        if upsample == "transpose":
            self.up = nn.ConvTranspose2d(low_channels, low_channels // 2, 2, stride=2, device=device, dtype=dtype)
            up_channels = low_channels // 2
        else:
            self.up = nn.Upsample(
                scale_factor=2, mode=upsample, align_corners=align_corners if upsample == "bilinear" else None
            )
            up_channels = low_channels
        self.conv = DoubleConv(skip_channels + up_channels, out_channels, norm, device=device, dtype=dtype)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = center_pad(self.up(low), skip.shape[-2], skip.shape[-1])
        return self.conv(torch.cat([skip, up], dim=1))


class UNet(nn.Module):
    """Reference U-Net (Ronneberger et al. 2015 layout, "same" padding).

    Args:
        in_channels: input image channels.
        num_classes: output logit channels.
        base_channels: channels of the first level; level ``i`` has ``base_channels * 2**i``.
        depth: number of poolings (the bottleneck is level ``depth``); H and W must be at least ``2**depth``.
        upsample: ``"transpose"`` (ConvTranspose2d k=2 s=2 halving channels), ``"bilinear"`` or ``"nearest"``
            (2x interpolation keeping channels, so the decoder's first conv sees 3x its output width).
        norm: None (convs with bias) or ``"batch"`` (bias-free convs followed by BatchNorm2d).
        align_corners: for ``upsample="bilinear"`` only.
        device, dtype: factory arguments, as for torch's own modules.

    Input (N, in_channels, H, W); output (N, num_classes, H, W) in the input's memory format.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_channels: int = 64,
        depth: int = 4,
        upsample: str = "transpose",
        norm: str | None = None,
        align_corners: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("base_channels", base_channels),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if align_corners and upsample != "bilinear":
            raise ValueError(f"align_corners=True only applies to upsample='bilinear', got upsample={upsample!r}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.base_channels = base_channels
        self.depth = depth
        self.upsample = upsample
        self.norm = norm
        self.align_corners = bool(align_corners)

        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList(
            DoubleConv(in_channels if level == 0 else widths[level - 1], widths[level], norm, device, dtype)
            for level in range(depth + 1)
        )
        self.pool = nn.MaxPool2d(2)
        self.decoders = nn.ModuleList(
            UpBlock(widths[level + 1], widths[level], widths[level], upsample, align_corners, norm, device, dtype)
            for level in range(depth)
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1, device=device, dtype=dtype)

    @property
    def config(self) -> dict:
        """Constructor arguments (without device/dtype) that rebuild this architecture."""
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "base_channels": self.base_channels,
            "depth": self.depth,
            "upsample": self.upsample,
            "norm": self.norm,
            "align_corners": self.align_corners,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, self.depth)
        skips = []
        features = x
        for level, encoder in enumerate(self.encoders):
            features = encoder(features)
            if level < self.depth:
                skips.append(features)
                features = self.pool(features)
        for level in reversed(range(self.depth)):
            features = self.decoders[level](features, skips[level])
        return self.head(features)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())
