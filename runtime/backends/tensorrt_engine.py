"""`tensorrt`: a serialized TensorRT engine (built by `python -m export engine`) with its NAME.engine.json.

Before the engine is deserialized, `check_engine` reads its metadata and refuses, with
export's `check_compatible` message, an engine built on another GPU (name, compute capability),
with another TensorRT version or from another checkpoint or weights than the loaded model's (the
weights' sha256 tells one checkpoint on two --base-model folders apart); it also checks the preset,
scale and I/O names. An engine only loads in the TensorRT version and on the GPU model that built
it, and it holds one model's weights, so this turns a crash inside TensorRT or a silently stale
result into a message saying what to rebuild.

Running it (TensorRT 10 / 11 Python API, torch CUDA tensors as the I/O buffers):

    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes)
    context = engine.create_execution_context()
    names: engine.num_io_tensors, engine.get_tensor_name(i), engine.get_tensor_mode(name),
           engine.get_tensor_dtype(name)
    per batch: context.set_input_shape("image", shape); context.get_tensor_shape("r1");
               context.set_tensor_address(name, tensor.data_ptr()) for the input and the output;
               context.execute_async_v3(torch.cuda.current_stream().cuda_stream)

A static engine dictates the tile shape and batch (partial batches are padded); a dynamic one
takes any tile shape its profile allows (padded to the size multiple).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from export import engine_metadata
from export.graphs import INPUT_NAME, OUTPUT_NAME

from .base import (
    Backend,
    BackendError,
    BackendRequest,
    BackendSpec,
    graph_limits,
    require_same_precision,
    run_graph,
)

if TYPE_CHECKING:
    from guidesr.model import GuideSR, ModelDescriptor


def check_engine(engine_path: str | os.PathLike, descriptor: ModelDescriptor, weights_sha256: str, gpu_name: str,
                 compute_capability: str, tensorrt_version: str,
                 driver_ptx_isa: int | None = None) -> engine_metadata.EngineMetadata:
    """Read NAME.engine.json and refuse an engine that does not fit this GPU, TensorRT and model (`weights_sha256`:
    the model's `guidesr.checkpoint.weights_sha256`).

    Needs neither TensorRT nor a GPU: the caller passes what it runs on. Raises BackendError.
    """
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise BackendError(f"TensorRT engine {engine_path} does not exist (build one with `python -m export engine`)")
    try:
        metadata = engine_metadata.read(engine_path)
        engine_metadata.check_compatible(metadata, gpu_name, compute_capability, tensorrt_version,
                                         descriptor.checkpoint_sha256, weights_sha256, driver_ptx_isa)
    except (engine_metadata.EngineMetadataError, engine_metadata.EngineMismatchError) as err:
        raise BackendError(str(err)) from err
    model = (descriptor.preset, descriptor.scale, descriptor.size_multiple)
    built = (metadata.preset, metadata.scale, metadata.size_multiple)
    if built != model:
        raise BackendError(f"{engine_path.name} was built for preset {built[0]} (x{built[1]}, size multiple "
                           f"{built[2]}), the model loaded is {model[0]} (x{model[1]}, size multiple {model[2]})")
    if metadata.input_names != (INPUT_NAME,) or metadata.output_names != (OUTPUT_NAME,):
        raise BackendError(f"{engine_path.name} has inputs {list(metadata.input_names)} and outputs "
                           f"{list(metadata.output_names)}; a GuideSR engine has [{INPUT_NAME!r}] and "
                           f"[{OUTPUT_NAME!r}]")
    return metadata


class TensorRTBackend(Backend):
    def __init__(self, model: GuideSR, device: str | torch.device, engine: str | os.PathLike,
                 precision: str | None = None):
        self.device = torch.device(device)
        reason = tensorrt_unavailable_reason(self.device)
        if reason is not None:
            raise BackendError(f"the tensorrt backend cannot run on {self.device}: {reason}")
        from export.tensorrt_build import TensorRTUnavailableError, import_tensorrt
        from export.tensorrt_plugins import driver_ptx_isa
        from guidesr.checkpoint import weights_sha256

        try:
            trt = import_tensorrt()
        except TensorRTUnavailableError as err:
            raise BackendError(str(err)) from err
        self.name = "tensorrt"
        self.descriptor = model.descriptor
        self.engine_path = Path(engine)
        major, minor = torch.cuda.get_device_capability(self.device)
        metadata = check_engine(self.engine_path, self.descriptor, weights_sha256(model),
                                torch.cuda.get_device_name(self.device), f"{major}.{minor}", trt.__version__,
                                driver_ptx_isa())
        require_same_precision(precision, metadata.precision, f"the engine {self.engine_path.name}")
        self.precision = metadata.precision
        self.spec = metadata.spec
        self.tile_shape, self.max_batch = graph_limits(self.spec)

        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self._engine = trt.Runtime(self._logger).deserialize_cuda_engine(self.engine_path.read_bytes())
            if self._engine is None:
                raise BackendError(f"TensorRT could not deserialize {self.engine_path} (its log above says why)")
            self._context = self._engine.create_execution_context()
        self._check_io(trt)

    def _check_io(self, trt) -> None:
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
            raise BackendError(f"{self.engine_path.name} has inputs {inputs} and outputs {outputs}, "
                               f"not [{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]")
        for name in names:
            if self._engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise BackendError(f"{self.engine_path.name}: tensor {name!r} is "
                                   f"{self._engine.get_tensor_dtype(name)}, GuideSR engines take and return float32")

    def describe(self) -> str:
        shape = "any tile shape" if self.tile_shape is None else f"tiles of {self.tile_shape[0]}x{self.tile_shape[1]}"
        return f"tensorrt ({self.precision} on {self.device}, {shape}, batch {self.max_batch}; {self.engine_path})"

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        with torch.cuda.device(self.device):
            return run_graph(tiles, self.spec, self._execute)

    def _execute(self, batch: torch.Tensor) -> torch.Tensor:
        image = batch.to(self.device, torch.float32).contiguous()
        if not self._context.set_input_shape(INPUT_NAME, tuple(image.shape)):
            raise ValueError(f"{self.engine_path.name} does not accept input shape {tuple(image.shape)}")
        r1 = torch.empty(tuple(self._context.get_tensor_shape(OUTPUT_NAME)), dtype=torch.float32, device=self.device)
        self._context.set_tensor_address(INPUT_NAME, image.data_ptr())
        self._context.set_tensor_address(OUTPUT_NAME, r1.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.engine_path.name} (its log above says why)")
        return r1.cpu()  # waits for the stream; `image` stays alive until then


def tensorrt_unavailable_reason(device: torch.device) -> str | None:
    reasons = []
    if device.type != "cuda":
        reasons.append(f"TensorRT runs on CUDA GPUs only (device is {device})")
    if importlib.util.find_spec("tensorrt") is None:
        reasons.append("TensorRT is not installed (pip install tensorrt-cu12, or tensorrt-cu13 for CUDA 13)")
    return "; ".join(reasons) or None


def _auto_skip_reason(request: BackendRequest) -> str | None:
    return "no --engine given" if request.engine is None else None


def create_tensorrt_backend(model: GuideSR, request: BackendRequest) -> TensorRTBackend:
    if request.engine is None:
        raise BackendError("the tensorrt backend runs a serialized engine: give it with --engine NAME.engine "
                           "(build one with `python -m export engine`)")
    return TensorRTBackend(model, request.device, request.engine, request.precision)


TENSORRT = BackendSpec(
    name="tensorrt",
    speed_rank=10,
    summary="a serialized TensorRT engine (--engine), checked against this GPU, TensorRT and the model's weights",
    unavailable_reason=tensorrt_unavailable_reason,
    create=create_tensorrt_backend,
    auto_skip_reason=_auto_skip_reason,
)
