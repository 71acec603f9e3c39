"""Image-quality metrics shared by evaluation, runtime validation and the reports.

Images are float tensors [B, 3, H, W] (or [3, H, W]) in [0, 1]. PSNR and SSIM follow the
super-resolution convention: optional border crop of `crop` pixels, and an optional Y channel
(ITU-R BT.601, as MATLAB's rgb2ycbcr) in place of RGB. SSIM is Wang et al. (2004) with an 11x11
Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03 (the same as scikit-image's
`structural_similarity(gaussian_weights=True, use_sample_covariance=False)`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _batched(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 3 else x


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> luma [B, 1, H, W] in [16/255, 235/255] (BT.601, studio range)."""
    weights = x.new_tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1) / 255.0
    return (x * weights).sum(dim=1, keepdim=True) + 16.0 / 255.0


def _prepare(x: torch.Tensor, crop: int, y_channel: bool) -> torch.Tensor:
    x = _batched(x).double()
    if crop:
        x = x[..., crop:-crop, crop:-crop]
    return rgb_to_y(x) if y_channel else x


def psnr(x: torch.Tensor, y: torch.Tensor, crop: int = 0, y_channel: bool = False) -> float:
    """Mean over the batch of per-image PSNR in dB; inf for identical images."""
    a, b = _prepare(x, crop, y_channel), _prepare(y, crop, y_channel)
    mse = (a - b).square().flatten(1).mean(1)
    values = [math.inf if m == 0 else 10 * math.log10(1.0 / m) for m in mse.tolist()]
    return sum(values) / len(values)


def ssim(x: torch.Tensor, y: torch.Tensor, crop: int = 0, y_channel: bool = False) -> float:
    a, b = _prepare(x, crop, y_channel), _prepare(y, crop, y_channel)
    channels = a.shape[1]
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-coords.square() / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(channels, 1, 11, 11).to(a.device)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.square()
    var_b = blur(b * b) - mu_b.square()
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1).mean().item()


def max_abs(x: torch.Tensor, y: torch.Tensor) -> float:
    return (x.double() - y.double()).abs().max().item()
