"""Issue 4: the LoRA merge and every equivalent rewrite leave GuideSR's output unchanged (fp32)."""

import copy

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime
import pytest
import torch

from export.fp16 import FP32_ISLANDS, add_fp32_islands
from export.graphs import guidesr_graph
from export.merge import lora_layer_names, merged_copy
from export.onnx_export import prepare_for_export, trace
from export.rewrites import (
    FrozenTimeEmbedding,
    StridedGuidanceInjection,
    fix_input_shapes,
    fold_constants,
    fold_unshuffle_projections,
    freeze_time_embedding,
)
from guidesr.injection import GuidanceInjection
from helpers import randomized_tiny


def image(height: int, width: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def model():
    return randomized_tiny(0)


@pytest.fixture(scope="module")
def tolerance(model):
    """What "equal in fp32" means for this model: max(1e-5, 2 x max |R1_fp32 - R1_fp64|) at 64x64.

    Every rewrite here is exact algebra but reorders fp32 arithmetic (W x + B A x -> (W + B A) x,
    a [B, D] GEMM -> a [1, D] one, another kernel in ONNX Runtime), which moves R1 by about as much
    as the model's own fp32 rounding (~1e-5 for the random tiny model). tests/test_model.py bounds
    model.merge_lora the same way.
    """
    x = image(64, 64)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double()).r1
        return max(1e-5, 2 * (model(x).r1.double() - exact).abs().max().item())


def test_merged_copy_keeps_output_and_holds_plain_weights(model, tolerance):
    """Acceptance 1: merged vs unmerged within fp32 tolerance, plain weights only."""
    x = image(64, 64)
    with torch.no_grad():
        before = model(x).r1
        merged = merged_copy(model)
        after = merged(x).r1
        unchanged = model(x).r1
    assert lora_layer_names(model), "the fixture model has LoRA layers"
    assert lora_layer_names(merged) == []
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    merged_weight = merged.unet.conv_in.weight
    base_weight = model.unet.conv_in.base_layer.weight
    assert (merged_weight - base_weight).abs().max() > 1e-4, "the random LoRA update was folded in"
    assert torch.equal(before, unchanged), "merged_copy leaves the original model alone"
    assert (after - before).abs().max().item() <= tolerance


@pytest.mark.parametrize("index", [0, 1])
def test_strided_injection_is_exact_algebra(model, index):
    """h + P(cat(h, PixelUnshuffle(n, s))) == h + P_h(h) + Conv_sxs,stride s(n), to fp64 rounding."""
    injection = copy.deepcopy(model.injections[index]).double()
    assert isinstance(injection, GuidanceInjection) and injection.project.weight.abs().max() > 0
    strided = StridedGuidanceInjection(injection)
    s, channels = injection.scale, injection.project.out_channels
    generator = torch.Generator().manual_seed(index)
    hidden = torch.randn(2, channels, 3, 5, generator=generator, dtype=torch.float64)
    guidance = torch.randn(2, 32, 3 * s, 5 * s, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        expected, got = injection(hidden, guidance), strided(hidden, guidance)
    assert strided.project_guidance.kernel_size == (s, s) and strided.project_guidance.stride == (s, s)
    assert (got - expected).abs().max().item() <= 1e-12 * expected.abs().max().item()


def test_fold_unshuffle_projections_keeps_model_output(model, tolerance):
    x = image(48, 80)
    rewritten = merged_copy(model)
    with torch.no_grad():
        before = rewritten(x).r1
        fold_unshuffle_projections(rewritten)
        after = rewritten(x).r1
    assert all(isinstance(m, StridedGuidanceInjection) for m in rewritten.injections)
    assert (after - before).abs().max().item() <= tolerance


def test_frozen_time_embedding_keeps_model_output(model, tolerance):
    x = image(32, 48, batch=2)
    rewritten = merged_copy(model)
    with torch.no_grad():
        before = rewritten(x).r1
        freeze_time_embedding(rewritten)
        after = rewritten(x).r1
    frozen = rewritten.unet.time_embedding
    assert isinstance(frozen, FrozenTimeEmbedding) and frozen.embedding.shape[0] == 1
    assert (after - before).abs().max().item() <= tolerance


# ------------------------------------------------------------------------------------- graph level


@pytest.fixture(scope="module")
def traced(model, tmp_path_factory):
    """The prepared tiny model traced with dynamic axes, before any graph-level rewrite."""
    path = tmp_path_factory.mktemp("trace") / "traced.onnx"
    trace(prepare_for_export(model), guidesr_graph(16, (16, 16), "dynamic"), path)
    return path


def run(model: ir.Model | str, x: torch.Tensor) -> np.ndarray:
    source = ir.to_proto(model).SerializeToString() if isinstance(model, ir.Model) else str(model)
    session = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.numpy()})[0]


