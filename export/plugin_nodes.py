"""FCA channel attention as TensorRT plugin nodes in the exported graph (GraphSpec.trt_plugins).

TensorRT's AOT plugins embed one kernel each (`tensorrt.plugin.aot_impl` returns one kernel name
and one PTX), and the fused op is three kernels with two fp32 intermediates
(kernels/fca_attention_aot.py), so each FCA block's channel attention is exported as three nodes
in the "guidesr" domain, one per plugin, instead of Gelu -> ReduceMean -> Gemm -> Sigmoid -> Mul:

    FCAGeluPartialSum (y, y_bias)                 -> partial   [B, C, n_chunks] float32
    FCAChannelGate    (partial, weight, bias, y)  -> gate      [B, C] float32 (y only for its H·W)
    FCAGatedGelu      (y, y_bias, gate)           -> z         [B, C, H, W], y's type

y is conv1's output without its bias, y_bias conv1's bias, weight and bias the 1x1 attention conv's
(FCABlock's kernel path, guidesr/guidance.py). TensorRT's ONNX parser imports a node it has no
importer for as the plugin whose name is the node's op_type, in the namespace of its
`plugin_namespace` attribute; `aot` = 1 selects the plugin's AOT implementation. The domain only
serves ONNX (the checker, ONNX Runtime): such a graph runs nowhere but in TensorRT with
export/tensorrt_plugins.py's plugins registered.

The nodes come from the TorchScript exporter: `fca_plugin_nodes` swaps every FCABlock for an
`FCAPluginBlock` while tracing, whose autograd Function computes the PyTorch reference (the trace
needs values) and whose `symbolic` writes the three nodes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from guidesr.guidance import FCABlock
from kernels.fca_attention import fca_channel_attention_reference

DOMAIN = "guidesr"
PLUGIN_NAMESPACE = "guidesr"
GELU_PARTIAL_SUM = "FCAGeluPartialSum"
CHANNEL_GATE = "FCAChannelGate"
GATED_GELU = "FCAGatedGelu"
PLUGIN_OPS = frozenset((DOMAIN, op) for op in (GELU_PARTIAL_SUM, CHANNEL_GATE, GATED_GELU))


class _FCAChannelAttentionPlugins(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, y_bias: torch.Tensor) -> torch.Tensor:
        return fca_channel_attention_reference(y, weight, bias, y_bias)

    @staticmethod
    def symbolic(g, y, weight, bias, y_bias):
        plugin = {"plugin_namespace_s": PLUGIN_NAMESPACE, "aot_i": 1}
        partial = g.op(f"{DOMAIN}::{GELU_PARTIAL_SUM}", y, y_bias, **plugin)
        partial.setType(y.type().with_dtype(torch.float32).with_sizes([None, None, None]))
        gate = g.op(f"{DOMAIN}::{CHANNEL_GATE}", partial, weight, bias, y, **plugin)
        gate.setType(y.type().with_dtype(torch.float32).with_sizes([None, None]))
        z = g.op(f"{DOMAIN}::{GATED_GELU}", y, y_bias, gate, **plugin)
        z.setType(y.type())
        return z


class FCAPluginBlock(nn.Module):
    """An FCABlock whose channel attention traces to the three plugin nodes; same weights, same result."""

    def __init__(self, block: FCABlock):
        super().__init__()
        self.conv1, self.attention, self.conv2 = block.conv1, block.attention, block.conv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.conv1.weight, padding=1)
        z = _FCAChannelAttentionPlugins.apply(y, self.attention.weight, self.attention.bias, self.conv1.bias)
        return x + self.conv2(z)


@contextmanager
def fca_plugin_nodes(module: nn.Module) -> Iterator[None]:
    """Within the block, every FCABlock of `module` is an FCAPluginBlock; the original blocks are put back after."""
    replaced = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
                if isinstance(child, FCABlock)]
    for parent, name, child in replaced:
        setattr(parent, name, FCAPluginBlock(child))
    try:
        yield
    finally:
        for parent, name, child in replaced:
            setattr(parent, name, child)


def type_plugin_outputs(model: ir.Model) -> int:
    """Give the plugin nodes' outputs their types and shapes; returns the number of plugin nodes.

    ONNX shape inference knows no custom op, so without this every shape after the first FCA block
    would stay unknown (and a static graph's Shape ops would not fold). The guidance branch runs at
    the input's resolution (guidesr/guidance.py), so y is [B, C, H, W] with B, H, W the image's, C
    the length of the node's bias input, and y's type the bias's (conv1's bias: y is conv1's output;
    y's own type is unknown until the graph is folded). The partial sums' chunk count is left unknown: it is the
    plugin's business (kernels/fca_attention_aot.py) and nothing in the graph reads it.
    """
    batch, _, height, width = model.graph.inputs[0].shape
    count = 0
    for node in model.graph:
        if (node.domain, node.op_type) not in PLUGIN_OPS:
            continue
        bias = node.inputs[2] if node.op_type == CHANNEL_GATE else node.inputs[1]
        (channels,) = bias.shape
        output = node.outputs[0]
        if node.op_type == GATED_GELU:
            output.dtype, output.shape = bias.dtype, ir.Shape([batch, channels, height, width])
        elif node.op_type == CHANNEL_GATE:
            output.dtype, output.shape = ir.DataType.FLOAT, ir.Shape([batch, channels])
        else:
            output.dtype, output.shape = ir.DataType.FLOAT, ir.Shape([batch, channels, None])
        count += 1
    return count
