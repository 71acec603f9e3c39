"""Constant inputs folded out of the compiled backend's model: the time embedding and the prompt's keys and values.

A one-step GuideSR runs its UNet at one timestep (`config.timestep`) with one prompt (a stored
embedding, or a user prompt encoded once), so two of the UNet's inputs are the same on every call:

- the time embedding emb = time_embedding(sinusoid(t_f)) [1, D] reaches each ResNet block as
  conv1(h) + time_emb_proj(SiLU(emb))[:, :, None, None]. That projection is a per-channel constant,
  so it is added to conv1's bias once, the block's `time_emb_proj` is removed, and the UNet's
  `time_embedding` becomes `FoldedTimeEmbedding`, which hands the blocks temb=None (diffusers'
  ResnetBlock2D then adds nothing). The bias is the same for every sample, so any batch size runs;
- each cross-attention's key and value, to_kv(F_p) after `fuse_qkv_projections` ([1, L, 2 * inner]),
  are computed once and kept as a buffer (`StoredKeyValue` in place of `to_kv`); diffusers'
  FusedAttnProcessor2_0 splits and reshapes them as it did the projection's output.

What stays in the traced graph: the sinusoid of the timestep (its only reader, `FoldedTimeEmbedding`,
ignores it, so Inductor drops it as dead code) and the prompt module's expand (a view).

Only for inference copies: the folded model has no time MLP and no k/v weights left to train.
Supported: ResnetBlock2D with time_embedding_norm="default" (SD's UNets and the tiny preset), fused
cross-attention without `norm_cross`, and a prompt that does not depend on the image
(`StoredPromptEmbedding`, `CLIPPromptEncoder`); anything else raises ValueError before any change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from guidesr.diffusion import fixed_time_embedding
from guidesr.prompt import CLIPPromptEncoder, StoredPromptEmbedding

if TYPE_CHECKING:
    from guidesr.model import GuideSR

CONSTANT_PROMPTS = (StoredPromptEmbedding, CLIPPromptEncoder)


class FoldedTimeEmbedding(nn.Module):
    """The UNet's `time_embedding` once every ResNet block holds its time projection in conv1's bias:
    returns None, so the blocks get temb=None and add nothing."""

    def forward(self, sinusoid: torch.Tensor, condition: torch.Tensor | None = None) -> None:
        return None


class StoredKeyValue(nn.Module):
    """A cross-attention's `to_kv` applied to the prompt, computed once: [1, L, 2 * inner], expanded to the
    batch of the text it stands in for (a view)."""

    def __init__(self, key_value: torch.Tensor):
        super().__init__()
        self.register_buffer("key_value", key_value)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.key_value.expand(text.shape[0], -1, -1)  # [B, L, 2 * inner]


@dataclass(frozen=True)
class FoldedConstants:
    time_projections: int  # ResNet blocks whose time_emb_proj(SiLU(emb)) is now in conv1's bias
    prompt_key_values: int  # cross-attentions whose to_kv(prompt) is now a buffer


def fold_constant_inputs(prepared: GuideSR) -> FoldedConstants:
    """Fold the time embedding and the prompt's k/v into `prepared` in place (an inference copy whose UNet's
    projections are fused); returns what was folded."""
    unet = prepared.unet
    resnets = time_embedding_consumers(unet)
    cross_attentions = [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]
    check_foldable(prepared, resnets, cross_attentions)
    embedding = fixed_time_embedding(unet, prepared.config.timestep)  # [1, D]
    with torch.no_grad():
        for resnet in resnets:
            fold_time_projection(resnet, embedding)
        unet.time_embedding = FoldedTimeEmbedding()
        parameter = next(unet.parameters())
        probe = torch.zeros(1, 3, 1, 1, device=parameter.device, dtype=parameter.dtype)
        text = prepared.prompt(probe)  # [1, L, D_text], the same for every image
        for attention in cross_attentions:
            attention.to_kv = StoredKeyValue(attention.to_kv(text))
            del attention.to_k, attention.to_v
    return FoldedConstants(time_projections=len(resnets), prompt_key_values=len(cross_attentions))


def time_embedding_consumers(unet: nn.Module) -> list[nn.Module]:
    """The UNet's modules that read the time embedding: its ResNet blocks (diffusers marks them with
    `time_embedding_norm`)."""
    return [m for m in unet.modules() if hasattr(m, "time_embedding_norm")]


def check_foldable(prepared: GuideSR, resnets: list[nn.Module], cross_attentions: list[Attention]) -> None:
    if not isinstance(prepared.prompt, CONSTANT_PROMPTS):
        raise ValueError(f"the prompt module {type(prepared.prompt).__name__} may depend on the image; only "
                         f"{', '.join(c.__name__ for c in CONSTANT_PROMPTS)} have keys and values that can be folded")
    for resnet in resnets:
        if not isinstance(resnet, ResnetBlock2D) or resnet.time_embedding_norm != "default":
            raise ValueError(f"{type(resnet).__name__} with time_embedding_norm={resnet.time_embedding_norm!r}: "
                             "only ResnetBlock2D with the 'default' norm (temb added after conv1) can be folded")
        if resnet.time_emb_proj is None or not isinstance(resnet.conv1, nn.Conv2d):
            raise ValueError("a ResNet block without time_emb_proj or with a wrapped conv1 (LoRA not merged?) "
                             "cannot take its time projection into conv1's bias")
    for attention in cross_attentions:
        if not isinstance(attention.processor, FusedAttnProcessor2_0) or getattr(attention, "to_kv", None) is None:
            raise ValueError(f"cross-attention with {type(attention.processor).__name__}: the prompt's k/v are folded "
                             "into `to_kv`, so fuse the projections first (unet.fuse_qkv_projections())")
        if attention.norm_cross is not None:
            raise ValueError("cross-attention with norm_cross: folding its k/v is not supported")


def fold_time_projection(resnet: ResnetBlock2D, embedding: torch.Tensor) -> None:
    """conv1.bias += time_emb_proj(act(emb)), summed in fp32 (fp64 stays fp64), rounded once; time_emb_proj removed."""
    temb = embedding if resnet.skip_time_act else resnet.nonlinearity(embedding)
    projection = resnet.time_emb_proj(temb)[0]  # [C]
    conv = resnet.conv1
    compute = torch.promote_types(projection.dtype, torch.float32)
    bias = projection.to(compute) if conv.bias is None else conv.bias.to(compute) + projection.to(compute)
    conv.bias = nn.Parameter(bias.to(projection.dtype), requires_grad=False)
    resnet.time_emb_proj = None
