"""Injection of the guidance features F_r into the UNet encoder (paper eq. 3 and Fig. 2).

At every UNet encoder scale (the input of each down block, resolution H/s x W/s):

    F_r  [B, 2C, H, W] --narrow (1x1, only where needed)--> [B, c_s, H, W]
         --PixelUnshuffle(s)--> F'_r [B, c_s*s^2, H/s, W/s]
    h    <- h + ZeroConv1x1(cat(h, F'_r))

Raw PixelUnshuffle of 2C channels by s = 64 gives 2C*4096 channels; a 1x1 projection from that
into SD-Turbo's 1280-channel encoder alone would hold 335M weights (39% of the UNet). Narrowing F_r
to c_s = injection_channels / s^2 channels first keeps every F'_r at `injection_channels` wide,
which for the sd-turbo preset (4096) adds about 2% to the UNet's parameters. At the first scale
(s = 8, 2C = 64) no narrowing is needed and F'_r is exactly the paper's PixelUnshuffle(F_r, 8).

The projection starts at zero, so an untrained GuideSR's UNet equals the base UNet exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.pixel_unshuffle_concat import pixel_unshuffle_concat


class GuidanceInjection(nn.Module):
    def __init__(self, guidance_channels: int, unet_channels: int, scale: int, injection_channels: int,
                 use_kernel: bool = True):
        super().__init__()
        narrowed = max(1, min(guidance_channels, injection_channels // scale**2))
        self.scale = scale
        self.narrow = (
            nn.Identity() if narrowed == guidance_channels else nn.Conv2d(guidance_channels, narrowed, 1)
        )
        self.project = nn.Conv2d(unet_channels + narrowed * scale**2, unet_channels, 1)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)
        self.use_kernel = use_kernel

    def forward(self, hidden: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        narrowed = self.narrow(guidance)  # [B, c_s, H, W]
        joined = pixel_unshuffle_concat(hidden, narrowed, self.scale, use_kernel=self.use_kernel)
        return hidden + self.project(joined)  # [B, unet_channels, H/s, W/s]


def build_injections(guidance_channels: int, unet_block_channels: list[int], scales: list[int],
                     injection_channels: int, use_kernel: bool = True) -> nn.ModuleList:
    """One injection per UNet down block; the input of down block i has block i-1's width."""
    widths = [unet_block_channels[0]] + list(unet_block_channels[:-1])
    return nn.ModuleList(
        GuidanceInjection(guidance_channels, width, s, injection_channels, use_kernel)
        for width, s in zip(widths, scales)
    )
