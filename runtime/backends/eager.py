"""`torch`: eager PyTorch on the CPU or CUDA; fp16 through autocast."""

from __future__ import annotations

import torch
from torch import nn

from .base import (
    PRECISIONS,
    Backend,
    BackendError,
    BackendRequest,
    BackendSpec,
    exact_fp32,
    resolve_precision,
    skip_when_an_artifact_is_given,
)


class TorchBackend(Backend):
    """Eager PyTorch. fp16 runs under autocast (weights stay fp32, normalisations keep fp32);
    fp32 on CUDA runs without TF32. Accepts any module returning a tensor or an object with `.r1`."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise BackendError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError(f"device {self.device} asked for, but CUDA is not available here")
        self.descriptor = getattr(model, "descriptor", None)
        if precision == "fp16" and self.descriptor is not None and not self.descriptor.supports_half:
            raise BackendError(f"the {self.descriptor.preset} model does not support fp16")
        self.name = "torch"
        self.precision = precision
        self.model = model.to(self.device).eval()

    def _numerics(self):
        if self.precision == "fp16":
            return torch.autocast(device_type=self.device.type, dtype=torch.float16)
        return exact_fp32(self.device)

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self._numerics():
            result = self.model(tiles.to(self.device, non_blocking=True))
        image = result if isinstance(result, torch.Tensor) else result.r1  # GuideSR returns (r1, r2)
        return image.float().cpu()


def create_torch_backend(model: nn.Module, request: BackendRequest) -> TorchBackend:
    precision = resolve_precision(request.precision, request.device, getattr(model, "descriptor", None))
    return TorchBackend(model, request.device, precision)


TORCH = BackendSpec(
    name="torch",
    speed_rank=40,
    summary="eager PyTorch (CPU or CUDA; fp16 through autocast)",
    unavailable_reason=lambda device: None,
    create=create_torch_backend,
    auto_skip_reason=skip_when_an_artifact_is_given,
)
