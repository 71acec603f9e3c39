"""GuideSR -> ONNX: merge LoRA, rewrite, trace once per precision, derive the static/dynamic graphs.

    model --merged_copy, freeze_time_embedding, fold_unshuffle_projections--> ExportModule (fp32)
          --torch.onnx.export (TorchScript exporter, opset 18, dynamic axes)--> traced graph
          --fix_input_shapes (static only), fold_constants, [fp16: add_fp32_islands, fold_constants]-->
          --metadata, TensorRT op check, save, onnx.checker (full_check)--> NAME.onnx

The fp16 graph is the same prepared module after `.half()`, traced again. A spec with `trt_plugins`
gets its own trace, with the FCA blocks' channel attention as TensorRT plugin nodes
(export/plugin_nodes.py). docs/parts/export.md explains the choice of exporter (TorchScript over
dynamo) and of the single end-to-end graph.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import socket
import stat
import tempfile
import tomllib
import warnings
from collections.abc import Callable
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from guidesr.checkpoint import weights_sha256
from runtime.cli import plural

from .engine_metadata import OTHER_WEIGHTS_CAUSE, external_data_files
from .graphs import GraphSpec, guidesr_graph

if TYPE_CHECKING:
    import onnx_ir as ir

    from guidesr.model import GuideSR

# onnx, onnx_ir, onnxscript, peft, diffusers (through guidesr.model) and the Triton kernels (through plugin_nodes:
# torch._inductor) take seconds to import; they are imported where a graph is built or read, so that
# `python -m export --help` and its usage errors come back at once.

OPSET = 18
PRECISIONS = ("fp32", "fp16")  # fp32 first: the fp16 graph is traced from the same module after .half()
EXTERNAL_DATA_BYTES = 1 << 30  # weights beyond this go to NAME.onnx.data (protobuf's limit is 2 GiB)
SCRATCH_PREFIX = ".trace-"  # scratch folders in the output folder: .trace-PID-HOST-RANDOM


class ExportModule(nn.Module):
    """image [B, 3, H, W] float32 in [-1, 1] -> R1, float32, for H and W multiples of size_multiple.

    At such sizes GuideSR's padding is a no-op, so the trace records none; the graph spec declares
    the multiples and the runtime tiles at them. R2 (training only) is not an output.
    """

    def __init__(self, model: GuideSR):
        super().__init__()
        self.model = model

    @property
    def dtype(self) -> torch.dtype:
        return self.model.guidance.head.weight.dtype

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image.to(self.dtype)).r1.float()


def prepare_for_export(model: GuideSR) -> ExportModule:
    """A merged, rewritten fp32 copy of `model` wrapped for tracing; `model` is not changed."""
    from .merge import merged_copy
    from .rewrites import fold_unshuffle_projections, freeze_time_embedding

    prepared = merged_copy(model).float().eval()
    freeze_time_embedding(prepared)
    fold_unshuffle_projections(prepared)
    return ExportModule(prepared).eval()


@dataclass(frozen=True)
class ExportedGraph:
    path: Path
    spec: GraphSpec
    precision: str


def graph_filename(preset: str, spec: GraphSpec, precision: str) -> str:
    """e.g. tiny-static-b1-512x512-fp16.onnx, sd-turbo-dynamic-512x512-fp32.onnx (tile = opt shape),
    tiny-static-b1-512x512-fp16-trtplugins.onnx for a graph with TensorRT plugin nodes."""
    height, width = spec.tile
    batch = f"-b{spec.inputs[0].opt[0]}" if spec.variant == "static" else ""
    plugins = "-trtplugins" if spec.trt_plugins else ""
    return f"{preset}-{spec.variant}{batch}-{height}x{width}-{precision}{plugins}.onnx"


def export_graphs(model: GuideSR, out_dir: str | Path, specs: list[GraphSpec], precisions=PRECISIONS,
                  weights: str = "checkpoint", weights_digest: str | None = None,
                  on_published: Callable[[ExportedGraph], None] | None = None) -> list[ExportedGraph]:
    """Write one ONNX file per (precision, spec) into `out_dir`; one trace per precision serves all specs.

    `weights` says where the weights came from (stored in the metadata next to the checkpoint's sha256);
    `weights_digest`: the model's `weights_sha256`, when the caller has computed it (else it is computed here, of the
    model as given, before LoRA is merged into the copy that is traced); `on_published` is called with each graph as
    soon as it is in place. The scratch folders of exports into `out_dir` that were killed are removed first
    (`remove_dead_scratch`).
    """
    import onnx_ir as ir

    from .plugin_nodes import fca_plugin_nodes

    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise ValueError(f"unknown precisions {sorted(unknown)}; choose from {PRECISIONS}")
    size_multiple = model.config.size_multiple
    for spec in specs:
        if spec.size_multiple != size_multiple:
            raise ValueError(f"graph spec for size multiple {spec.size_multiple}, the model needs {size_multiple}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_dead_scratch(out_dir)
    trace_spec = guidesr_graph(size_multiple, (size_multiple, size_multiple), "dynamic")
    if weights_digest is None:
        weights_digest = weights_sha256(model)
    prepared = prepare_for_export(model)
    exported = []
    for precision in (p for p in PRECISIONS if p in precisions):
        if precision == "fp16":
            prepared.half()
        for trt_plugins in sorted({spec.trt_plugins for spec in specs}):
            nodes = fca_plugin_nodes(prepared) if trt_plugins else nullcontext()
            with tempfile.TemporaryDirectory(dir=out_dir, prefix=scratch_prefix()) as scratch, nodes:
                traced = Path(scratch) / "traced.onnx"
                trace(prepared, trace_spec, traced)
                for spec in (s for s in specs if s.trt_plugins == trt_plugins):
                    path = out_dir / graph_filename(model.config.preset, spec, precision)
                    metadata = graph_metadata(model, spec, precision, weights, weights_digest)
                    staged = Path(scratch) / path.name
                    finish_graph(ir.load(traced), spec, precision, metadata, staged)
                    publish_graph(staged, path)
                    exported.append(ExportedGraph(path, spec, precision))
                    if on_published is not None:
                        on_published(exported[-1])
    return exported


def scratch_prefix() -> str:
    """The name of this process's scratch folders up to mkdtemp's random part: SCRATCH_PREFIX, then the process id
    and host name of their owner, which `remove_dead_scratch` reads."""
    return f"{SCRATCH_PREFIX}{os.getpid()}-{socket.gethostname()}-"


def scratch_owner(name: str) -> tuple[int, str] | None:
    """(process id, host name) of the export that made the scratch folder called `name`, or None for a name that does
    not record them (not a scratch folder, or one made by a guidesr older than the owner in the name)."""
    if not name.startswith(SCRATCH_PREFIX):
        return None
    pid, _, rest = name.removeprefix(SCRATCH_PREFIX).partition("-")
    host, _, random_part = rest.rpartition("-")
    if not (pid.isdecimal() and host and random_part):
        return None
    return int(pid), host


def process_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this host (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def remove_dead_scratch(out_dir: Path) -> None:
    """Remove the scratch folders in `out_dir` that exports killed on this host left (SIGKILL runs no cleanup): those of
    this user whose owner process (`scratch_owner`) no longer runs. A folder of a running export, of another host (the
    folder may be shared) or of another user, or one without an owner in its name, is left alone. Each is first renamed
    into a scratch folder of this process, so two exports never remove the same one and a removal that is itself
    killed leaves a folder whose owner is dead."""
    host, uid = socket.gethostname(), os.getuid()
    dead = []
    for folder in out_dir.glob(f"{SCRATCH_PREFIX}*"):
        owner = scratch_owner(folder.name)
        if owner is None or owner[1] != host or process_alive(owner[0]):
            continue
        try:
            info = folder.lstat()
        except FileNotFoundError:  # another export removed it first
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == uid:
            dead.append(folder)
    if not dead:
        return
    removal = Path(tempfile.mkdtemp(dir=out_dir, prefix=scratch_prefix()))
    for index, folder in enumerate(dead):
        with suppress(FileNotFoundError):  # another export took it first
            folder.rename(removal / str(index))
    shutil.rmtree(removal)


def trace(module: ExportModule, spec: GraphSpec, path: Path) -> None:
    """torch.onnx.export with the TorchScript exporter at the spec's smallest input shape.

    Every axis is traced as dynamic; `finish_graph` fixes them for a static graph. Tracing at the
    smallest shape keeps it cheap (the trace runs the model once).
    """
    example = torch.zeros(spec.inputs[0].min, dtype=torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        # the legacy-exporter notice, tracer notes about Python values in diffusers' shape code, and
        # the exporter's own note that it leaves strided Slices (F.pad's) to the later folding
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(
            module, (example,), str(path), dynamo=False, opset_version=OPSET,
            input_names=spec.input_names, output_names=spec.output_names, dynamic_axes=spec.dynamic_axes,
        )


def finish_graph(model: ir.Model, spec: GraphSpec, precision: str, metadata: dict[str, str], path: Path) -> None:
    """Shape-fix (static), type the plugin nodes (trt_plugins), fold, add fp32 islands (fp16), check against
    TensorRT, save and check."""
    import onnx
    import onnx_ir as ir

    from .fp16 import add_fp32_islands
    from .plugin_nodes import PLUGIN_OPS, type_plugin_outputs
    from .rewrites import fix_input_shapes, fold_constants
    from .trt_supported_ops import tensorrt_problems

    if spec.variant == "static":
        fix_input_shapes(model, spec)
    if spec.trt_plugins and not type_plugin_outputs(model):
        raise RuntimeError(f"{path.name} was asked for TensorRT plugin nodes, but the trace has none")
    fold_constants(model)
    if precision == "fp16":
        add_fp32_islands(model)
        fold_constants(model)
    problems = tensorrt_problems(model, PLUGIN_OPS if spec.trt_plugins else frozenset())
    if problems:
        raise RuntimeError(f"{path.name} has {plural(len(problems), 'op')} TensorRT cannot parse: "
                           + "; ".join(problems[:10]))
    model.graph.name = spec.name
    model.producer_name = "guidesr.export"
    model.metadata_props.update(metadata)
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    external = path.name + ".data" if weight_bytes > EXTERNAL_DATA_BYTES else None
    ir.save(model, path, external_data=external)
    onnx.checker.check_model(str(path), full_check=True)


def publish_graph(staged: Path, path: Path) -> None:
    """Move a saved and checked graph, with its external data, from the scratch folder to `path` (same file system):
    an export that fails its checks leaves the previous graph at `path`, never a partial one. A graph and its
    NAME.onnx.data are two renames: when either graph has external data, the previous graph is removed before the data
    is replaced, so an export killed between them leaves no graph rather than the previous graph reading this export's
    weights (nothing checks that a graph's external data is the one it was saved with)."""
    staged_data, data = (file.with_name(file.name + ".data") for file in (staged, path))
    if staged_data.exists() or data.exists():
        path.unlink(missing_ok=True)
        if staged_data.exists():
            staged_data.replace(data)
        else:
            data.unlink()  # an earlier export's external data, which this graph does not use
    staged.replace(path)


def graph_metadata(model: GuideSR, spec: GraphSpec, precision: str, weights: str,
                   weights_digest: str) -> dict[str, str]:
    """The graph's metadata_props; `weights_digest` is the `weights_sha256` of `model` as it was given to the export."""
    descriptor = model.descriptor
    return {
        "preset": descriptor.preset,
        "scale": str(descriptor.scale),
        "size_multiple": str(descriptor.size_multiple),
        "precision": precision,
        "checkpoint_sha256": descriptor.checkpoint_sha256 or "none",
        "weights_sha256": weights_digest,
        "weights": weights,
        "guidesr_version": guidesr_version(),
        "graph_spec": spec.to_json(),
        "input_range": json.dumps(list(descriptor.input_range)),
    }


REQUIRED_METADATA = ("preset", "size_multiple", "precision", "checkpoint_sha256", "graph_spec", "weights_sha256")
ADDED_METADATA = ("weights_sha256",)  # required keys that graphs exported by an older guidesr lack


class OutdatedGraphError(ValueError):
    """A GuideSR graph exported by an older guidesr: its metadata lacks keys of ADDED_METADATA."""


def other_weights_problem(graph_name: str, metadata: dict[str, str], model_weights: str, model_name: str) -> str | None:
    """Why the graph (its `read_metadata`) holds other weights than the model called `model_name` whose
    `weights_sha256` is `model_weights`, or None when it holds the same."""
    if metadata["weights_sha256"] == model_weights:
        return None
    return (f"{graph_name} holds other weights than {model_name} (weights {metadata['weights_sha256'][:12]}, the "
            f"model's are {model_weights[:12]}): {OTHER_WEIGHTS_CAUSE}; pass the --base-model (or --seed) it was "
            f"exported from")


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of a graph written by `python -m export onnx` (without loading its weights).

    Raises OutdatedGraphError for a graph exported by an older guidesr (it asks for a new export), ValueError naming
    the missing keys for any other ONNX file, and as `external_data_files` does for a graph whose external data is
    missing or outside its folder.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing and set(missing) <= set(ADDED_METADATA):
        raise OutdatedGraphError(f"{Path(path).name} was exported by an older guidesr: its metadata lacks "
                                 f"{', '.join(missing)} (the sha256 of the weights it holds), so it cannot be checked "
                                 f"against the model; export it again (`python -m export onnx`)")
    if missing:
        raise ValueError(f"{Path(path).name} is not a GuideSR graph written by `python -m export onnx` "
                         f"(its metadata lacks {', '.join(missing)})")
    external_data_files(path, model)
    return metadata


def guidesr_version() -> str:
    """The installed distribution's version, else the source tree's pyproject.toml."""
    try:
        return importlib.metadata.version("guidesr")
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]
