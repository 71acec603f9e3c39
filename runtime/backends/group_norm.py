"""GroupNorm from per-channel statistics: the compiled backend's form of every `nn.GroupNorm`.

    y = (x - mean_g) / sqrt(var_g + eps) * weight + bias

computed as
1. one reduction over the spatial dims per (sample, channel): `torch.var_mean` in fp32 for half
   inputs (Welford in Inductor), giving mean_c and var_c, [B, C];
2. per group (C/G channels of equal size), the parallel-variance combination
   mean_g = mean(mean_c), var_g = mean(var_c + (mean_c - mean_g)^2), exact, on [B, G, C/G];
3. one pointwise pass x * scale_c + shift_c, in that precision and rounded to x's dtype, which Inductor
   fuses with what follows (the SiLU of diffusers' ResNet blocks).

Why: on an H200 (2026-11-26, sd-turbo at 512x512, fp16, channels_last; docs/benchmarks.md)
Inductor's GroupNorm kernels for `nn.GroupNorm` took at least 3.5 of the compiled forward's 16.7
GPU-ms, one of them 0.54 ms for a tensor of at most 64 MB (0.03 ms per pass at copy bandwidth).
The likely cause, not verified (the generated code was not inspected): in channels_last a group
is a C/G-wide strip spread over the whole tensor, and a reduction per (sample, group) has only
B*G = 32 rows of up to a million elements to spread over 132 SMs. Per-channel statistics are a
reduction over the outer (spatial) dims with the channels contiguous, which Inductor can split
across the GPU; the group combination is [B, C] work. Traffic: one read of x for the statistics
plus one read and one write for the affine pass, as for a fused GroupNorm.
Predicted: the GroupNorm share drops from >= 3.5 ms to about 1 ms (about 2.3 GB of GroupNorm
traffic in the VAE at 512x512, at ~3.5 TB/s), the compiled 512x512 forward from 18.1 ms to about
15.5-16 ms. Measured on the H200 (2026-11-26, commit 67fdbe6, docs/benchmarks.md "Third GPU
session"): GroupNorm + SiLU compiled, CUDA-graph ms, nn.GroupNorm -> this form: 0.138 -> 0.086 at
128x512², 0.066 -> 0.054 at 256x256², 0.044 -> 0.022 at 512x128² (2.2-2.3 TB/s at 3·N·e); with the
wide-head attention change, the compiled 512x512 forward went from 18.08 to 15.39 ms.

Mathematically this is GroupNorm (tests/test_backends.py checks float64 against F.group_norm to
1e-12); in fp16 it differs only by rounding, with statistics in fp32 as PyTorch's CUDA kernel.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelStatsGroupNorm(nn.Module):
    """`nn.GroupNorm` (same parameters, same result) computed from per-channel var_mean."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.num_groups = norm.num_groups
        self.num_channels = norm.num_channels
        self.eps = norm.eps
        self.weight = norm.weight  # None when affine=False
        self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        groups = self.num_groups
        spatial = tuple(range(2, x.dim()))
        broadcast = (batch, channels) + (1,) * len(spatial)
        compute = torch.promote_types(x.dtype, torch.float32)  # fp32 for half inputs, fp64 stays fp64
        # 1. per-channel statistics                                       [B, C]
        var_c, mean_c = torch.var_mean(x.to(compute), dim=spatial, correction=0)
        # 2. combined per group                                           [B, G, C/G] -> [B, G, 1]
        mean_c = mean_c.view(batch, groups, channels // groups)
        var_c = var_c.view(batch, groups, channels // groups)
        mean_g = mean_c.mean(dim=-1, keepdim=True)
        var_g = (var_c + (mean_c - mean_g).square()).mean(dim=-1, keepdim=True)
        scale = torch.rsqrt(var_g + self.eps).expand(-1, -1, channels // groups).reshape(batch, channels)
        shift = -mean_g.expand(-1, -1, channels // groups).reshape(batch, channels) * scale
        if self.weight is not None:
            scale = scale * self.weight.to(compute)
            shift = shift * self.weight.to(compute) + self.bias.to(compute)
        # 3. one affine pass over x                                       [B, C, *spatial]
        return (x.to(compute) * scale.view(broadcast) + shift.view(broadcast)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.weight is not None}"


def use_channel_stats_group_norm(model: nn.Module) -> int:
    """Swap every `nn.GroupNorm` in `model` for `ChannelStatsGroupNorm` in place; returns how many."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.GroupNorm]
    for parent, name, child in swaps:
        setattr(parent, name, ChannelStatsGroupNorm(child))
    return len(swaps)
