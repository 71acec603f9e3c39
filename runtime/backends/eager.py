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
    fp32 on CUDA runs without TF32. Accepts any module returning a tensor or an object with `.r1`.

    `merge_lora=True` (what `--backend torch` builds) runs a LoRA-merged copy of a GuideSR model:
    the same function (fp32 difference ~1e-6), one convolution or matmul per adapted layer instead
    of three, no LoRA intermediates (tiny demo, 512x512, fp32, 2 CPU threads, 2026-11-26: 2.3-2.7 s
    -> 1.6-2.0 s per call; how it was measured: docs/design/runtime.md). The caller's model is left
    as trained, so --validate's fp32 reference (which constructs this class without the merge) runs
    the model's own definition."""

    device_io = True

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", precision: str = "fp32",
                 merge_lora: bool = False):
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
        self.lora_merged_copy = merge_lora and not getattr(model, "lora_merged", True)
        if self.lora_merged_copy:
            from export.merge import merged_copy  # imports peft: only for a model with LoRA layers

            model = merged_copy(model)
        self.model = model.to(self.device).eval()

    def describe(self) -> str:
        merged = ", LoRA merged" if self.lora_merged_copy else ""
        return f"{self.name} ({self.precision} on {self.device}, any tile shape{merged})"

    def _numerics(self):
        if self.precision == "fp16":
            return torch.autocast(device_type=self.device.type, dtype=torch.float16)
        return exact_fp32(self.device)

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self._numerics():
            result = self.model(tiles.to(self.device, non_blocking=True))
        image = result if isinstance(result, torch.Tensor) else result.r1  # GuideSR returns (r1, r2)
        return image.float().to(tiles.device)


def create_torch_backend(model: nn.Module, request: BackendRequest) -> TorchBackend:
    precision = resolve_precision(request.precision, request.device, getattr(model, "descriptor", None))
    return TorchBackend(model, request.device, precision, merge_lora=True)


TORCH = BackendSpec(
    name="torch",
    speed_rank=40,
    summary="eager PyTorch (CPU or CUDA; fp16 through autocast)",
    unavailable_reason=lambda device: None,
    create=create_torch_backend,
    auto_skip_reason=skip_when_an_artifact_is_given,
)
