"""fp16 graphs for strongly typed TensorRT: half weights and activations, explicit fp32 islands.

TensorRT 11 builds only strongly typed networks (and TensorRT 10 does with STRONGLY_TYPED): every
tensor has the type the ONNX file gives it, and there is no FP16 builder flag to ask for. The
precision therefore lives in the graph:

1. The merged, rewritten model is converted with `.half()` and traced, so convolutions, matmuls
   and elementwise ops are fp16 in the graph. Input and output stay float32 (a Cast at each end),
   so every precision has the same I/O contract.
2. `add_fp32_islands` wraps the ops listed in `FP32_ISLANDS` in explicit Casts: fp16 -> fp32 on
   each floating input, fp32 -> fp16 on each output. Those ops then run in fp32 in any backend,
   whatever the backend's own accumulation policy for fp16.
"""

from __future__ import annotations

import onnx_ir as ir

# Ops that get fp32 islands, and why. (GroupNorm is exported as Reshape -> InstanceNormalization
# over the groups -> Reshape -> affine; the island covers the statistics and the normalisation.)
FP32_ISLANDS = {
    "InstanceNormalization": "GroupNorm statistics: a sum of squares over (C/G)*H*W fp16 values overflows 65504",
    "LayerNormalization": "mean and variance over the token width, as for GroupNorm",
    "Softmax": "exp and the row sum over up to 4096 keys lose accuracy in fp16",
    "ReduceMean": "FCA's global average pool: a sum over H*W values overflows fp16 at large tiles",
}


def add_fp32_islands(model: ir.Model) -> int:
    """Insert Casts so every op in FP32_ISLANDS computes in fp32; returns the number of islands.

    Needs the value types of an inferred graph (run `fold_constants` first); run `fold_constants`
    again afterwards to turn Casts of constants (norm scales and biases) into fp32 constants.
    """
    graph = model.graph
    to_fp32: dict[ir.Value, ir.Value] = {}  # one Cast per fp16 value, shared by every island reading it
    islands = 0
    for node in list(graph):
        if node.op_type not in FP32_ISLANDS or node.domain not in ("", "ai.onnx"):
            continue
        if any(value.dtype is None for value in node.outputs):
            raise ValueError(f"{node.op_type} node {node.name!r} has outputs of unknown type; infer shapes first")
        values = [v for v in (*node.inputs, *node.outputs) if v is not None]
        if not any(value.dtype == ir.DataType.FLOAT16 for value in values):
            continue
        for index, value in enumerate(node.inputs):
            if value is None or value.dtype != ir.DataType.FLOAT16:
                continue
            if value not in to_fp32:
                cast = _cast(value, ir.DataType.FLOAT)
                graph.insert_before(node, cast)
                to_fp32[value] = cast.outputs[0]
            node.replace_input_with(index, to_fp32[value])
        for value in node.outputs:
            if value.dtype != ir.DataType.FLOAT16:
                continue
            if value.is_graph_output():
                raise ValueError(f"{node.op_type} node {node.name!r} produces a graph output; it cannot be an island")
            uses = list(value.uses())
            cast = _cast(value, ir.DataType.FLOAT16)
            for user, index in uses:
                user.replace_input_with(index, cast.outputs[0])
            value.dtype = ir.DataType.FLOAT
            graph.insert_after(node, cast)
        islands += 1
    return islands


def _cast(value: ir.Value, dtype: ir.DataType) -> ir.Node:
    cast = ir.node("Cast", [value], {"to": dtype})
    cast.outputs[0].dtype, cast.outputs[0].shape = dtype, value.shape
    return cast
