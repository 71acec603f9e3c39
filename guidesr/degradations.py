"""Real-ESRGAN's second-order degradation pipeline, batched in PyTorch.

GuideSR trains on HR crops whose LR inputs are synthesised with the Real-ESRGAN pipeline
(paper §4, following ResShift). This module re-implements that pipeline so that it runs on
whole batches on the training device (CPU or CUDA), and is reproducible: every random draw
comes from one explicit CPU `torch.Generator`, so the same seed gives bit-identical LR images
on the same device. The random parameters (kernels, noise strengths, JPEG qualities, resize
choices ...) are drawn on the CPU and copied to the device without waiting for it, so that
degrading a CUDA batch never synchronises the host with the GPU. Noise fields are drawn where
the images are, from a generator on that device seeded with the generator's first draw, so the
parameters never depend on the pixels: `torch.poisson` takes a number of draws that depends on
its input, and drawing it from the parameters' generator let a one-level difference in a pixel
(another CPU's vectorised kernels) re-draw every later parameter of that image. So the same seed
gives the same parameters on every device and machine.

Stages (Wang et al., "Real-ESRGAN", 2021; defaults of `train_realesrnet_x4plus.yml`):

1. blur (isotropic / anisotropic Gaussian, generalized Gaussian, plateau, or 2-D sinc)
   -> random resize (up / down / keep; area, bilinear or bicubic) -> Gaussian or Poisson
   noise (colour or grey) -> JPEG;
2. blur (only with `second_blur_prob`) -> random resize -> noise, with the second-stage
   parameters; the second JPEG belongs to the final stage:
3. final: resize to HR/scale + sinc filter (identity with 1 - `final_sinc_prob`) and JPEG
   (`jpeg_range2`), in random order, then rounding to 8 bits.

Choices that change the tensor size (resize kind, scale and interpolation mode, and the
order of the final stage, which contains a resize) are drawn once per batch, as in
Real-ESRGAN, because a batch must keep one size. Everything else (kernel, noise kind and
strength, grey vs colour noise, JPEG quality, whether the second blur happens) is drawn per
image; Real-ESRGAN draws some of those per batch only for convenience, and per-image draws
give each batch more variety with the same marginal distribution.

JPEG is real baseline JPEG (8x8 DCT, YCbCr, 4:2:0 chroma subsampling, the libjpeg
quantisation tables scaled by quality exactly as `jpeg_set_quality` does, rounding to 8 bits
after decoding), written in torch so that it runs batched on the GPU. It is not
differentiable and does not need to be: degradations only make training inputs.
Real-ESRGAN's unsharp-masking of the ground truth is not applied (ResShift, which GuideSR
follows, trains against the plain HR image as well).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Kernel type -> (shape family, isotropic). Gaussian: exp(-Q/2); generalized Gaussian:
# exp(-Q^beta/2); plateau: 1/(1 + Q^beta); Q is the Mahalanobis form of the covariance.
KERNEL_FAMILIES: dict[str, tuple[str, bool]] = {
    "iso": ("gaussian", True),
    "aniso": ("gaussian", False),
    "generalized_iso": ("generalized", True),
    "generalized_aniso": ("generalized", False),
    "plateau_iso": ("plateau", True),
    "plateau_aniso": ("plateau", False),
}
KERNEL_TYPES: tuple[str, ...] = tuple(KERNEL_FAMILIES)
RESIZE_MODES: tuple[str, ...] = ("area", "bilinear", "bicubic")
# Every blur kernel is zero-padded to this size, so one batch can mix kernel sizes.
MAX_KERNEL_SIZE = 21


@dataclass(frozen=True)
class DegradationConfig:
    """Every parameter of the pipeline; defaults are Real-ESRGAN x4plus's.

    Ranges are (low, high) pairs sampled uniformly. The second-stage fields end in `2`.
    `resize_prob` weights (up, down, keep).
    """

    scale: int = 4
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    kernel_types: tuple[str, ...] = KERNEL_TYPES
    # First stage.
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    # Second stage, applied to a whole batch with probability second_order_prob: always in Real-ESRGAN
    # x4plus, 0.5 in ResShift's configs (the paper's training setup, §4).
    second_order_prob: float = 1.0
    second_blur_prob: float = 0.8
    kernel_prob2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)
    # Final stage.
    final_sinc_prob: float = 0.8

    def __post_init__(self) -> None:
        if any(k % 2 == 0 or not 3 <= k <= MAX_KERNEL_SIZE for k in self.kernel_sizes):
            raise ValueError(f"kernel_sizes must be odd and in [3, {MAX_KERNEL_SIZE}], got {self.kernel_sizes}")
        unknown = set(self.kernel_types) - set(KERNEL_FAMILIES)
        if unknown:
            raise ValueError(f"unknown kernel types {sorted(unknown)}; known: {KERNEL_TYPES}")
        for name in ("kernel_prob", "kernel_prob2"):
            if len(getattr(self, name)) != len(self.kernel_types):
                raise ValueError(f"{name} needs one probability per kernel type {self.kernel_types}")
        if not 0.0 <= self.second_order_prob <= 1.0:
            raise ValueError(f"second_order_prob must be in [0, 1], got {self.second_order_prob}")


# --------------------------------------------------------------------------------------
# Random numbers. Parameters are drawn on the CPU from `generator`; noise fields on the
# images' device from `noise_generator`, seeded with a draw of `generator`.
# --------------------------------------------------------------------------------------


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def _bernoulli(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


def _categorical(n: int, probs: tuple[float, ...], generator: torch.Generator) -> torch.Tensor:
    weights = torch.tensor(probs, dtype=torch.float64)
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; from the CPU to another device without waiting for that device (a
    blocking host-to-device copy synchronises the stream), through pinned memory so that the
    copy is truly asynchronous."""
    if tensor.device.type != "cpu" or device.type == "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _check_generator(generator: torch.Generator) -> None:
    if generator.device.type != "cpu":
        raise ValueError(
            f"the generator is on {generator.device}; degradations draw their parameters on the CPU, so that "
            "reading them never waits for the device: pass torch.Generator() (CPU) whatever the images' device"
        )


