"""Polygraphy comparison of exported graphs (and a TensorRT engine) against the PyTorch reference.

Runners, all driven by `polygraphy.comparator.Comparator` on the same inputs:

- `TorchRunner` (here): the PyTorch model, the reference. Polygraphy's own `PytRunner` moves every
  input to CUDA unconditionally, so it cannot run on a CPU-only machine.
- `OnnxrtRunner(SessionFromOnnx(graph))`: the ONNX graph on ONNX Runtime's CPU provider.
- `TrtRunner(EngineFromBytes(BytesFromPath(engine)))`: the engine, when TensorRT is installed; it is
  compared with both the reference and the ONNX graph it was built from.

Criteria on R1: fp32 graphs max |R1 - R1_ref| <= 1e-4 (`SimpleCompareFunc`); fp16 graphs and
engines PSNR >= 40 dB on R1 mapped to [0, 1] (`PsnrCompareFunc`; polygraphy takes the reference's
maximum as the peak, which for [0, 1] images is at most 1, so its PSNR never exceeds the usual one).
The table also prints max-abs and the usual PSNR ("at peak 1") for every pair, next to the criterion.

ONNX Runtime's CPU provider has no fp16 kernels for most ops (Conv, MatMul, Gemm, Add, Mul, ...):
it inserts Casts and runs them in fp32, keeping fp16 only in the tensors between them. The fp16
check on CPU therefore covers the graph's fp16 storage and its islands, not fp16 arithmetic
inside those ops; `ort_fp32_fallback_ops` lists them and `python -m export verify` prints them.
"""

from __future__ import annotations

import collections
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn.functional as F
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, PsnrCompareFunc, SimpleCompareFunc
from polygraphy.datatype import DataType

from guidesr.checkpoint import weights_sha256
from guidesr.model import GuideSR

from . import engine_metadata
from .graphs import INPUT_NAME, OUTPUT_NAME, GraphSpec
from .onnx_export import other_weights_problem, read_metadata

FP32_MAX_ABS = 1e-4
FP16_MIN_PSNR = 40.0


class TorchRunner(BaseRunner):
    """Polygraphy runner for the PyTorch model on whatever device it is on (image -> R1)."""

    def __init__(self, model: GuideSR, name: str = "pytorch"):
        super().__init__(name=name, prefix="pytorch-runner")
        self.model = model.eval()
        self.device = next(model.parameters()).device

    def activate_impl(self):
        pass

    def get_input_metadata_impl(self):
        return TensorMetadata().add(INPUT_NAME, dtype=DataType.FLOAT32, shape=(-1, 3, -1, -1))

    def infer_impl(self, feed_dict):
        image = torch.from_numpy(feed_dict[INPUT_NAME]).to(self.device)
        start = time.perf_counter()
        with torch.no_grad():
            r1 = self.model(image).r1
        self.inference_time = time.perf_counter() - start
        return collections.OrderedDict({OUTPUT_NAME: r1.float().cpu().contiguous().numpy()})  # Polygraphy views it

    def deactivate_impl(self):
        pass


