"""The ONNX operators TensorRT's ONNX parser supports, and a check of an exported graph against them.

Source: onnx/onnx-tensorrt, docs/operators.md, "TensorRT 10.15 supports operators in the inclusive
range of opset 9 to opset 24" (the operator support matrix of the TensorRT 10.15 parser). Every
operator marked "Y" is listed with its "Supported Types" column. Operators marked "N" are left out,
so they fail the check. Type names follow the document: FP32, FP16, BF16, INT32, INT64, UINT8,
BOOL, and the quantized types INT8, INT4, FP8, FP4 (available only through Q/DQ).

The check reads the element type of every node input (from the graph's inferred types), and of the
outputs of the ops whose output type is an attribute (Cast, Constant, ...), and requires each to be
in the operator's list; other outputs follow from the inputs (comparisons always give BOOL).
Of the documented restrictions, the ones that can apply to GuideSR's ops are checked as well:
Resize's modes and Reduce*'s constant `axes`.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import onnx_ir as ir

OPSET_RANGE = (9, 24)

_F = ("FP32", "FP16", "BF16")
_FI = (*_F, "INT32", "INT64")
_FIB = (*_FI, "BOOL")

SUPPORTED_OPS: dict[str, tuple[str, ...]] = {
    "Abs": _FI, "Acos": _F, "Acosh": _F, "Add": _FI, "And": ("BOOL",),
    "ArgMax": _FI, "ArgMin": _FI, "Asin": _F, "Asinh": _F, "Atan": _F, "Atanh": _F,
    "Attention": (*_F, "INT8", "FP8"), "AveragePool": _F, "BatchNormalization": _F,
    "BlackmanWindow": ("FP32", "FP16"),
    "Cast": (*_FI, "UINT8", "BOOL"), "CastLike": (*_FI, "UINT8", "BOOL"),
    "Ceil": _F, "Celu": _F, "Clip": _F, "Concat": _FIB,
    "Constant": (*_FIB, "FP8", "FP4", "INT4"), "ConstantOfShape": (*_FIB, "FP8", "FP4", "INT4"),
    "Conv": _F, "ConvTranspose": _F, "Cos": _F, "Cosh": _F, "CumSum": _F,
    "DeformConv": ("FP32", "FP16"), "DepthToSpace": _FI, "DequantizeLinear": ("INT8", "FP8", "FP4", "INT4"),
    "Div": _FI, "Dropout": _F, "Einsum": _F, "Elu": _F, "Equal": _FI, "Erf": _F, "Exp": _F,
    "Expand": _FIB, "EyeLike": _FIB, "Flatten": _FIB, "Floor": _F,
    "Gather": _FIB, "GatherElements": _FIB, "GatherND": _FIB, "Gelu": (*_FI, "INT8"),
    "Gemm": _F, "GlobalAveragePool": _F, "GlobalLpPool": _F, "GlobalMaxPool": _F,
    "Greater": _FI, "GreaterOrEqual": _FI, "GridSample": ("FP32", "FP16"), "GroupNormalization": _F,
    "GRU": _F, "HammingWindow": ("FP32", "FP16"), "HannWindow": ("FP32", "FP16"),
    "HardSigmoid": _F, "HardSwish": _F, "Hardmax": _F, "Identity": _FIB, "If": _FIB,
    "ImageScaler": _F, "InstanceNormalization": _F, "IsInf": _F, "IsNaN": _FI,
    "LayerNormalization": _F, "LeakyRelu": _F, "Less": _FI, "LessOrEqual": _FI, "Log": _F,
    "LogSoftmax": _F, "Loop": _FIB, "LRN": _F, "LSTM": _F, "LpNormalization": _F, "LpPool": _F,
    "MatMul": _F, "Max": _FI, "MaxPool": _F, "Mean": (*_FI, "FP8"), "MeanVarianceNormalization": _F,
    "Min": _FI, "Mish": ("FP32", "FP16"), "Mod": _FI, "Mul": _FI, "Neg": _FI,
    "NonMaxSuppression": ("FP32", "FP16"), "NonZero": ("FP32", "FP16"), "Not": ("BOOL",),
    "OneHot": _FIB, "Or": ("BOOL",), "Pad": _FI, "ParametricSoftplus": _F, "Pow": _FI, "PRelu": _F,
    "QuantizeLinear": _F, "RandomNormal": _F, "RandomNormalLike": _F, "RandomUniform": _F,
    "RandomUniformLike": _F, "Range": _FI, "Reciprocal": _F,
    "ReduceL1": _FI, "ReduceL2": _FI, "ReduceLogSum": _FI, "ReduceLogSumExp": _FI, "ReduceMax": _FI,
    "ReduceMean": _FI, "ReduceMin": _FI, "ReduceProd": _FI, "ReduceSum": _FI, "ReduceSumSquare": _FI,
    "Relu": _FI, "Reshape": _FIB, "Resize": _F, "ReverseSequence": _FIB, "RMSNormalization": _F,
    "RNN": _F, "RoiAlign": ("FP32", "FP16"), "RotaryEmbedding": _F, "Round": _F, "STFT": ("FP32",),
    "ScaledTanh": _F, "Scan": _F, "Scatter": _FI, "ScatterElements": _FI, "ScatterND": _FI,
    "Selu": _F, "Shape": _FIB, "Shrink": _FI, "Sigmoid": _F, "Sign": _FI, "Sin": _F, "Sinh": _F,
    "Size": _FIB, "Slice": _FIB, "Softmax": _F, "Softplus": _F, "Softsign": _F, "SpaceToDepth": _FI,
    "Split": _FIB, "Sqrt": _F, "Squeeze": _FIB, "Sub": _FI, "Sum": _FI, "Tan": _F, "Tanh": _F,
    "TensorScatter": (*_F, "INT32"), "ThresholdedRelu": _F, "Tile": _FIB, "TopK": _FI,
    "Transpose": _FIB, "Trilu": _FIB, "Unsqueeze": _FIB, "Upsample": _F, "Where": _FIB, "Xor": ("BOOL",),
}

_TYPE_NAMES = {
    ir.DataType.FLOAT: "FP32", ir.DataType.FLOAT16: "FP16", ir.DataType.BFLOAT16: "BF16",
    ir.DataType.INT32: "INT32", ir.DataType.INT64: "INT64", ir.DataType.UINT8: "UINT8",
    ir.DataType.BOOL: "BOOL", ir.DataType.INT8: "INT8", ir.DataType.INT4: "INT4",
    ir.DataType.FLOAT8E4M3FN: "FP8", ir.DataType.FLOAT4E2M1: "FP4",
}

_TYPE_SETTING_OPS = {"Cast", "CastLike", "Constant", "ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform",
                     "RandomNormalLike", "RandomUniformLike"}

# Resize: "Supported resize transformation modes: half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn,
# asymmetric, and align_corners. Supported resize modes: nearest, linear. Supported nearest modes:
# floor, ceil, round_prefer_floor, round_prefer_ceil. ... Antialiasing is not supported."
_RESIZE_ATTRIBUTES = {
    "coordinate_transformation_mode": {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric",
                                       "align_corners"},
    "mode": {"nearest", "linear"},
    "nearest_mode": {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"},
}


def tensorrt_problems(model: ir.Model | str | Path, plugin_ops: Collection[tuple[str, str]] = frozenset()) -> list[str]:
    """Everything in the graph TensorRT's ONNX parser would reject; an empty list when it parses.

    `plugin_ops` are the (domain, op_type) pairs the parser imports as registered plugins
    (export/plugin_nodes.py); they are accepted as they are.
    """
    if not isinstance(model, ir.Model):
        model = ir.load(model)
    problems = []
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        problems.append(f"default-domain opset {opset} is outside TensorRT's range {OPSET_RANGE}")
    for node in model.graph.all_nodes():
        where = f"{node.op_type} node {node.name!r}"
        if (node.domain, node.op_type) in plugin_ops:
            continue
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where} is in domain {node.domain!r}; only standard ONNX ops are supported")
            continue
        if node.op_type not in SUPPORTED_OPS:
            problems.append(f"{where}: {node.op_type} is not supported by TensorRT's ONNX parser")
            continue
        typed = (*node.inputs, *node.outputs) if node.op_type in _TYPE_SETTING_OPS else node.inputs
        for value in typed:
            if value is None:
                continue
            type_name = _TYPE_NAMES.get(value.dtype) if value.dtype is not None else "unknown"
            if type_name not in SUPPORTED_OPS[node.op_type]:
                problems.append(f"{where}: tensor {value.name!r} of type {value.dtype} is not among "
                                f"{node.op_type}'s supported types {SUPPORTED_OPS[node.op_type]}")
        problems.extend(f"{where}: {message}" for message in _restriction_problems(node))
    return problems


def _restriction_problems(node: ir.Node) -> list[str]:
    if node.op_type == "Resize":
        problems = [
            f"{name}={node.attributes[name].as_string()!r} is not supported"
            for name, allowed in _RESIZE_ATTRIBUTES.items()
            if name in node.attributes and node.attributes[name].as_string() not in allowed
        ]
        if "antialias" in node.attributes and node.attributes["antialias"].as_int():
            problems.append("antialiasing is not supported")
        return problems
    if node.op_type.startswith("Reduce") and len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = node.inputs[1]
        if axes.const_value is None:
            return ["`axes` must be an initializer"]
    return []
