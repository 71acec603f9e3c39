"""ONNX -> serialized TensorRT engine plus NAME.engine.json, with TensorRT's Python API.

    builder = trt.Builder(logger)
    network = builder.create_network(flags)          # strongly typed: precision comes from the ONNX
    trt.OnnxParser(network, logger).parse_from_file(onnx)
    config = builder.create_builder_config()        # optimisation level, workspace, timing cache,
    config.add_optimization_profile(profile)        # profile from the graph spec's min/opt/max
    builder.build_serialized_network(network, config) -> NAME.engine

A graph exported with `trt_plugins` holds FCA plugin nodes; their plugins (export/tensorrt_plugins.py)
are registered before parsing, so the parser imports those nodes as plugins.

Strong typing: TensorRT 10 builds a strongly typed network when created with
NetworkDefinitionCreationFlag.STRONGLY_TYPED; TensorRT 11 builds nothing else (and has no FP16
builder flag any more). Either way no precision flag is set here: the fp16 graph's types, with
its explicit fp32 islands, are what the engine computes in.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import torch

from runtime.cli import write_whole

from .engine_metadata import EngineMetadata, graph_sha256, publish_engine
from .graphs import GraphSpec
from .onnx_export import read_metadata

INSTALL_COMMAND = "pip install tensorrt-cu12   # CUDA 12 wheels from NVIDIA (or tensorrt-cu13 for CUDA 13)"
MIN_TENSORRT_MAJOR = 10


class TensorRTUnavailableError(RuntimeError):
    """TensorRT's Python package is missing or too old."""


class EngineBuildError(RuntimeError):
    """TensorRT rejected the graph or could not build an engine for it."""


@functools.cache
def import_tensorrt() -> ModuleType:
    """The `tensorrt` module, imported and checked once per process, or TensorRTUnavailableError naming the install
    command (raised again on every call)."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise TensorRTUnavailableError(
            f"TensorRT's Python package is not installed ({err}). Install it with:\n    {INSTALL_COMMAND}"
        ) from err
    version = getattr(trt, "__version__", "")
    if not hasattr(trt, "Builder") or int(version.split(".")[0] or 0) < MIN_TENSORRT_MAJOR:
        raise TensorRTUnavailableError(
            f"the installed tensorrt package ({version or 'no version'}) is not TensorRT "
            f">= {MIN_TENSORRT_MAJOR} with its Python API; install it with:\n    {INSTALL_COMMAND}"
        )
    return trt


def network_flags(trt: ModuleType) -> int:
    """create_network flags for a strongly typed network in TensorRT 10 and 11."""
    if int(trt.__version__.split(".")[0]) >= 11:
        return 0  # TensorRT 11 networks are always strongly typed
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def current_gpu() -> tuple[str, str]:
    """(name, "major.minor" compute capability) of the CUDA device TensorRT builds for."""
    if not torch.cuda.is_available():
        raise EngineBuildError("building a TensorRT engine needs a CUDA GPU, and PyTorch sees none")
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def build_engine(onnx_path: str | Path, engine_path: str | Path, optimization_level: int = 3,
                 workspace_gib: float | None = None, timing_cache: str | Path | None = None,
                 verbose: bool = False) -> EngineMetadata:
    """Build NAME.engine from an exported GuideSR graph and write NAME.engine.json; returns the metadata.

    `timing_cache` is loaded when the file exists and saved (updated) after the build, so later
    builds of the same layers on the same GPU and TensorRT skip the tactic timing. The graph and its
    external data are hashed (`graph_sha256`) before TensorRT parses them. The engine and its metadata are written
    by `publish_engine`, and the timing cache after them.
    """
    trt = import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    graph_metadata = read_metadata(onnx_path)
    graph_digest = graph_sha256(onnx_path)
    spec = GraphSpec.from_json(graph_metadata["graph_spec"])
    gpu_name, capability = current_gpu()
    ptx_isa = None
    if spec.trt_plugins:
        # imports onnx and the Triton kernels (torch._inductor, seconds): only for a graph with plugin nodes
        from .tensorrt_plugins import (PluginRegistrationError, graph_shape_problems, plugin_ptx_isa,
                                       register_fca_plugins)

        try:
            register_fca_plugins(trt)
            ptx_isa = plugin_ptx_isa(int(capability.replace(".", "")))
            largest = spec.inputs[0].max
            problems = graph_shape_problems(onnx_path, largest)
        except PluginRegistrationError as err:
            raise EngineBuildError(f"{onnx_path.name} holds FCA plugin nodes, and their TensorRT plugins cannot be "
                                   f"registered: {err}") from err
        if problems:
            raise EngineBuildError(f"{onnx_path.name}'s profile admits {spec.inputs[0].name} up to {list(largest)}, "
                                   f"past what its FCA plugin kernels address: {'; '.join(problems)}")

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}:\n{errors}")
    _check_io(network, spec, onnx_path)

    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if graph_metadata["precision"] == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        # fp32 means fp32: no TF32 tensor-core rounding. TensorRT 11's list of removed builder flags does
        # not name TF32, but its enum could not be checked here, hence the guard
        config.clear_flag(trt.BuilderFlag.TF32)
    profiles = []
    if any(-1 in tuple(network.get_input(i).shape) for i in range(network.num_inputs)):
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in spec.profile.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
        profiles.append({name: {"min": list(lo), "opt": list(op), "max": list(hi)}
                         for name, (lo, op, hi) in spec.profile.items()})
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise EngineBuildError(f"timing cache {cache_path} was made on another GPU or TensorRT version; delete it")

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path}; its log above says why")

    metadata = EngineMetadata(
        tensorrt_version=trt.__version__,
        gpu_name=gpu_name,
        compute_capability=capability,
        precision=graph_metadata["precision"],
        checkpoint_sha256=graph_metadata["checkpoint_sha256"],
        weights_sha256=graph_metadata["weights_sha256"],
        preset=graph_metadata["preset"],
        scale=int(graph_metadata["scale"]),
        size_multiple=int(graph_metadata["size_multiple"]),
        input_names=tuple(spec.input_names),
        output_names=tuple(spec.output_names),
        profiles=tuple(profiles),
        graph_spec=spec.to_json(),
        onnx_file=onnx_path.name,
        graph_sha256=graph_digest,
        builder_optimization_level=optimization_level,
        guidesr_version=graph_metadata["guidesr_version"],
        plugin_ptx_isa=ptx_isa,
    )
    publish_engine(engine_path, memoryview(serialized), metadata)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(cache_path, memoryview(config.get_timing_cache().serialize()))
    return metadata


def _check_io(network, spec: GraphSpec, onnx_path: Path) -> None:
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    if inputs != spec.input_names or outputs != spec.output_names:
        raise EngineBuildError(
            f"{onnx_path} has inputs {inputs} and outputs {outputs}; its graph spec declares "
            f"{spec.input_names} and {spec.output_names}"
        )