def _noise_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """The generator of the noise fields of images on `device`, seeded with `generator`'s next
    draw (on the CPU too: the noise fields' draws never shift the parameters')."""
    seed = int(torch.randint(2**63 - 1, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


# --------------------------------------------------------------------------------------
# Blur kernels
# --------------------------------------------------------------------------------------


def _kernel_grid(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """x (columns) and y (rows) coordinates of a MAX_KERNEL_SIZE grid centred on 0."""
    half = MAX_KERNEL_SIZE // 2
    axis = torch.arange(-half, half + 1, dtype=torch.float64, device=device)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return x, y


def _size_mask(sizes: torch.Tensor) -> torch.Tensor:
    """(B, 21, 21) mask of the centred `sizes[b]` x `sizes[b]` window: zero-padding to 21."""
    x, y = _kernel_grid(sizes.device)
    half = (sizes // 2).to(torch.float64).view(-1, 1, 1)
    return (x.abs() <= half) & (y.abs() <= half)


def sinc_kernels(cutoff: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Circular low-pass (2-D sinc) kernels, (B, 21, 21), each normalised to sum 1.

    `cutoff` is the angular cut-off frequency omega_c in (0, pi]; the kernel is the ideal
    low-pass filter's impulse response omega_c J1(omega_c r) / (2 pi r), truncated to
    `sizes[b]` taps. Its ringing imitates the over-/undershoot of sharpened, resampled
    images.
    """
    x, y = _kernel_grid(cutoff.device)
    r = torch.sqrt(x**2 + y**2)
    w = cutoff.to(torch.float64).view(-1, 1, 1)
    safe_r = torch.where(r == 0, torch.ones_like(r), r)
    kernel = w * torch.special.bessel_j1(w * safe_r) / (2 * math.pi * safe_r)
    kernel = torch.where(r == 0, w**2 / (4 * math.pi), kernel)
    kernel = kernel * _size_mask(sizes)
    return kernel / kernel.sum(dim=(1, 2), keepdim=True)


def _sample_beta(n: int, beta_range: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """Shape parameter as Real-ESRGAN draws it: half the time below 1, half above."""
    low, high = beta_range
    below = _uniform(n, low, min(1.0, high), generator)
    above = _uniform(n, max(1.0, low), high, generator)
    return torch.where(_bernoulli(n, 0.5, generator), below, above)


def random_blur_kernels(
    batch: int,
    kernel_sizes: tuple[int, ...],
    kernel_types: tuple[str, ...],
    kernel_prob: tuple[float, ...],
    sinc_prob: float,
    blur_sigma: tuple[float, float],
    betag_range: tuple[float, float],
    betap_range: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """One random blur kernel per image, (B, 21, 21) float64 on the CPU, each summing to 1.

    With probability `sinc_prob` a sinc kernel (cut-off in [pi/3, pi] for sizes below 13,
    [pi/5, pi] otherwise, as Real-ESRGAN), else a kernel of a type drawn from
    `kernel_types` with `kernel_prob`: the Gaussian family exp(-0.5 Q^beta) (beta = 1 for
    plain Gaussians), or the plateau 1 / (1 + Q^beta), where Q is the Mahalanobis form of a
    covariance with standard deviations in `blur_sigma` (equal and unrotated for `*_iso`).
    All parameters are drawn for every image whatever its type, so the number of draws,
    and with it the generator's state, does not depend on the outcome.
    """
    sizes_table = torch.tensor(kernel_sizes)
    sizes = sizes_table[torch.randint(len(kernel_sizes), (batch,), generator=generator)]
    kinds = _categorical(batch, kernel_prob, generator)
    sigma_x = _uniform(batch, *blur_sigma, generator).double()
    sigma_y = _uniform(batch, *blur_sigma, generator).double()
    theta = _uniform(batch, -math.pi, math.pi, generator).double()
    beta_g = _sample_beta(batch, betag_range, generator).double()
    beta_p = _sample_beta(batch, betap_range, generator).double()
    use_sinc = _bernoulli(batch, sinc_prob, generator)
    sinc_low = torch.where(sizes < 13, math.pi / 3, math.pi / 5)
    cutoff = sinc_low + torch.rand(batch, generator=generator) * (math.pi - sinc_low)

    def per_image(flags: list[bool]) -> torch.Tensor:
        return torch.tensor(flags)[kinds]

    families = [KERNEL_FAMILIES[t] for t in kernel_types]
    isotropic = per_image([iso for _, iso in families])
    is_generalized = per_image([family == "generalized" for family, _ in families])
    is_plateau = per_image([family == "plateau" for family, _ in families])
    sigma_y = torch.where(isotropic, sigma_x, sigma_y)
    theta = torch.where(isotropic, torch.zeros_like(theta), theta)
    beta = torch.where(is_generalized, beta_g, torch.where(is_plateau, beta_p, torch.ones_like(beta_g))).view(-1, 1, 1)

    x, y = _kernel_grid(sizes.device)
    cos, sin = theta.cos().view(-1, 1, 1), theta.sin().view(-1, 1, 1)
    u = cos * x + sin * y
    v = -sin * x + cos * y
    quad = (u / sigma_x.view(-1, 1, 1)) ** 2 + (v / sigma_y.view(-1, 1, 1)) ** 2
    powered = quad**beta
    kernel = torch.where(is_plateau.view(-1, 1, 1), 1.0 / (powered + 1.0), torch.exp(-0.5 * powered))
    kernel = kernel * _size_mask(sizes)
    kernel = kernel / kernel.sum(dim=(1, 2), keepdim=True)
    return torch.where(use_sinc.view(-1, 1, 1), sinc_kernels(cutoff, sizes), kernel)


def pulse_kernels(batch: int, device: torch.device) -> torch.Tensor:
    """Identity kernels (a centred 1), (B, 21, 21): 'no filtering' in a batched filter."""
    kernel = torch.zeros(batch, MAX_KERNEL_SIZE, MAX_KERNEL_SIZE, dtype=torch.float64, device=device)
    kernel[:, MAX_KERNEL_SIZE // 2, MAX_KERNEL_SIZE // 2] = 1.0
    return kernel


def filter2d(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Filter every image (B, C, H, W) with its own kernel (B, k, k), size-preserving.

    Borders are reflected, as in Real-ESRGAN; images too small to reflect half a kernel
    (possible after strong downscaling of small crops) are replicated instead.
    """
    b, c, h, w = images.shape
    pad = kernels.shape[-1] // 2
    mode = "reflect" if pad < min(h, w) else "replicate"
    padded = F.pad(images, (pad, pad, pad, pad), mode=mode)
    weight = kernels.to(images.dtype).repeat_interleave(c, dim=0).unsqueeze(1)
    out = F.conv2d(padded.reshape(1, b * c, h + 2 * pad, w + 2 * pad), weight, groups=b * c)
    return out.view(b, c, h, w)


# --------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------


def rgb_to_gray(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, (B, 1, H, W)."""
    weights = _to_device(torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype), images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def gaussian_noise(images: torch.Tensor, sigma: torch.Tensor, gray: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """Additive white Gaussian noise with std `sigma[b]` / 255, grey (one field for all
    channels) where `gray[b]`, else independent per channel."""
    b, c, h, w = images.shape
    colour = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    grey = torch.randn((b, 1, h, w), generator=generator, device=images.device, dtype=images.dtype)
    noise = torch.where(gray.view(b, 1, 1, 1), grey.expand(b, c, h, w), colour)
    return noise * (sigma.to(images.dtype).view(b, 1, 1, 1) / 255.0)


def _shot_noise(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Poisson noise of 8-bit-quantised `images`, with the photon count set, per image, to
    the power of two at or above its number of distinct 8-bit values (Real-ESRGAN)."""
    b = images.shape[0]
    levels = torch.clamp((images * 255.0).round(), 0, 255)
    quantised = levels / 255.0
    histogram = torch.zeros(b, 256, device=images.device)
    histogram.scatter_add_(1, levels.reshape(b, -1).long(),
                           torch.ones_like(levels.reshape(b, -1), dtype=histogram.dtype))
    distinct = (histogram > 0).sum(dim=1).to(images.dtype)
    counts = (2.0 ** torch.ceil(torch.log2(distinct))).view(b, 1, 1, 1)
    return torch.poisson(quantised * counts, generator=generator) / counts - quantised


def poisson_noise(images: torch.Tensor, scale: torch.Tensor, gray: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """Signal-dependent (shot) noise times `scale[b]`, of the luma where `gray[b]`, else of
    each colour channel."""
    b, c, h, w = images.shape
    colour = _shot_noise(images, generator)
    grey = _shot_noise(rgb_to_gray(images), generator).expand(b, c, h, w)
    noise = torch.where(gray.view(b, 1, 1, 1), grey, colour)
    return noise * scale.to(images.dtype).view(b, 1, 1, 1)


def random_noise(
    images: torch.Tensor,
    gaussian_prob: float,
    noise_range: tuple[float, float],
    poisson_scale_range: tuple[float, float],
    gray_prob: float,
    generator: torch.Generator,
    noise_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per image: Gaussian noise with `gaussian_prob`, else Poisson noise; grey with
    `gray_prob`. Result clipped to [0, 1]. The choices and strengths come from the CPU
    `generator`, the noise fields from `noise_generator` (on the images' device; default: one
    seeded with `generator`'s next draw)."""
    b = images.shape[0]
    fields = _noise_generator(generator, images.device) if noise_generator is None else noise_generator
    use_gaussian = _to_device(_bernoulli(b, gaussian_prob, generator), images.device)
    gray = _to_device(_bernoulli(b, gray_prob, generator), images.device)
    sigma = _to_device(_uniform(b, *noise_range, generator), images.device)
    scale = _to_device(_uniform(b, *poisson_scale_range, generator), images.device)
    noise = torch.where(
        use_gaussian.view(b, 1, 1, 1),
        gaussian_noise(images, sigma, gray, fields),
        poisson_noise(images, scale, gray, fields),
    )
    return torch.clamp(images + noise, 0.0, 1.0)


# --------------------------------------------------------------------------------------
# JPEG
# --------------------------------------------------------------------------------------

# ITU-T T.81 Annex K tables, natural order (row = vertical frequency), quality 50.
_LUMA_QTABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_CHROMA_QTABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
) + ((99,) * 8,) * 4


def jpeg_quant_tables(quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Luma and chroma quantisation tables (B, 8, 8) for integer qualities 1..100, exactly
    as libjpeg's `jpeg_set_quality(..., force_baseline=TRUE)` scales the Annex K tables."""
    q = quality.to(torch.int64).clamp(1, 100)
    percent = torch.where(q < 50, 5000 // q, 200 - 2 * q).view(-1, 1, 1)
    tables = []
    for base in (_LUMA_QTABLE, _CHROMA_QTABLE):
        base_t = _to_device(torch.tensor(base, dtype=torch.int64), quality.device)
        tables.append(torch.clamp((base_t * percent + 50) // 100, 1, 255).to(torch.float32))
    return tables[0], tables[1]


def _dct_matrix(device: torch.device) -> torch.Tensor:
    """Orthonormal 8-point DCT-II matrix; C X C^T is JPEG's forward DCT of an 8x8 block."""
    n = torch.arange(8, dtype=torch.float64, device=device)
    matrix = torch.cos((2 * n.view(1, 8) + 1) * n.view(8, 1) * math.pi / 16) * math.sqrt(2 / 8)
    matrix[0] = math.sqrt(1 / 8)
    return matrix.to(torch.float32)


def _to_blocks(plane: torch.Tensor) -> torch.Tensor:
    b, h, w = plane.shape
    return plane.view(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)


def _from_blocks(blocks: torch.Tensor) -> torch.Tensor:
    b, bh, bw = blocks.shape[:3]
    return blocks.permute(0, 1, 3, 2, 4).reshape(b, bh * 8, bw * 8)


def _quantise_plane(plane: torch.Tensor, table: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    """Encode and decode one level-shifted plane (B, H, W): DCT per 8x8 block, quantise
    with rounding half away from zero (libjpeg), dequantise, inverse DCT."""
    blocks = _to_blocks(plane - 128.0)
    coefficients = dct @ blocks @ dct.T
    step = table.view(-1, 1, 1, 8, 8)
    quantised = torch.sign(coefficients) * torch.floor(coefficients.abs() / step + 0.5)
    decoded = dct.T @ (quantised * step) @ dct
    return torch.clamp(torch.round(_from_blocks(decoded) + 128.0), 0, 255)


def jpeg_compress(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Baseline JPEG round trip of RGB images (B, 3, H, W) in [0, 1] at per-image integer
    `quality` (B,); returns the decoded images, 8-bit valued, in [0, 1].

    Mirrors what libjpeg does with PIL's defaults: JFIF full-range YCbCr, 4:2:0 chroma
    subsampling by 2x2 averaging, edge-replicated padding to whole 16x16 MCUs, float DCT,
    the quality-scaled tables of `jpeg_quant_tables`, and libjpeg's 'fancy' (triangular)
    chroma upsampling, which is bilinear interpolation with half-pixel centres. Entropy
    coding is lossless and therefore skipped.
    """
    b, _, h, w = images.shape
    pixels = torch.clamp((images.float() * 255.0).round(), 0, 255)
    pad_h, pad_w = (-h) % 16, (-w) % 16
    pixels = F.pad(pixels, (0, pad_w, 0, pad_h), mode="replicate")
    r, g, bl = pixels.unbind(dim=1)
    y = torch.round(0.299 * r + 0.587 * g + 0.114 * bl)
    cb = torch.round(-0.168735892 * r - 0.331264108 * g + 0.5 * bl + 128.0).clamp(0, 255)
    cr = torch.round(0.5 * r - 0.418687589 * g - 0.081312411 * bl + 128.0).clamp(0, 255)
    chroma = torch.round(F.avg_pool2d(torch.stack([cb, cr], dim=1), 2))

    luma_table, chroma_table = (_to_device(table, images.device) for table in jpeg_quant_tables(quality))
    dct = _dct_matrix(images.device)
    y = _quantise_plane(y, luma_table, dct)
    cb = _quantise_plane(chroma[:, 0], chroma_table, dct)
    cr = _quantise_plane(chroma[:, 1], chroma_table, dct)
    chroma = F.interpolate(torch.stack([cb, cr], dim=1), scale_factor=2, mode="bilinear", align_corners=False)
    cb, cr = chroma[:, 0] - 128.0, chroma[:, 1] - 128.0

    rgb = torch.stack([y + 1.402 * cr, y - 0.344136286 * cb - 0.714136286 * cr, y + 1.772 * cb], dim=1)
    rgb = torch.clamp(torch.round(rgb), 0, 255)[:, :, :h, :w]
    return (rgb / 255.0).to(images.dtype)


def random_jpeg(images: torch.Tensor, jpeg_range: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """JPEG at a per-image quality drawn uniformly from `jpeg_range`, rounded to an integer
    (the only qualities a real encoder knows)."""
    quality = torch.round(_uniform(images.shape[0], *jpeg_range, generator))
    return jpeg_compress(torch.clamp(images, 0.0, 1.0), quality)


# --------------------------------------------------------------------------------------
# Resizing and the full pipeline
# --------------------------------------------------------------------------------------


def resize(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """F.interpolate without antialiasing (as Real-ESRGAN), `align_corners=False` where the
    mode takes it."""
    align = False if mode in ("bilinear", "bicubic") else None
    return F.interpolate(images, size=size, mode=mode, align_corners=align)


def _random_scale(resize_prob: tuple[float, float, float], resize_range: tuple[float, float],
                  generator: torch.Generator) -> float:
    kind = int(_categorical(1, resize_prob, generator).item())
    u = float(torch.rand(1, generator=generator).item())
    low, high = resize_range
    if kind == 0:  # up
        return 1.0 + u * (high - 1.0)
    if kind == 1:  # down
        return low + u * (1.0 - low)
    return 1.0


def _random_mode(generator: torch.Generator) -> str:
    return RESIZE_MODES[int(torch.randint(len(RESIZE_MODES), (1,), generator=generator).item())]


def degrade(hr: torch.Tensor, config: DegradationConfig, generator: torch.Generator) -> torch.Tensor:
    """Synthesise LR images (B, 3, H/scale, W/scale), 8-bit valued in [0, 1], from HR
    images (B, 3, H, W) in [0, 1] whose sides are multiples of `config.scale`.

    `generator` is a CPU generator whatever the images' device: the parameters are drawn and
    read on the host, and nothing here waits for the device."""
    _check_generator(generator)
    b, _, h, w = hr.shape
    if h % config.scale or w % config.scale:
        raise ValueError(f"HR size {h}x{w} is not a multiple of the scale {config.scale}")
    lr_h, lr_w = h // config.scale, w // config.scale
    noise_generator = _noise_generator(generator, hr.device)

    # First stage.
    kernels = random_blur_kernels(
        b, config.kernel_sizes, config.kernel_types, config.kernel_prob, config.sinc_prob,
        config.blur_sigma, config.betag_range, config.betap_range, generator,
    )
    out = filter2d(hr, _to_device(kernels, hr.device))
    s = _random_scale(config.resize_prob, config.resize_range, generator)
    out = resize(out, (max(1, int(h * s)), max(1, int(w * s))), _random_mode(generator))
    out = random_noise(out, config.gaussian_noise_prob, config.noise_range, config.poisson_scale_range,
                       config.gray_noise_prob, generator, noise_generator)
    out = random_jpeg(out, config.jpeg_range, generator)

    # Second stage (at probability 1 no draw decides it, so the random stream is Real-ESRGAN's).
    if config.second_order_prob == 1.0 or bool(_bernoulli(1, config.second_order_prob, generator).item()):
        kernels = random_blur_kernels(
            b, config.kernel_sizes, config.kernel_types, config.kernel_prob2, config.sinc_prob2,
            config.blur_sigma2, config.betag_range2, config.betap_range2, generator,
        )
        blur = _bernoulli(b, config.second_blur_prob, generator).view(b, 1, 1)
        out = filter2d(out, _to_device(torch.where(blur, kernels, pulse_kernels(b, kernels.device)), hr.device))
        s = _random_scale(config.resize_prob2, config.resize_range2, generator)
        out = resize(out, (max(1, int(lr_h * s)), max(1, int(lr_w * s))), _random_mode(generator))
        out = random_noise(out, config.gaussian_noise_prob2, config.noise_range2, config.poisson_scale_range2,
                           config.gray_noise_prob2, generator, noise_generator)

    # Final stage: resize to LR size + sinc, and JPEG, in random order.
    sizes = torch.tensor(config.kernel_sizes)
    sizes = sizes[torch.randint(len(config.kernel_sizes), (b,), generator=generator)]
    cutoff = _uniform(b, math.pi / 3, math.pi, generator)
    use_sinc = _bernoulli(b, config.final_sinc_prob, generator).view(b, 1, 1)
    final_kernels = _to_device(torch.where(use_sinc, sinc_kernels(cutoff, sizes), pulse_kernels(b, sizes.device)),
                               hr.device)
    mode = _random_mode(generator)
    if bool(_bernoulli(1, 0.5, generator).item()):
        out = filter2d(resize(out, (lr_h, lr_w), mode), final_kernels)
        out = random_jpeg(out, config.jpeg_range2, generator)
    else:
        out = random_jpeg(out, config.jpeg_range2, generator)
        out = filter2d(resize(out, (lr_h, lr_w), mode), final_kernels)
    return torch.clamp((out * 255.0).round(), 0, 255) / 255.0


def upsample_lr(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic upsampling of LR images back to HR size, clipped to [0, 1]: GuideSR's input
    lives at output resolution (the Guidance Branch works at full resolution)."""
    return torch.clamp(resize(lr, size, "bicubic"), 0.0, 1.0)
