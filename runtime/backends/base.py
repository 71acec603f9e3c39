"""The backend interface, the request a backend is built from, and helpers the backends share."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from export.graphs import GraphSpec

PRECISIONS = ("fp32", "fp16")


class BackendError(RuntimeError):
    """A backend cannot be created as asked (unknown name, unavailable here, bad precision, stale artifact)."""


class Backend(ABC):
    """Runs the model on tiles. Subclasses set the attributes in their constructor."""

    name: str
    precision: str  # 'fp32' or 'fp16'
    device: torch.device
    tile_shape: tuple[int, int] | None = None  # a static graph's (h, w); None: any shape
    max_batch: int | None = None  # None: any batch size
    descriptor: Any = None  # the model's ModelDescriptor (scale, size_multiple, ...)
    # True: also takes tiles on `device` and returns the image there, with no host round trip
    device_io: bool = False

    @abstractmethod
    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        """[B, 3, th, tw] float32 in [-1, 1] on the CPU -> the model's image, same shape, float32 on the CPU
        (on the tiles' device where `device_io`)."""

    def describe(self) -> str:
        shape = "any tile shape" if self.tile_shape is None else f"tiles of {self.tile_shape[0]}x{self.tile_shape[1]}"
        batch = "" if self.max_batch is None else f", batch {self.max_batch}"
        return f"{self.name} ({self.precision} on {self.device}, {shape}{batch})"


@dataclass(frozen=True)
class BackendRequest:
    """Everything a backend factory may need besides the model."""

    device: torch.device
    precision: str | None = None  # None: auto (the backend's or artifact's own choice)
    tile: int | tuple[int, int] | None = None  # output pixels; static backends are built for it
    tile_batch: int = 1  # tiles per call; static backends are built for it
    onnx: Path | None = None  # an exported graph for the onnxruntime backend
    engine: Path | None = None  # a serialized engine for the tensorrt backend
    onnx_cache: Path | None = None  # where the onnxruntime backend caches graphs it exports itself
    autotune: bool = False  # compiled: Inductor's default mode, or max-autotune-no-cudagraphs (minutes for sd-turbo)

    def tile_for(self, size_multiple: int, backend: str) -> tuple[int, int]:
        """The static tile shape: `tile` rounded down to the model's size multiple (BackendError without one)."""
        if not self.tile:
            raise BackendError(f"the {backend} backend runs one fixed tile shape: give a tile size (--tile > 0)")
        height, width = (self.tile, self.tile) if isinstance(self.tile, int) else self.tile
        return (max(size_multiple, height // size_multiple * size_multiple),
                max(size_multiple, width // size_multiple * size_multiple))


@dataclass(frozen=True)
class BackendSpec:
    """One row of the backend table (runtime/backends/registry.py)."""

    name: str
    speed_rank: int  # lower is faster; `auto` takes the lowest that can run
    summary: str
    unavailable_reason: Callable[[torch.device], str | None]  # why it cannot run on this device, or None
    create: Callable[[nn.Module, BackendRequest], Backend]
    # Why `--backend auto` should pass over it although it could run (e.g. it needs an artifact
    # that was not given), or None.
    auto_skip_reason: Callable[[BackendRequest], str | None] = lambda request: None


def skip_when_an_artifact_is_given(request: BackendRequest) -> str | None:
    """auto_skip_reason of the backends that run the model itself (torch, compiled)."""
    if request.onnx is not None or request.engine is not None:
        return "an exported graph or engine was given (--onnx / --engine), so auto runs that"
    return None


def resolve_precision(precision: str | None, device: torch.device, descriptor: Any) -> str:
    """'auto' / None: fp16 on CUDA when the model supports it, else fp32."""
    if precision in (None, "auto"):
        supports_half = descriptor is None or descriptor.supports_half
        return "fp16" if device.type == "cuda" and supports_half else "fp32"
    if precision not in PRECISIONS:
        raise BackendError(f"precision must be auto or one of {PRECISIONS}, not {precision!r}")
    return precision


@contextlib.contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """fp32 means fp32: no TF32 tensor-core rounding in cuDNN convolutions or cuBLAS matmuls on CUDA.

    PyTorch allows TF32 in cuDNN convolutions by default (10-bit mantissa, fp16-like error), which
    would make an "fp32" result on an Ampere+ GPU no better than fp16. Restored on exit.
    """
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def pad_batch(tiles: torch.Tensor, batch: int) -> torch.Tensor:
    """Fill a partial batch up to `batch` with copies of its last tile (static-batch graphs)."""
    missing = batch - tiles.shape[0]
    if missing <= 0:
        return tiles
    return torch.cat([tiles, tiles[-1:].expand(missing, -1, -1, -1)])


def run_static_batches(tiles: torch.Tensor, batch: int, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run `run` (which takes exactly `batch` tiles) on any number of tiles: split, pad the last, crop."""
    outputs = [run(pad_batch(chunk, batch))[: chunk.shape[0]] for chunk in tiles.split(batch)]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def run_graph(tiles: torch.Tensor, spec: GraphSpec, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run an exported graph (its GraphSpec) on tiles it accepts, whatever their batch and size.

    Static graph: one shape; the batch is split/padded to the graph's, the tile must be its shape
    (the tiler guarantees it through `tile_shape`). Dynamic graph: H and W are padded to the size
    multiple as the model pads (reflect) and cropped back; the batch is split at the profile's max.
    """
    from guidesr.model import pad_to_multiple  # guidesr.model imports diffusers: not at `--help` time

    low, high = spec.inputs[0].min, spec.inputs[0].max
    if spec.variant == "static":
        spec.check_input_shape((low[0], *tiles.shape[1:]))
        return run_static_batches(tiles, low[0], run)
    height, width = tiles.shape[-2:]
    padded = pad_to_multiple(tiles, spec.size_multiple)
    spec.check_input_shape((1, *padded.shape[1:]))
    outputs = [run(chunk) for chunk in padded.split(high[0])]
    result = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return result[..., :height, :width]


def graph_limits(spec: GraphSpec) -> tuple[tuple[int, int] | None, int]:
    """(tile_shape, max_batch) a backend running the graph declares: static graphs dictate both."""
    if spec.variant == "static":
        return spec.tile, spec.inputs[0].min[0]
    return None, spec.inputs[0].max[0]


def require_same_precision(requested: str | None, actual: str, source: str) -> None:
    """An artifact's precision is fixed; an explicit, different --precision is an error."""
    if requested not in (None, "auto") and requested != actual:
        raise BackendError(f"--precision {requested} asked for, but {source} is {actual}")
