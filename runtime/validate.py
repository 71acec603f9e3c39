"""--validate: a backend's output against the PyTorch fp32 reference, computed on the same tiles.

The reference (`ReferenceBackend`) is the model's definition: eager PyTorch in fp32, without TF32
and with the Triton kernels off, on the backend's device. `upscale_array` runs it as a second tile
function of `run_tiled`, so it gets exactly the backend's input tiles (padded the same way when
the backend has a static tile shape) and the same blending. The two blended images, mapped to
[0, 1] and clipped as they would be written, are compared with guidesr.metrics' definitions:
PSNR (peak 1), SSIM (11x11 Gaussian window) and max-abs.

Threshold (`--min-psnr`): by default 40 dB for fp16 backends and 60 dB for fp32 ones. fp16
rounding (a 10-bit mantissa through hundreds of layers) costs tens of dB, and 40 dB is the
criterion export uses for fp16 graphs. An fp32 backend computes what the reference computes up to
summation order, which leaves it at 90 dB or more (max-abs around 1e-5); 60 dB (an RMS error of a
quarter of an 8-bit level) still leaves room for long accumulations in large models, while an
fp32 backend that is really running in reduced precision (TF32 convolutions, a graph with fp16
parts) or has a wrong op falls below it, which a 40 dB bar would let through.

Metrics are computed on bands of rows, so validating a large image needs no image-sized float64
copies; the results equal guidesr.metrics on the whole image (tests/test_validate.py).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from guidesr import metrics

from .backends import Backend, TorchBackend

DEFAULT_MIN_PSNR = {"fp16": 40.0, "fp32": 60.0}  # dB, by the backend's precision
SSIM_WINDOW = 11  # guidesr.metrics.ssim's window: its SSIM map is (H - 10) x (W - 10)
BAND_ROWS = 256


class ReferenceBackend(TorchBackend):
    """The model's definition: eager PyTorch fp32 (no TF32), Triton kernels off, on `device`."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu"):
        super().__init__(model, device, "fp32")
        self.name = "reference"

    def describe(self) -> str:
        return f"the PyTorch fp32 reference on {self.device} (eager, no TF32, Triton kernels off)"

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        with _triton_kernels_off(self.model):
            return super().__call__(tiles)


@contextlib.contextmanager
def _triton_kernels_off(model: nn.Module) -> Iterator[None]:
    switched = [module for module in model.modules() if getattr(module, "use_kernel", False)]
    for module in switched:
        module.use_kernel = False
    try:
        yield
    finally:
        for module in switched:
            module.use_kernel = True


@dataclass(frozen=True)
class ValidationReport:
    psnr: float  # dB, peak 1
    ssim: float | None  # None for images smaller than the SSIM window
    max_abs: float
    min_psnr: float

    @property
    def passed(self) -> bool:
        return self.psnr >= self.min_psnr  # False for NaN

    def describe(self) -> str:
        ssim = "n/a (image smaller than the 11x11 window)" if self.ssim is None else f"{self.ssim:.5f}"
        verdict = "passed" if self.passed else f"FAILED: PSNR below {self.min_psnr:g} dB"
        return (f"PSNR {self.psnr:.2f} dB, SSIM {ssim}, max-abs {self.max_abs:.4g} against the PyTorch fp32 "
                f"reference (at least {self.min_psnr:g} dB): {verdict}")


class ValidationError(ValueError):
    """The backend's output is further from the reference than the threshold allows."""

    def __init__(self, report: ValidationReport, path: str | None = None):
        self.report = report
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(f"{where}validation {report.describe()}")


class Validator:
    """Holds the reference backend and the threshold; `check` compares one image and keeps its report."""

    def __init__(self, reference: Backend, min_psnr: float):
        self.reference = reference
        self.min_psnr = min_psnr
        self.reports: list[ValidationReport] = []

    def check(self, output: np.ndarray, reference: np.ndarray) -> ValidationReport:
        """[H, W, 3] images in [0, 1]; raises ValidationError below the threshold."""
        psnr, ssim, max_abs = compare_images(output, reference)
        report = ValidationReport(psnr=psnr, ssim=ssim, max_abs=max_abs, min_psnr=self.min_psnr)
        self.reports.append(report)
        if not report.passed:
            raise ValidationError(report)
        return report


def compare_images(output: np.ndarray, reference: np.ndarray,
                   band_rows: int = BAND_ROWS) -> tuple[float, float | None, float]:
    """PSNR (dB, peak 1), SSIM and max-abs of two [H, W, C] images in [0, 1], computed band by band.

    A band of `band_rows` rows plus the SSIM window's 10 rows below it gives exactly the SSIM map
    rows that start in the band, so the band means, weighted by their map sizes, are the whole
    image's SSIM. SSIM is None when the image is smaller than the window.
    """
    if output.shape != reference.shape:
        raise ValueError(f"images differ in shape: {output.shape} vs {reference.shape}")
    height, width = output.shape[:2]
    reach = SSIM_WINDOW - 1
    squared_error, worst = 0.0, 0.0
    ssim_sum, ssim_positions = 0.0, 0
    for start in range(0, height, band_rows):
        band, band_reference = (_as_batch(output[start : start + band_rows]),
                                _as_batch(reference[start : start + band_rows]))
        squared_error += (band.double() - band_reference.double()).square().sum().item()
        worst = float(np.max([worst, metrics.max_abs(band, band_reference)]))  # NaN stays NaN
        if start + reach < height and width > reach:
            stop = min(height, start + band_rows + reach)
            positions = (stop - start - reach) * (width - reach)
            ssim_sum += metrics.ssim(_as_batch(output[start:stop]), _as_batch(reference[start:stop])) * positions
            ssim_positions += positions
    mean_squared_error = squared_error / output.size
    psnr = math.inf if mean_squared_error == 0 else 10 * math.log10(1.0 / mean_squared_error)
    ssim = ssim_sum / ssim_positions if ssim_positions else None
    return psnr, ssim, worst


def _as_batch(image: np.ndarray) -> torch.Tensor:
    """[h, W, C] numpy -> [1, C, h, W] tensor (a view)."""
    return torch.from_numpy(image).permute(2, 0, 1)[None]