@dataclass(frozen=True)
class Comparison:
    reference: str
    candidate: str
    precision: str
    shape: tuple[int, ...]
    max_abs: float
    psnr: float
    finite: bool
    passed: bool  # polygraphy's verdict on the criterion, and every value finite
    criterion: str

    def describe(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        shape = "x".join(str(s) for s in self.shape)
        return (f"{verdict}  {self.candidate} vs {self.reference} [{shape}]  max-abs {self.max_abs:.3g}  "
                f"PSNR {self.psnr:.2f} dB at peak 1  ({self.criterion}{'' if self.finite else '; NaN/Inf in output'})")


def psnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    """PSNR in dB of images in [-1, 1], measured in [0, 1] (peak 1)."""
    mse = float(np.mean(np.square((candidate.astype(np.float64) - reference.astype(np.float64)) / 2)))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def sample_images(shapes: list[tuple[int, ...]]) -> list[collections.OrderedDict]:
    """Feed dicts with scikit-image's astronaut photo resized to each [B, 3, H, W] shape, in [-1, 1]."""
    from skimage import data

    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 127.5 - 1
    feeds = []
    for batch, _, height, width in shapes:
        image = F.interpolate(photo, size=(height, width), mode="bicubic", align_corners=False).clamp(-1, 1)
        feeds.append(collections.OrderedDict({INPUT_NAME: image.expand(batch, -1, -1, -1).contiguous().numpy()}))
    return feeds


def graph_shapes(spec: GraphSpec, sizes: list[tuple[int, int]] | None) -> list[tuple[int, ...]]:
    """The shapes to test a graph at: a static graph's own shape, or each (H, W) of `sizes` at batch 1; without
    `sizes`, a dynamic graph's opt shape and one of half its height (at least its min), from the graph's own spec."""
    if spec.variant == "static":
        return [spec.inputs[0].opt]
    if sizes is None:
        _, _, height, width = spec.inputs[0].opt
        half = max(spec.inputs[0].min[2], height // 2 // spec.size_multiple * spec.size_multiple)
        sizes = list(dict.fromkeys([(height, width), (half, width)]))
    shapes = [(1, 3, height, width) for height, width in sizes]
    for shape in shapes:
        spec.check_input_shape(shape)
    return shapes


def compare(model: GuideSR, onnx_path: str | Path, sizes: list[tuple[int, int]] | None,
            engine_path: str | Path | None = None, graph_metadata: dict[str, str] | None = None,
            checked_engine: engine_metadata.EngineMetadata | None = None,
            weights_digest: str | None = None) -> list[Comparison]:
    """Run the reference, the ONNX graph on ONNX Runtime (and the engine) through Polygraphy.

    The graph is refused (ValueError) unless it holds the model's checkpoint and weights (`weights_sha256`). The engine
    is refused (EngineMismatchError) unless it was built from this graph (`check_built_from`), before TensorRT is
    imported, and then unless it fits this GPU, TensorRT and model. `graph_metadata`: the graph's `read_metadata`,
    when the caller has read it already; `checked_engine`: the engine's metadata, when the caller has read it and
    checked it with `check_built_from` already; `weights_digest`: the model's `weights_sha256`, when the caller has
    computed it.
    """
    onnx_path = Path(onnx_path)
    metadata = read_metadata(onnx_path) if graph_metadata is None else graph_metadata
    spec, precision = GraphSpec.from_json(metadata["graph_spec"]), metadata["precision"]
    if weights_digest is None:
        weights_digest = weights_sha256(model)
    problem = other_model_problem(model, onnx_path, metadata, weights_digest)
    if problem is not None:
        raise ValueError(problem)
    shapes = graph_shapes(spec, sizes)
    session = SessionFromOnnx(str(onnx_path), providers=["cpu"])
    runners = [TorchRunner(model), OnnxrtRunner(session, name=onnx_path.name)]
    if engine_path is not None:
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        from .tensorrt_build import current_gpu, import_tensorrt
        from .tensorrt_plugins import driver_ptx_isa

        built = checked_engine
        if built is None:
            built = engine_metadata.read(engine_path)
            engine_metadata.check_built_from(built, engine_path, onnx_path)
        engine_metadata.check_compatible(built, *current_gpu(), import_tensorrt().__version__,
                                         model.descriptor.checkpoint_sha256, weights_digest, driver_ptx_isa())
        runners.append(TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))), name=Path(engine_path).name))
    results = Comparator.run(runners, data_loader=sample_images(shapes))
    pairs = [(0, i) for i in range(1, len(runners))] + ([(1, 2)] if len(runners) == 3 else [])
    outputs = {runner.name: [iteration[OUTPUT_NAME].copy() for iteration in results[runner.name]] for runner in runners}

    if precision == "fp32":
        criterion = f"max-abs <= {FP32_MAX_ABS:g}"
        compare_func = SimpleCompareFunc(atol=FP32_MAX_ABS, rtol=0.0, check_error_stat="max")
    else:
        criterion = f"Polygraphy's PSNR, peak the reference's maximum, >= {FP16_MIN_PSNR:g} dB"
        compare_func = PsnrCompareFunc(psnr_threshold=FP16_MIN_PSNR)
        results = Comparator.postprocess(results, _to_unit_range)
    accuracy = Comparator.compare_accuracy(results, comparisons=pairs, compare_func=compare_func)[0]

    comparisons = []
    for first, second in pairs:
        names = runners[first].name, runners[second].name
        for iteration, shape in enumerate(shapes):
            reference, candidate = outputs[names[0]][iteration], outputs[names[1]][iteration]
            finite = bool(np.isfinite(candidate).all())
            comparisons.append(Comparison(
                reference=names[0], candidate=names[1], precision=precision, shape=tuple(shape),
                max_abs=float(np.abs(candidate - reference).max()), psnr=psnr(reference, candidate), finite=finite,
                passed=finite and bool(accuracy[names][iteration][OUTPUT_NAME]), criterion=criterion,
            ))
    return comparisons


def other_model_problem(model: GuideSR, onnx_path: Path, metadata: dict[str, str], weights_digest: str) -> str | None:
    """Why the graph at `onnx_path` (`metadata`: its `read_metadata`) cannot be compared with `model`, whose
    `weights_sha256` is `weights_digest`: it holds another checkpoint or other weights; None when it holds the
    model's."""
    expected = model.descriptor.checkpoint_sha256 or "none"
    if metadata["checkpoint_sha256"] != expected:
        return (f"{onnx_path.name} was exported from checkpoint {metadata['checkpoint_sha256'][:12]}, the reference "
                f"model is {expected[:12]}; compare a graph with the model it came from")
    problem = other_weights_problem(onnx_path.name, metadata, weights_digest, "the reference model")
    return None if problem is None else f"{problem}, or export it again from this model"


def _to_unit_range(iteration_result):
    iteration_result[OUTPUT_NAME] = (iteration_result[OUTPUT_NAME] + 1) / 2
    return iteration_result


def ort_fp32_fallback_ops(onnx_path: str | Path) -> collections.Counter:
    """Op types of an fp16 graph that ONNX Runtime's CPU provider runs through fp32 kernels.

    ONNX Runtime saves the graph it executes (before optimisations, with the Casts it inserted);
    a node of the graph whose fp16 inputs arrive as float32 there runs on an fp32 kernel.
    """
    source = _element_types(onnx.load(str(onnx_path), load_external_data=False))
    with tempfile.TemporaryDirectory() as scratch:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.optimized_model_filepath = str(Path(scratch) / "cpu.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "cpu.onnx.data")
        onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        executed = onnx.load(options.optimized_model_filepath, load_external_data=False)
    types = _element_types(executed)
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    return collections.Counter(
        node.op_type for node in executed.graph.node
        if node.op_type != "Cast" and node.name in source["nodes"]
        and any(source["values"].get(original) == fp16 and types["values"].get(name) == fp32
                for original, name in zip(source["nodes"][node.name], node.input))
    )


def _element_types(model: onnx.ModelProto) -> dict:
    """{"values": tensor name -> element type, "nodes": node name -> its input names} after shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    values = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    values.update({t.name: t.data_type for t in graph.initializer})
    return {"values": values, "nodes": {node.name: list(node.input) for node in graph.node}}
