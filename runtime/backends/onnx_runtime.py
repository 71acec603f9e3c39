"""`onnxruntime`: an exported GuideSR graph (fp32 or fp16, static or dynamic) on ONNX Runtime.

Where the graph comes from:

- `--onnx PATH`: a graph written by `python -m export onnx`. Its metadata must name the loaded
  model's checkpoint (sha256) and weights (`weights_sha256`: the same checkpoint on another
  --base-model holds other weights) and, when --precision is explicit, that precision. A static graph
  dictates the tile shape and batch; a dynamic one takes tiles of any multiple of the size multiple
  (smaller edge tiles are padded like the model pads) up to its profile's largest.
- otherwise it is exported now from the loaded model with export's own `export_graphs`: a static
  graph for the requested tile shape and tile batch, in the requested precision (auto: fp16 with
  the CUDA provider, fp32 on the CPU), cached as

      ONNX_CACHE/<checkpoint sha256>/<weights sha256, 16 digits>/<preset>-static-b<batch>-<H>x<W>-<precision>.onnx

  (ONNX_CACHE: --onnx-cache, default $XDG_CACHE_HOME/guidesr/onnx or ~/.cache/guidesr/onnx).
  The checkpoint's sha256 covers its trained parts only; the weights' sha256 (`weights_sha256`:
  every tensor of the model, the base UNet and VAE that --base-model chooses included) keeps apart
  the graphs of one checkpoint on different base weights.
  A cached graph is reused when its metadata matches the checkpoint, weights, precision, graph spec
  and guidesr version, and re-exported otherwise (a graph of an older guidesr, without
  weights_sha256, too). An export is written into a temporary folder and renamed into place, so a
  killed export leaves no half graph and concurrent ranks do not clash.
  A model without a checkpoint (untrained weights) has nothing to key the cache on: its graph is
  exported into a temporary folder and not kept.

Providers: CUDAExecutionProvider on a CUDA device (needs onnxruntime-gpu; ONNX Runtime falls back
to the CPU silently when its CUDA libraries do not load, which is refused here), else the CPU provider.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from google.protobuf.message import DecodeError

from export.graphs import INPUT_NAME, OUTPUT_NAME, GraphSpec, guidesr_graph
from export.onnx_export import (
    OutdatedGraphError,
    export_graphs,
    graph_filename,
    guidesr_version,
    other_weights_problem,
    read_metadata,
    remove_dead_scratch,
    scratch_prefix,
)
from guidesr.checkpoint import weights_sha256

from .base import (
    Backend,
    BackendError,
    BackendRequest,
    BackendSpec,
    graph_limits,
    require_same_precision,
    resolve_precision,
    run_graph,
)

if TYPE_CHECKING:
    import onnxruntime

    from guidesr.model import GuideSR

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "guidesr" / "onnx"


class ONNXRuntimeBackend(Backend):
    def __init__(self, model: GuideSR, device: str | torch.device = "cpu", precision: str | None = None,
                 onnx: str | os.PathLike | None = None, tile: tuple[int, int] | None = None, batch: int = 1,
                 cache_dir: str | os.PathLike | None = None):
        """Run `onnx`, or (without it) a static graph for `tile` x `batch` exported from `model`."""
        self.device = torch.device(device)
        reason = onnxruntime_unavailable_reason(self.device)
        if reason is not None:
            raise BackendError(f"the onnxruntime backend cannot run on {self.device}: {reason}")
        self.name = "onnxruntime"
        self.descriptor = model.descriptor
        if onnx is not None:
            self.graph_path, self.origin = Path(onnx), "given"
            self.spec, self.precision = self._check_given_graph(self.graph_path, precision, model)
            self.session = self._session(self.graph_path)
        else:
            if tile is None:
                raise BackendError("the onnxruntime backend exports a static graph for one tile shape: give a tile "
                                   "size (--tile > 0), or a dynamic graph with --onnx")
            self.precision = resolve_precision(precision, self.device, self.descriptor)
            self.spec = guidesr_graph(self.descriptor.size_multiple, tile, "static", batch=batch)
            if self.descriptor.checkpoint_sha256 is None:
                with tempfile.TemporaryDirectory(prefix="guidesr-onnx-") as scratch:
                    (graph,) = export_graphs(model, scratch, [self.spec], [self.precision], weights="untrained")
                    self.session = self._session(graph.path)  # the session holds the graph; the file can go
                self.graph_path, self.origin = None, "exported now, not cached (the model has no checkpoint)"
            else:
                cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
                self.graph_path, self.origin = cached_graph(model, self.spec, self.precision, cache)
                self.session = self._session(self.graph_path)
        self.tile_shape, self.max_batch = graph_limits(self.spec)
        self.provider = self.session.get_providers()[0]

    def _check_given_graph(self, path: Path, precision: str | None, model: GuideSR) -> tuple[GraphSpec, str]:
        metadata = _graph_metadata(path)
        graph_checkpoint = metadata["checkpoint_sha256"]
        model_checkpoint = self.descriptor.checkpoint_sha256 or "none"
        if graph_checkpoint != model_checkpoint:
            raise BackendError(
                f"{path.name} was exported from checkpoint {graph_checkpoint[:12]}, the model loaded is "
                f"{model_checkpoint[:12]}: pass the --checkpoint it came from, or leave out --onnx to export the "
                f"loaded model"
            )
        problem = other_weights_problem(path.name, metadata, weights_sha256(model), "the model loaded")
        if problem is not None:
            raise BackendError(f"{problem}, or leave out --onnx to export the loaded model")
        if int(metadata["size_multiple"]) != self.descriptor.size_multiple:
            raise BackendError(f"{path.name} is for size multiple {metadata['size_multiple']}, the model's is "
                               f"{self.descriptor.size_multiple}")
        require_same_precision(precision, metadata["precision"], f"the graph {path.name}")
        return GraphSpec.from_json(metadata["graph_spec"]), metadata["precision"]

    def _session(self, path: Path) -> onnxruntime.InferenceSession:
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            providers = [(CUDA_PROVIDER, {"device_id": index}), CPU_PROVIDER]
        else:
            providers = [CPU_PROVIDER]
        import onnxruntime  # a second or more to import: only when a graph is run, not at `--help`

        try:
            session = onnxruntime.InferenceSession(str(path), providers=providers)
        except Exception as err:  # ONNX Runtime's own exception classes derive from Exception directly
            raise BackendError(f"ONNX Runtime cannot load {path}: {err}") from err
        if self.device.type == "cuda" and session.get_providers()[0] != CUDA_PROVIDER:
            raise BackendError(f"ONNX Runtime could not start its CUDA provider "
                               f"(it fell back to {session.get_providers()}); "
                               f"check that the CUDA and cuDNN libraries onnxruntime-gpu needs are installed")
        return session

    def describe(self) -> str:
        shape = "any tile shape" if self.tile_shape is None else f"tiles of {self.tile_shape[0]}x{self.tile_shape[1]}"
        graph = self.graph_path if self.graph_path is not None else f"{self.spec.variant} graph"
        return (f"onnxruntime ({self.precision} on {self.device} through {self.provider}, {shape}, "
                f"batch {self.max_batch}; {graph}, {self.origin})")

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        return run_graph(tiles, self.spec, self._run)

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        feed = np.ascontiguousarray(batch.numpy(), dtype=np.float32)
        (r1,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: feed})
        return torch.from_numpy(r1)


def _graph_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise BackendError(f"ONNX graph {path} does not exist")
    try:
        return read_metadata(path)
    except (DecodeError, OSError) as err:
        raise BackendError(f"{path} is not a readable ONNX file: {err}") from err
    except ValueError as err:  # an ONNX file without our metadata
        raise BackendError(str(err)) from err


def cached_graph(model: GuideSR, spec: GraphSpec, precision: str, cache_dir: Path) -> tuple[Path, str]:
    """The cached graph of `model` (which has a checkpoint) for `spec` and `precision`, exported when
    missing or stale; returns its path and where it came from. The export runs in a scratch folder named after its
    process, which a later export into the folder removes if that process was killed (`remove_dead_scratch`)."""
    checkpoint, weights_digest = model.descriptor.checkpoint_sha256, weights_sha256(model)
    folder = cache_dir / checkpoint / weights_digest[:16]
    path = folder / graph_filename(model.config.preset, spec, precision)
    stale = _stale_reason(path, checkpoint, weights_digest, spec, precision)
    if stale is None:
        return path, "from the cache"
    folder.mkdir(parents=True, exist_ok=True)
    remove_dead_scratch(folder)
    with tempfile.TemporaryDirectory(dir=folder, prefix=scratch_prefix()) as scratch:
        (graph,) = export_graphs(model, scratch, [spec], [precision], weights=f"checkpoint sha256 {checkpoint}",
                                 weights_digest=weights_digest)
        weights = graph.path.with_name(graph.path.name + ".data")  # external data of graphs above 1 GiB
        if weights.exists():
            os.replace(weights, path.with_name(path.name + ".data"))
        os.replace(graph.path, path)  # last: a graph in place is a complete one
    return path, f"exported now into the cache ({stale})"


def _stale_reason(path: Path, checkpoint: str, weights_digest: str, spec: GraphSpec, precision: str) -> str | None:
    """Why the cached file cannot be used, or None when it can."""
    if not path.is_file():
        return "the first use of this graph"
    try:
        metadata = read_metadata(path)
    except OutdatedGraphError:
        return "the cached file was exported by an older guidesr"
    except (DecodeError, OSError, ValueError):
        return "the cached file was unreadable"
    expected = {"checkpoint_sha256": checkpoint, "weights_sha256": weights_digest, "precision": precision,
                "graph_spec": spec.to_json(), "guidesr_version": guidesr_version()}
    differing = [key for key, value in expected.items() if metadata.get(key) != value]
    return f"the cached file differed in {', '.join(differing)}" if differing else None


def onnxruntime_unavailable_reason(device: torch.device) -> str | None:
    if device.type not in ("cpu", "cuda"):
        return f"the onnxruntime backend runs on the CPU or CUDA, not {device.type}"
    import onnxruntime  # a second or more to import: only when a backend is chosen, not at `--help`

    available = onnxruntime.get_available_providers()
    if device.type == "cuda" and CUDA_PROVIDER not in available:
        return (f"this onnxruntime has no {CUDA_PROVIDER} (it has {', '.join(available)}): "
                f"pip install onnxruntime-gpu (in place of onnxruntime)")
    return None


def _auto_skip_reason(request: BackendRequest) -> str | None:
    if request.onnx is None:
        return "no --onnx graph given (auto does not export one; --backend onnxruntime does, into the cache)"
    return None


def create_onnxruntime_backend(model: GuideSR, request: BackendRequest) -> ONNXRuntimeBackend:
    tile = None if request.onnx is not None or not request.tile else request.tile_for(
        model.descriptor.size_multiple, "onnxruntime")
    return ONNXRuntimeBackend(model, request.device, request.precision, onnx=request.onnx, tile=tile,
                              batch=request.tile_batch, cache_dir=request.onnx_cache)


ONNXRUNTIME = BackendSpec(
    name="onnxruntime",
    speed_rank=30,
    summary="an exported ONNX graph (fp32/fp16) on ONNX Runtime: CUDA provider with onnxruntime-gpu, else CPU",
    unavailable_reason=onnxruntime_unavailable_reason,
    create=create_onnxruntime_backend,
    auto_skip_reason=_auto_skip_reason,
)
