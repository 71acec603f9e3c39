"""The one table of backends, and building a backend by name ('auto': the fastest that can run here)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .base import Backend, BackendError, BackendRequest, BackendSpec
from .compiled import COMPILED
from .eager import TORCH
from .onnx_runtime import ONNXRUNTIME
from .tensorrt_engine import TENSORRT

# Fastest first; `speed_rank` orders them (tensorrt 10 < compiled 20 < onnxruntime 30 < torch 40):
# on CUDA tensorrt > compiled > onnxruntime (CUDA provider) > torch; on the CPU onnxruntime > torch.
BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (TENSORRT, COMPILED, ONNXRUNTIME, TORCH)}


def available_backends() -> list[str]:
    """Every backend name, fastest first (whether it can run here or not)."""
    return sorted(BACKENDS, key=lambda name: BACKENDS[name].speed_rank)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' / None: CUDA when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise BackendError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def create_backend(name: str, model: nn.Module, device: str | torch.device | None = None,
                   precision: str | None = None, *, tile: int | tuple[int, int] | None = None, tile_batch: int = 1,
                   onnx: str | os.PathLike | None = None, engine: str | os.PathLike | None = None,
                   onnx_cache: str | os.PathLike | None = None, autotune: bool = False) -> tuple[Backend, str]:
    """Build a backend by name ('auto' picks the fastest available); returns it and why it was chosen.

    `tile` / `tile_batch` are what static backends (compiled, onnxruntime's own export) are built
    for; `onnx` / `engine` are artifacts for onnxruntime / tensorrt; `autotune` switches the
    compiled backend from Inductor's default mode to max-autotune-no-cudagraphs.
    """
    request = BackendRequest(
        device=resolve_device(device),
        precision=None if precision in (None, "auto") else precision,
        tile=tile or None,
        tile_batch=tile_batch,
        onnx=Path(onnx) if onnx is not None else None,
        engine=Path(engine) if engine is not None else None,
        onnx_cache=Path(onnx_cache) if onnx_cache is not None else None,
        autotune=autotune,
    )
    if name == "auto":
        return _create_fastest(model, request)
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(available_backends())}")
    if request.onnx is not None and name != ONNXRUNTIME.name:
        raise BackendError(f"--onnx is a graph for the onnxruntime backend, not for {name}")
    if request.engine is not None and name != TENSORRT.name:
        raise BackendError(f"--engine is for the tensorrt backend, not for {name}")
    reason = BACKENDS[name].unavailable_reason(request.device)
    if reason is not None:
        raise BackendError(f"backend {name!r} cannot run on {request.device}: {reason}")
    backend = BACKENDS[name].create(model, request)
    return backend, f"using {backend.describe()} as asked"


def _create_fastest(model: nn.Module, request: BackendRequest) -> tuple[Backend, str]:
    """The fastest backend that can run on the device and is not passed over for this request."""
    skipped = []
    for name in available_backends():
        spec = BACKENDS[name]
        reason = spec.unavailable_reason(request.device) or spec.auto_skip_reason(request)
        if reason is not None:
            skipped.append(f"{name}: {reason}")
            continue
        backend = spec.create(model, request)
        why = f"--backend auto chose {backend.describe()}: the fastest backend available here"
        if skipped:
            why += "; faster ones skipped: " + "; ".join(skipped)
        return backend, why
    raise BackendError("no backend can run here: " + "; ".join(skipped))
