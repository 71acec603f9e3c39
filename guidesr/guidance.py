"""Guidance Branch (paper §3.1): full-resolution features F_r and the residual image R2.

    F0  = Conv(I)                                   [B, C,  H, W]
    F_d = FRB_n ∘ … ∘ FRB_1(F0)                     [B, 2C, H, W]  (the last FRB widens C -> 2C)
    F_r, R2 = IGN(F_d, I)                           [B, 2C, H, W], [B, 3, H, W]

Every layer is a 3x3 or 1x1 convolution at the input's resolution: there is no downsampling, so
fine structure survives, and any H, W works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.fca_attention import fca_channel_attention_reference, fused_op_applies


class FCABlock(nn.Module):
    """Feature Channel Attention: conv -> GELU -> avg-pool -> conv -> sigmoid -> multiply -> conv, + x.

    The part between the two 3x3 convolutions runs as one fused Triton op on CUDA when
    `use_kernel` is set (kernels/fca_attention.py); elsewhere it is plain PyTorch. The op adds
    conv1's bias itself, so conv1 runs without it there (under torch.compile the bias would
    otherwise be a separate pass: Inductor cannot fuse it into a custom op).
    """

    def __init__(self, channels: int, use_kernel: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.attention = nn.Conv2d(channels, channels, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.use_kernel = use_kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.attention.weight, self.attention.bias
        if self.use_kernel and fused_op_applies(x, weight, bias, self.conv1.weight, self.conv1.bias):
            y = F.conv2d(x, self.conv1.weight, padding=1)  # [B, C, H, W], conv1's bias still to add
            z = torch.ops.guidesr.fca_channel_attention(y, weight, bias, self.conv1.bias)
        else:
            z = fca_channel_attention_reference(self.conv1(x), weight, bias)  # [B, C, H, W]
        return x + self.conv2(z)


class FRB(nn.Module):
    """Full Resolution Block: FCA blocks in a residual-in-residual stack.

    With out_channels != channels the tail convolution widens the features and a 1x1
    projection carries the outer residual.
    """

    def __init__(self, channels: int, out_channels: int, num_fca: int, use_kernel: bool = True):
        super().__init__()
        self.blocks = nn.Sequential(*[FCABlock(channels, use_kernel) for _ in range(num_fca)])
        self.tail = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.tail(self.blocks(x))


class ImageGuidanceNetwork(nn.Module):
    """IGN: image-guided attention with a residual, returning F_r and R2.

    A coarse image estimate Conv(F_d) + I gives the attention maps (sigmoid of a convolution),
    which gate another projection of F_d:  F_r = F_d + Conv(F_d) * sigmoid(Conv(Conv(F_d) + I)).
    The refined residual image is R2 = Conv(F_r) + I, as in the paper.
    """

    def __init__(self, channels: int, image_channels: int = 3):
        super().__init__()
        self.to_coarse_image = nn.Conv2d(channels, image_channels, 3, padding=1)
        self.to_attention = nn.Conv2d(image_channels, channels, 3, padding=1)
        self.value = nn.Conv2d(channels, channels, 3, padding=1)
        self.to_image = nn.Conv2d(channels, image_channels, 3, padding=1)

    def forward(self, features: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        coarse = self.to_coarse_image(features) + image  # [B, 3, H, W]
        attention = torch.sigmoid(self.to_attention(coarse))  # [B, 2C, H, W]
        refined = features + self.value(features) * attention  # F_r
        residual_image = self.to_image(refined) + image  # R2
        return refined, residual_image


class GuidanceBranch(nn.Module):
    def __init__(self, channels: int, num_frb: int, fca_per_frb: int, use_kernel: bool = True):
        super().__init__()
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        widths = [channels] * num_frb + [2 * channels]
        self.frgnet = nn.Sequential(
            *[FRB(widths[i], widths[i + 1], fca_per_frb, use_kernel) for i in range(num_frb)]
        )
        self.ign = ImageGuidanceNetwork(2 * channels)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f0 = self.head(image)  # [B, C, H, W]
        fd = self.frgnet(f0)  # [B, 2C, H, W]
        return self.ign(fd, image)  # F_r [B, 2C, H, W], R2 [B, 3, H, W]

