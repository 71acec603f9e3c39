"""Equivalent rewrites applied before and after tracing; tests/test_export_rewrites.py proves each.

Module level (on the merged model, in fp32, before tracing):

- `fold_unshuffle_projections`: every injection's PixelUnshuffle + concat + 1x1 projection becomes a
  1x1 conv on h plus an s x s, stride-s conv on narrow(F_r) (see `StridedGuidanceInjection`).
- `freeze_time_embedding`: the UNet's time embedding at the fixed timestep t_f becomes a [1, D]
  constant, so everything computed from it folds away in the graph.

Graph level (on the traced ONNX):

- `fix_input_shapes`: the static variant is the dynamic trace with its input/output dims fixed,
  after which every shape computation is a constant.
- `fold_constants`: onnxscript's constant folder with shape inference, then onnx_ir's common passes
  (dead nodes, constants to initializers, duplicate initializers, common subexpressions).
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer
import torch
from torch import nn

from guidesr.diffusion import fixed_time_embedding
from guidesr.injection import GuidanceInjection
from guidesr.model import GuideSR

from .graphs import GraphSpec

# onnxscript folds a node only when its constant inputs have at most `input_size_limit` elements.
# The default (8192) would leave the time embedding's Gemms unfolded: their weights hold up to
# 1280 x 1280 elements in SD-Turbo. Folding them shrinks the model, so the limit is raised; the
# output limit (folded tensors written into the model) stays at onnxscript's default.
FOLD_INPUT_SIZE_LIMIT = 1 << 24
FOLD_OUTPUT_SIZE_LIMIT = 1 << 18
FOLD_ITERATIONS = 2


class StridedGuidanceInjection(nn.Module):
    """`GuidanceInjection` without materialising PixelUnshuffle or the concat.

    The injection computes h + P(cat(h, PixelUnshuffle(n, s))) with n = narrow(F_r) and P a 1x1
    conv over Ch + c*s^2 channels. P's input channels split into the first Ch (acting on h) and
    the rest; input channel Ch + c*s^2 + i*s + j holds n[c, y*s + i, x*s + j] (PixelUnshuffle's
    order), so those columns reshaped to [Cout, c, s, s] are exactly the weight of an s x s conv
    with stride s on n:

        h + P(cat(h, PixelUnshuffle(n, s))) = h + P_h(h) + Conv_{s x s, stride s}(n)

    The residual h is kept as an Add rather than folded into P_h as W_h + I: in fp16, adding 1 to
    the diagonal would round away most of W_h's (small, trained-from-zero) diagonal entries.
    narrow is not folded into the strided conv either: it exists to cut the channels the s x s
    kernel reads (2C -> c), and folding would multiply the conv's work by 2C / c.
    """

    def __init__(self, injection: GuidanceInjection):
        super().__init__()
        project, s = injection.project, injection.scale
        out_channels = project.out_channels
        weight = project.weight.detach()  # [Cout, Ch + c*s^2, 1, 1]
        narrowed = (weight.shape[1] - out_channels) // (s * s)
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.narrow = injection.narrow
        self.project_hidden = nn.Conv2d(out_channels, out_channels, 1, **factory)
        self.project_guidance = nn.Conv2d(narrowed, out_channels, s, stride=s, bias=False, **factory)
        with torch.no_grad():
            self.project_hidden.weight.copy_(weight[:, :out_channels])
            self.project_hidden.bias.copy_(project.bias.detach())
            self.project_guidance.weight.copy_(weight[:, out_channels:, 0, 0].reshape(out_channels, narrowed, s, s))

    def forward(self, hidden: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        return hidden + self.project_hidden(hidden) + self.project_guidance(self.narrow(guidance))


def fold_unshuffle_projections(model: GuideSR) -> None:
    """Replace every `GuidanceInjection` of `model` by its `StridedGuidanceInjection`, in place."""
    for index, injection in enumerate(model.injections):
        if isinstance(injection, GuidanceInjection):
            model.injections[index] = StridedGuidanceInjection(injection)


class FrozenTimeEmbedding(nn.Module):
    """The UNet's `time_embedding` at the one timestep GuideSR uses, as a [1, D] constant.

    `unet_time_embedding` calls it as time_embedding(sinusoid, None); the sinusoid is ignored, so
    the traced graph keeps nothing of the timestep path. [1, D] broadcasts over the batch where
    every ResNet adds proj(SiLU(emb))[:, :, None, None], so those projections fold to constants
    whatever the batch size of the graph.
    """

    def __init__(self, embedding: torch.Tensor):
        super().__init__()
        self.register_buffer("embedding", embedding)

    def forward(self, sinusoid: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.embedding.to(sinusoid.dtype)


def freeze_time_embedding(model: GuideSR) -> None:
    """Compute the time embedding at `model.config.timestep` once (in the model's dtype) and freeze it."""
    model.unet.time_embedding = FrozenTimeEmbedding(fixed_time_embedding(model.unet, model.config.timestep))


def fix_input_shapes(model: ir.Model, spec: GraphSpec) -> None:
    """Give the graph's inputs and outputs the spec's dims and forget every inferred inner shape.

    The next `fold_constants` re-infers the shapes from the new inputs; with a static spec every
    Shape op then reads a known shape and folds, with the arithmetic that depends on it.
    """
    graph = model.graph
    declared = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for value in (*graph.inputs, *graph.outputs):
        if value.name not in declared:
            raise ValueError(f"graph value {value.name!r} is not declared in the {spec.variant} graph spec")
        value.shape = ir.Shape(list(declared[value.name].dims))
    outputs = set(graph.outputs)
    for node in graph:
        for value in node.outputs:
            if value not in outputs:
                value.shape = None


def fold_constants(model: ir.Model) -> None:
    """Fold every computation on constants into initializers and remove what is left unused, in place.

    onnxscript's `optimize` also runs its pattern-rewrite rules, which take ~40 s on the tiny graph
    on two CPU cores and find nothing TensorRT needs; the folder alone takes ~3 s.
    """
    for _ in range(FOLD_ITERATIONS):
        result = onnxscript.optimizer.fold_constants(
            model, onnx_shape_inference=True, input_size_limit=FOLD_INPUT_SIZE_LIMIT,
            output_size_limit=FOLD_OUTPUT_SIZE_LIMIT, should_fold=_fold_constant_of_shape,
        )
        common_passes.RemoveUnusedNodesPass()(model)
        if not result.modified:
            break
    ir.passes.Sequential(
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
    )(model)


def _fold_constant_of_shape(node: ir.Node) -> bool | None:
    """Fold ConstantOfShape too (onnxscript keeps it by default, to keep models small); the output
    size limit still applies. TorchScript builds F.pad's pads with one."""
    return True if node.op_type == "ConstantOfShape" else None
