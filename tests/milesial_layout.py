"""A U-Net in the inc / down<i> / up<i> / outc layout of milesial/Pytorch-UNet (the most used public PyTorch
U-Net), written from its documented structure for the conversion tests: attribute names and ``state_dict`` keys
as there, bias-free convs with BatchNorm, bilinear (align_corners=True, with a middle width in the decoder's
double conv) or transposed-conv upsampling, centered zero padding of the upsampled map, ``cat([skip, up])``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DoubleConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None) -> None:
        super().__init__()
        mid = mid_channels or out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, bilinear: bool, skip_channels: int | None = None):
        super().__init__()
        # As in the original, the skip has in_channels // 2 channels unless told otherwise (non-doubling widths).
        skip = in_channels // 2 if skip_channels is None else skip_channels
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(skip + in_channels // 2, out_channels, in_channels // 2)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(skip + in_channels // 2, out_channels)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(low)
        dy, dx = skip.shape[2] - up.shape[2], skip.shape[3] - up.shape[3]
        up = F.pad(up, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, up], dim=1))


class OutConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class MilesialUNet(nn.Module):
    """Four levels like the original (``width`` 64 there); ``depth`` generalizes the number of levels, ``widths``
    (one per level, ``depth + 1``) replaces the doubling."""

    def __init__(
        self,
        n_channels: int,
        n_classes: int,
        bilinear: bool = False,
        width: int = 64,
        depth: int = 4,
        widths: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.n_channels, self.n_classes, self.bilinear = n_channels, n_classes, bilinear
        factor = 2 if bilinear else 1
        custom = widths is not None
        if custom:
            depth = len(widths) - 1
        else:
            widths = [width * 2**level for level in range(depth + 1)]
        self.inc = DoubleConv(n_channels, widths[0])
        for i in range(1, depth + 1):
            out = widths[i] // factor if i == depth else widths[i]
            setattr(self, f"down{i}", Down(widths[i - 1], out))
        for j in range(1, depth + 1):
            level = depth - j
            out = widths[level] // factor if level > 0 else widths[0]
            skip = widths[level] if custom else None
            setattr(self, f"up{j}", Up(widths[level + 1], out, bilinear, skip))
        self.outc = OutConv(widths[0], n_classes)
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for i in range(1, self.depth + 1):
            skips.append(getattr(self, f"down{i}")(skips[-1]))
        features = skips.pop()
        for j in range(1, self.depth + 1):
            features = getattr(self, f"up{j}")(features, skips.pop())
        return self.outc(features)