def test_constant_folding_keeps_output_and_folds_the_time_embedding(traced, tolerance):
    x = image(32, 48, batch=2)
    folded = ir.load(traced)
    fold_constants(folded)
    raw_ops = [node.op_type for node in ir.load(traced).graph]
    ops = [node.op_type for node in folded.graph]
    assert len(ops) < len(raw_ops) * 0.7
    assert not {"Sin", "Cos", "Constant", "ConstantOfShape", "Identity"} & set(ops)
    # the time embedding's MLP and every ResNet's projection of it are gone: the Gemms left are FCA's gates
    assert ops.count("Gemm") == 4
    for node in folded.graph:
        inputs = [v for v in node.inputs if v is not None]
        assert not inputs or not all(v.const_value is not None for v in inputs), f"{node.name} was left unfolded"
    assert np.abs(run(folded, x) - run(traced, x)).max() <= tolerance


def test_constant_folding_folds_gemms_on_sd_turbo_sized_weights():
    """SD-Turbo's time MLP multiplies by 1280 x 320 and 1280 x 1280 weights, above onnxscript's default input limit
    (8192 elements); the tiny model's are below it, so the test above cannot tell. A Gemm on such constants
    must fold into the initializer the graph adds."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    sinusoid, weight = rng.standard_normal((1, 320), np.float32), rng.standard_normal((1280, 320), np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["sinusoid", "weight"], ["embedding"], transB=1),
         helper.make_node("Add", ["x", "embedding"], ["y"])],
        "time_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1280])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1280])],
        [numpy_helper.from_array(sinusoid, "sinusoid"), numpy_helper.from_array(weight, "weight")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    fold_constants(model)
    assert [node.op_type for node in model.graph] == ["Add"]
    (folded,) = [v.const_value.numpy() for v in model.graph.initializers.values()]
    np.testing.assert_allclose(folded.reshape(1, 1280), sinusoid @ weight.T, rtol=1e-5, atol=1e-4)


def test_fixed_input_shapes_make_every_shape_constant(traced, tolerance):
    x = image(48, 32)
    static, dynamic = ir.load(traced), ir.load(traced)
    fix_input_shapes(static, guidesr_graph(16, (48, 32), "static"))
    fold_constants(static)
    fold_constants(dynamic)
    assert "Shape" in {node.op_type for node in dynamic.graph}
    assert not {"Shape", "Gather", "Expand", "Where"} & {node.op_type for node in static.graph}
    assert static.graph.inputs[0].shape == ir.Shape([1, 3, 48, 32])
    assert np.abs(run(static, x) - run(dynamic, x)).max() <= tolerance
    with pytest.raises(onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument):
        run(static, image(32, 48))


def test_fp32_islands_leave_an_fp32_graph_alone(traced):
    model = ir.load(traced)
    fold_constants(model)
    nodes = len(model.graph)
    assert add_fp32_islands(model) == 0
    assert len(model.graph) == nodes


def fp16_graph(nodes, output: str = "y") -> ir.Model:
    """An fp16 graph on x [2, 4, 3, 5] with fp16 norm parameters, types inferred."""
    from onnx import TensorProto, helper, numpy_helper

    initializers = [numpy_helper.from_array(array, name) for name, array in fp16_parameters().items()]
    initializers.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
    graph = helper.make_graph(
        [helper.make_node(*node[:3], **node[3]) if len(node) > 3 else helper.make_node(*node) for node in nodes],
        "islands", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 4, 3, 5])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT16, None)], initializers)
    # IR version 8, as the exported graphs have: onnx's newer default is more than onnxruntime 1.30 (IR <= 13) reads
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8))
    fold_constants(model)
    return model


def fp16_parameters() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(size).astype(np.float16)
            for name, size in (("in_scale", 4), ("in_bias", 4), ("ln_scale", 5), ("ln_bias", 5))}


ISLAND_NODES = [
    ("InstanceNormalization", ["x", "in_scale", "in_bias"], ["normed"], {"epsilon": 1e-5}),
    ("Softmax", ["normed"], ["soft"], {"axis": -1}),
    ("ReduceMean", ["x", "axes"], ["mean"], {"keepdims": 1}),
    ("LayerNormalization", ["x", "ln_scale", "ln_bias"], ["layer"], {"axis": -1, "epsilon": 1e-5}),
    ("Add", ["soft", "mean"], ["sum"]),
    ("Add", ["sum", "layer"], ["y"]),
]


def islands_reference(x: np.ndarray) -> np.ndarray:
    """ISLAND_NODES in float64."""
    p = {name: a.astype(np.float64) for name, a in fp16_parameters().items()}

    def normalise(v, axes):
        return (v - v.mean(axes, keepdims=True)) / np.sqrt(v.var(axes, keepdims=True) + 1e-5)

    normed = normalise(x, (2, 3)) * p["in_scale"][:, None, None] + p["in_bias"][:, None, None]
    soft = np.exp(normed - normed.max(-1, keepdims=True))
    soft /= soft.sum(-1, keepdims=True)
    layer = normalise(x, (-1,)) * p["ln_scale"] + p["ln_bias"]
    return soft + x.mean((2, 3), keepdims=True) + layer


def test_fp32_islands_compute_each_listed_op_in_fp32_between_casts():
    """Every input of an island op is fp32 (one shared Cast per fp16 value), every output goes
    through a Cast to fp16."""
    model = fp16_graph(ISLAND_NODES)
    assert add_fp32_islands(model) == 4
    assert [node.op_type for node in model.graph if node.inputs and node.inputs[0].name == "x"] == ["Cast"]
    for node in model.graph:
        if node.op_type in FP32_ISLANDS:
            floating = [v for v in node.inputs if v is not None and v.dtype != ir.DataType.INT64]
            assert {v.dtype for v in (*floating, *node.outputs)} == {ir.DataType.FLOAT}, node.op_type
            assert [(user.op_type, user.outputs[0].dtype) for user, _ in node.outputs[0].uses()] == [
                ("Cast", ir.DataType.FLOAT16)]
            assert all(v.shape is not None for user, _ in node.outputs[0].uses() for v in user.outputs)
    fold_constants(model)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    x = (np.random.default_rng(1).standard_normal((2, 4, 3, 5)) * 3).astype(np.float16)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float64), islands_reference(x.astype(np.float64)), atol=2e-2)


@pytest.mark.parametrize("nodes, output, message", [
    ([("Softmax", ["x"], ["y"], {"axis": -1})], "y", "graph output"),
    ([("Softmax", ["x"], ["soft"], {"axis": -1}), ("Relu", ["soft"], ["y"])], "y", "unknown type"),
])
def test_fp32_islands_refuse_graph_outputs_and_untyped_values(nodes, output, message):
    """An island op may not produce a graph output, and needs inferred output types."""
    model = fp16_graph(nodes, output)
    if message == "unknown type":
        next(iter(model.graph)).outputs[0].dtype = None
    with pytest.raises(ValueError, match=message):
        add_fp32_islands(model)


def test_fp32_islands_leave_other_domains_alone():
    """An op of another domain named like an island op (a plugin) keeps its fp16 types."""
    model = fp16_graph([("Softmax", ["x"], ["soft"], {"axis": -1}), ("Relu", ["soft"], ["y"])])
    softmax = next(iter(model.graph))
    softmax.domain = "guidesr"
    nodes = len(model.graph)
    assert add_fp32_islands(model) == 0
    assert len(model.graph) == nodes and softmax.outputs[0].dtype == ir.DataType.FLOAT16


def test_merged_weights_are_base_plus_b_times_a_in_float64(model):
    """W' = W + B A for every LoRA layer (the paper's Delta W = B A: lora_alpha = r, so alpha / r = 1)."""
    from peft.tuners.lora import LoraLayer

    unmerged = copy.deepcopy(model).double()
    merged = dict(merged_copy(unmerged).named_modules())
    layers = [(name, m) for name, m in unmerged.named_modules() if isinstance(m, LoraLayer)]
    assert {type(m.base_layer) for _, m in layers} == {torch.nn.Conv2d, torch.nn.Linear}
    for name, layer in layers:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        delta = torch.einsum("or,r...->o...", b.flatten(1), a)
        expected = layer.base_layer.weight + delta
        assert torch.allclose(merged[name].weight, expected, rtol=0, atol=1e-12), name


def test_merged_copy_refuses_lora_layers_left_after_the_merge(model, monkeypatch):
    """A merge that leaves peft LoRA layers in the copy is an error, not a silently unmerged export."""
    monkeypatch.setattr(type(model), "merge_lora", lambda self: None)
    with pytest.raises(RuntimeError, match="LoRA layers survived"):
        merged_copy(model)


def test_inference_copy_is_frozen_eval_typed_channels_last(model):
    """inference_copy: merged, no gradients, eval mode, the asked dtype, channels_last 4-D weights; model unchanged."""
    from export.merge import inference_copy

    model.train()
    try:
        prepared = inference_copy(model, torch.device("cpu"), torch.float64)
        assert model.training and lora_layer_names(model)
    finally:
        model.eval()
    assert not lora_layer_names(prepared) and not prepared.training
    assert not any(module.training for module in prepared.modules())
    parameters = list(prepared.parameters())
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in parameters)
    weights = [p for p in parameters if p.dim() == 4 and p.shape[2:] != (1, 1)]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
