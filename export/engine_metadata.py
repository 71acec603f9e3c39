"""What a serialized TensorRT engine was built for (NAME.engine.json), and the runtime's check of it.

A TensorRT engine runs only on the GPU model and TensorRT version that built it, and it holds the
weights of one checkpoint on one base model (`weights_sha256`: every tensor of the model its graph was
exported from). `tensorrt_build.build_engine` writes this file next to the engine; the runtime calls
`read` and `check_compatible` before deserializing, so a stale engine is refused with a message that
says what differs, instead of failing inside TensorRT or silently running old weights.
`check_built_from` refuses an engine next to a graph other than the one it was built from (`graph_sha256`:
the .onnx file and the external data files its weights are kept in). Nothing here imports TensorRT.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path, PurePath
from typing import Any, Iterator

from runtime.cli import write_whole

from .graphs import GraphSpec

FORMAT = "guidesr-tensorrt-engine"
FORMAT_VERSION = 4  # 2: plugin_ptx_isa; 3: graph_sha256 (with external data) replaces onnx_sha256; 4: weights_sha256
NO_CHECKPOINT = "none"  # checkpoint_sha256 of a model with untrained (random) weights
OTHER_WEIGHTS_CAUSE = "the same checkpoint on another --base-model, or untrained weights of another seed"


class EngineMetadataError(ValueError):
    """The metadata file is missing, unreadable or not a GuideSR engine description."""


class EngineMismatchError(RuntimeError):
    """The engine was built for another GPU, TensorRT version, checkpoint or weights, or from another ONNX graph."""


@dataclass(frozen=True)
class EngineMetadata:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "major.minor", e.g. "9.0"
    precision: str  # "fp32" | "fp16"
    checkpoint_sha256: str  # sha256 of the checkpoint's tensors, or NO_CHECKPOINT
    weights_sha256: str  # guidesr.checkpoint.weights_sha256 of the model the graph was exported from (base included)
    preset: str
    scale: int
    size_multiple: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    profiles: tuple[dict[str, dict[str, list[int]]], ...]  # per profile: input -> {"min", "opt", "max"}
    graph_spec: str  # GraphSpec JSON of the ONNX graph the engine was built from
    onnx_file: str  # name of the ONNX file the engine was built from
    graph_sha256: str  # ... and its graph_sha256
    builder_optimization_level: int
    guidesr_version: str
    plugin_ptx_isa: int | None = None  # the PTX ISA of the embedded plugin kernels (e.g. 87 for 8.7); None: no plugins
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def spec(self) -> GraphSpec:
        return GraphSpec.from_json(self.graph_spec)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def metadata_path(engine_path: str | Path) -> Path:
    """NAME.engine -> NAME.engine.json"""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def write(metadata: EngineMetadata, engine_path: str | Path) -> Path:
    path = metadata_path(engine_path)
    write_whole(path, metadata.to_json().encode())
    return path


def publish_engine(engine_path: Path, serialized: bytes | memoryview, metadata: EngineMetadata) -> None:
    """Write NAME.engine and NAME.engine.json for a new build: the previous metadata is removed first and each file
    appears whole (by rename), so a write that fails or is killed never leaves an engine next to the metadata of
    another build (the runtime would take that engine for the other build's checkpoint)."""
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    metadata_path(engine_path).unlink(missing_ok=True)
    write_whole(engine_path, serialized)
    write(metadata, engine_path)


def read(engine_path: str | Path) -> EngineMetadata:
    """The metadata of NAME.engine (read from NAME.engine.json), validated."""
    path = metadata_path(engine_path)
    if not path.is_file():
        raise EngineMetadataError(f"{path} does not exist; every GuideSR engine comes with its metadata file")
    try:
        data: Any = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EngineMetadataError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise EngineMetadataError(f"{path} is not a GuideSR engine description (format {FORMAT!r} expected)")
    if data.get("format_version") != FORMAT_VERSION:
        raise EngineMetadataError(
            f"{path} has format version {data.get('format_version')}, this guidesr reads version {FORMAT_VERSION}; "
            f"rebuild the engine with `make engine` (or `python -m export engine`)"
        )
    names = {f.name for f in fields(EngineMetadata)}
    missing, unknown = sorted(names - set(data)), sorted(set(data) - names)
    if missing or unknown:
        raise EngineMetadataError(f"{path}: missing fields {missing}, unknown fields {unknown}")
    for key in ("input_names", "output_names", "profiles"):
        data[key] = tuple(data[key])
    return EngineMetadata(**data)


def format_capability(capability: str | tuple[int, int]) -> str:
    """(9, 0) or "9.0" -> "9.0"."""
    if isinstance(capability, str):
        return capability
    major, minor = capability
    return f"{major}.{minor}"


def check_compatible(metadata: EngineMetadata, gpu_name: str, compute_capability: str | tuple[int, int],
                     trt_version: str, checkpoint_sha256: str | None, weights_sha256: str,
                     driver_ptx_isa: int | None = None) -> None:
    """Raise EngineMismatchError naming every way the engine does not fit this GPU, TensorRT and model.

    `checkpoint_sha256` is the loaded model's (None for an untrained model), `weights_sha256` its
    `guidesr.checkpoint.weights_sha256`. `driver_ptx_isa`: the newest
    PTX ISA this machine's CUDA driver compiles (None: unknown, not checked); the driver compiles the
    plugin kernels' PTX when the engine loads and refuses a newer ISA.
    """
    capability = format_capability(compute_capability)
    mismatches = []
    if (metadata.gpu_name, metadata.compute_capability) != (gpu_name, capability):
        mismatches.append(
            f"it was built on a {metadata.gpu_name} (compute capability {metadata.compute_capability}), "
            f"this GPU is a {gpu_name} (compute capability {capability})"
        )
    if metadata.tensorrt_version != trt_version:
        mismatches.append(
            f"it was built with TensorRT {metadata.tensorrt_version}, this is TensorRT {trt_version} "
            f"(an engine loads only in the version that built it)"
        )
    mismatches += _weights_mismatch(metadata, checkpoint_sha256, weights_sha256)
    if metadata.plugin_ptx_isa is not None and driver_ptx_isa is not None and driver_ptx_isa < metadata.plugin_ptx_isa:
        mismatches.append(
            f"its plugin kernels are PTX ISA {_isa(metadata.plugin_ptx_isa)}, and this machine's CUDA driver compiles "
            f"PTX up to ISA {_isa(driver_ptx_isa)} (a newer driver loads it too)"
        )
    if mismatches:
        raise EngineMismatchError(
            f"the TensorRT engine for {metadata.onnx_file} cannot be used: " + "; ".join(mismatches)
            + ". Rebuild it here with `make engine` (or `python -m export engine`) for this model."
        )


def check_model(metadata: EngineMetadata, preset: str, checkpoint_sha256: str | None, weights_sha256: str) -> None:
    """Raise EngineMismatchError when the engine holds another preset, checkpoint or weights than the model (no
    TensorRT needed: this part of `check_compatible` reads the metadata alone)."""
    mismatches = _weights_mismatch(metadata, checkpoint_sha256, weights_sha256)
    if metadata.preset != preset:
        mismatches.insert(0, f"it is preset {metadata.preset!r}, the model is preset {preset!r}")
    if mismatches:
        raise EngineMismatchError(f"the TensorRT engine for {metadata.onnx_file} holds another model: "
                                  + "; ".join(mismatches) + ". Pass the model it was built from, or rebuild it "
                                  "with `make engine` (or `python -m export engine`).")


def graph_sha256(onnx_path: str | Path) -> str:
    """The sha256 of an ONNX graph with its weights: the sha256 of the hex sha256 of the .onnx file followed by those of
    the external data files its tensors name, in the order of their locations. Raises ValueError as
    `external_data_files` does."""
    from guidesr.checkpoint import file_sha256  # guidesr imports diffusers (seconds): only when a graph is hashed

    files = [Path(onnx_path), *external_data_files(onnx_path)]
    return hashlib.sha256("".join(file_sha256(path) for path in files).encode()).hexdigest()


def external_data_files(onnx_path: str | Path, model: Any = None) -> list[Path]:
    """The external data files the tensors of the graph `onnx_path` name, in the order of their locations (`model`:
    the graph loaded without its external data, when the caller has it). Raises ValueError naming a tensor whose
    location is absolute or leads out of the graph's folder (`..`, a link), as onnx refuses such a location when it
    loads the data, and naming a missing data file; none of them is opened."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    onnx_path = Path(onnx_path)
    if model is None:
        model = onnx.load(str(onnx_path), load_external_data=False)
    tensor_of_location: dict[str, str] = {}
    for tensor in _model_tensors(model):
        if uses_external_data(tensor):
            tensor_of_location.setdefault(ExternalDataInfo(tensor).location, tensor.name)
    folder, files = onnx_path.parent.resolve(), []
    for location, tensor_name in sorted(tensor_of_location.items()):
        data_path = onnx_path.parent / location
        if PurePath(location).anchor or not data_path.resolve().is_relative_to(folder):
            raise ValueError(f"the graph {onnx_path} keeps its tensor {tensor_name!r} at {location!r}, outside its "
                             f"folder {folder}: ONNX external data is a file in the graph's folder, named by a "
                             f"relative location; export the graph again")
        if not data_path.is_file():
            raise ValueError(f"{data_path} does not exist: the graph {onnx_path} keeps its tensor {tensor_name!r} "
                             f"there (ONNX external data); export the graph again")
        files.append(data_path)
    return files


def _model_tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of the ModelProto `model`: the initializers and sparse initializers of its graph, the tensors
    in its nodes' attributes, and those of every subgraph (If, Loop, Scan bodies) and local function, at any depth."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for attribute in function.attribute_proto:
            yield from _attribute_tensors(attribute)
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: Any) -> Iterator[Any]:
    for attribute in node.attribute:
        yield from _attribute_tensors(attribute)


def _attribute_tensors(attribute: Any) -> Iterator[Any]:
    if attribute.HasField("t"):
        yield attribute.t
    yield from attribute.tensors
    sparse_tensors = [attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []
    for sparse in [*sparse_tensors, *attribute.sparse_tensors]:
        yield from (sparse.values, sparse.indices)
    subgraphs = [attribute.g] if attribute.HasField("g") else []
    for subgraph in [*subgraphs, *attribute.graphs]:
        yield from _graph_tensors(subgraph)


def check_built_from(metadata: EngineMetadata, engine_path: str | Path, onnx_path: str | Path) -> None:
    """Raise EngineMismatchError unless the engine was built from the graph `onnx_path`: its `graph_sha256` is the one
    `tensorrt_build.build_engine` recorded."""
    found = graph_sha256(onnx_path)
    if metadata.graph_sha256 != found:
        raise EngineMismatchError(
            f"the TensorRT engine {engine_path} was built from {metadata.onnx_file} ({_short(metadata.graph_sha256)}), "
            f"not from the graph {onnx_path} ({_short(found)}); the sha256 covers the .onnx file and its external "
            f"data, and an engine is checked only against the graph it was built from. Rebuild it with `make engine` "
            f"(or `python -m export engine` with the options that exported this graph), which exports the graph "
            f"again and builds the engine from it."
        )


def _weights_mismatch(metadata: EngineMetadata, checkpoint_sha256: str | None, weights_sha256: str) -> list[str]:
    """The checkpoint mismatch, or (same checkpoint) the weights mismatch; none when the engine holds the model's
    weights."""
    expected = checkpoint_sha256 or NO_CHECKPOINT
    if metadata.checkpoint_sha256 != expected:
        return [f"it holds the weights of checkpoint {_short(metadata.checkpoint_sha256)}, "
                f"the model asked for is {_short(expected)}"]
    if metadata.weights_sha256 != weights_sha256:
        return [f"it holds other weights than the model (weights {_short(metadata.weights_sha256)}, the model's are "
                f"{_short(weights_sha256)}): {OTHER_WEIGHTS_CAUSE}; pass the --base-model (or --seed) it was built "
                f"from"]
    return []


def _isa(version: int) -> str:
    return f"{version // 10}.{version % 10}"


def _short(sha256: str) -> str:
    return sha256 if sha256 == NO_CHECKPOINT else f"sha256 {sha256[:12]}…"
