"""Backends: what runs the model on a batch of tiles.

Every backend is a `Backend`: tiles in ([B, 3, th, tw] float32 in [-1, 1], on the CPU), tiles
out (same shape, float32, on the CPU). The tiler does not care what is behind it.

| name | module | what |
| --- | --- | --- |
| `tensorrt` | tensorrt_engine.py | a serialized TensorRT engine (--engine), checked against GPU, TensorRT and weights |
| `compiled` | compiled.py | torch.compile + one CUDA graph, fp16, channels_last, Triton kernels (CUDA) |
| `onnxruntime` | onnx_runtime.py | an exported ONNX graph (--onnx, or exported and cached on the fly) |
| `torch` | eager.py | eager PyTorch, CPU or CUDA |

The table is `registry.BACKENDS`, written out once; `create_backend(name, model, ...)` builds one
('auto': the fastest that can run here). A new backend is a `Backend` subclass plus a
`BackendSpec` (name, speed rank, summary, `unavailable_reason(device)`, factory
`create(model, request)`, optionally `auto_skip_reason(request)`) added to that table.
A backend with a static shape sets `tile_shape` (the tiler then uses exactly that tile and pads
smaller images to it) and `max_batch`.
"""

from .base import PRECISIONS, Backend, BackendError, BackendRequest, BackendSpec, resolve_precision
from .compiled import CompiledBackend
from .eager import TorchBackend
from .onnx_runtime import ONNXRuntimeBackend
from .registry import BACKENDS, available_backends, create_backend, resolve_device
from .tensorrt_engine import TensorRTBackend, check_engine

__all__ = [
    "BACKENDS", "PRECISIONS", "Backend", "BackendError", "BackendRequest", "BackendSpec", "CompiledBackend",
    "ONNXRuntimeBackend", "TensorRTBackend", "TorchBackend", "available_backends", "check_engine", "create_backend",
    "resolve_device", "resolve_precision",
]
