"""runtime.backends.constant_folding: the compiled backend's model with the time embedding and the prompt's k/v
folded to constants computes what the model computes, and no longer runs the time MLP, the ResNet blocks'
time projections or the cross-attentions' k/v projections.

The tiny preset with random base weights and random trainable parts (LoRA, zero-convs, injections, prompt),
in float64 on the CPU; the sd-turbo preset on the meta device (shapes only).
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding
from torch import nn

from export.merge import inference_copy
from guidesr.config import sd_turbo_config
from guidesr.model import GuideSR, set_kernels_enabled
from helpers import OpRecorder, randomized_tiny
from runtime.backends import compiled, constant_folding
from runtime.backends.constant_folding import (
    FoldedConstants,
    FoldedTimeEmbedding,
    StoredKeyValue,
    fold_constant_inputs,
    time_embedding_consumers,
)

CPU = torch.device("cpu")
MATMULS = ("aten.addmm.default", "aten.mm.default")


@pytest.fixture(scope="module")
def model() -> GuideSR:
    return randomized_tiny(seed=5)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """Batch 2, not square, not a multiple of the tiny preset's 16 (the model pads it)."""
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(2, 3, 40, 56, generator=generator, dtype=torch.float64) * 2 - 1).contiguous(
        memory_format=torch.channels_last)


def prepare_unfolded(model: GuideSR, device: torch.device, dtype: torch.dtype,
                     monkeypatch: pytest.MonkeyPatch) -> GuideSR:
    """What `prepare_model` built before this folding: the same steps without `fold_constant_inputs`."""
    with monkeypatch.context() as patch:
        patch.setattr(constant_folding, "fold_constant_inputs", lambda prepared: None)
        return compiled.prepare_model(model, device, dtype)


def cross_attentions(unet: nn.Module) -> list[Attention]:
    return [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]


def op_counts(model: GuideSR, image: torch.Tensor) -> Counter:
    recorder = OpRecorder()
    with torch.no_grad(), recorder:
        model(image)
    return Counter(recorder.ops)


def test_the_folded_model_computes_what_the_model_computes(model, image):
    merged = inference_copy(model, CPU, torch.float64)
    prepared = compiled.prepare_model(model, CPU, torch.float64)
    with torch.no_grad():
        expected = merged(image).r1
        result = prepared(image).r1
    assert result.shape == image.shape
    assert (result - expected).abs().max().item() < 1e-10


def test_the_folded_model_runs_no_time_mlp_and_no_prompt_projection(model, image, monkeypatch):
    """Against the same preparation without the folding: the time MLP (2 linears), one time projection per ResNet
    block and one k/v projection per cross-attention are gone, from the modules and from the forward's ops."""
    prepared = compiled.prepare_model(model, CPU, torch.float64)
    unfolded = prepare_unfolded(model, CPU, torch.float64, monkeypatch)
    resnets = time_embedding_consumers(unfolded.unet)
    attentions = cross_attentions(unfolded.unet)
    assert isinstance(unfolded.unet.time_embedding, TimestepEmbedding) and len(resnets) == 8 and len(attentions) == 4

    assert isinstance(prepared.unet.time_embedding, FoldedTimeEmbedding)
    assert all(resnet.time_emb_proj is None for resnet in time_embedding_consumers(prepared.unet))
    for attention in cross_attentions(prepared.unet):
        assert isinstance(attention.to_kv, StoredKeyValue)
        assert not hasattr(attention, "to_k") and not hasattr(attention, "to_v")
    assert not any(name.startswith("time_embedding.") for name in prepared.unet.state_dict())

    folded_ops, unfolded_ops = op_counts(prepared, image), op_counts(unfolded, image)
    removed = sum(unfolded_ops[op] - folded_ops[op] for op in MATMULS)
    assert removed == 2 + len(resnets) + len(attentions)
    assert unfolded_ops["aten.silu.default"] - folded_ops["aten.silu.default"] == 1 + len(resnets)
    assert fold_constant_inputs(unfolded) == FoldedConstants(time_projections=8, prompt_key_values=4)
    assert op_counts(unfolded, image) == folded_ops


def test_the_compiled_backends_sd_turbo_model_on_the_meta_device():
    """sd-turbo (shapes only): its 22 ResNet blocks' time projections and its 16 cross-attentions' k/v fold (the
    counts behind the prediction in runtime/backends/compiled.py), and the folded model runs a batch of 2."""
    with torch.device("meta"):
        model = GuideSR(sd_turbo_config()).eval()
    set_kernels_enabled(model, False)
    prepared = compiled.prepare_model(model, torch.device("meta"), torch.float16)
    resnets = time_embedding_consumers(prepared.unet)
    attentions = cross_attentions(prepared.unet)
    assert len(resnets) == 22 and all(resnet.time_emb_proj is None for resnet in resnets)
    assert len(attentions) == 16 and all(isinstance(a.to_kv, StoredKeyValue) for a in attentions)
    with torch.no_grad():
        result = prepared(torch.empty(2, 3, 128, 192, device="meta", dtype=torch.float16)).r1
    assert result.shape == (2, 3, 128, 192) and result.dtype == torch.float16


class ImagePrompt(nn.Module):
    """A prompt computed from the image (as an image-tagging extractor would be)."""

    def __init__(self, length: int, dim: int):
        super().__init__()
        self.length, self.dim = length, dim

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.mean(dim=(1, 2, 3))[:, None, None].expand(-1, self.length, self.dim)


@pytest.fixture(scope="module")
def fused(model) -> GuideSR:
    prepared = inference_copy(model, CPU, torch.float64)
    prepared.unet.fuse_qkv_projections()
    return prepared


def with_image_prompt(prepared: GuideSR) -> None:
    prepared.prompt = ImagePrompt(prepared.config.prompt_length, prepared.config.text_dim)


def with_scale_shift(prepared: GuideSR) -> None:
    time_embedding_consumers(prepared.unet)[3].time_embedding_norm = "scale_shift"


def unfused(prepared: GuideSR) -> None:
    prepared.unet.unfuse_qkv_projections()


def with_norm_cross(prepared: GuideSR) -> None:
    """diffusers' cross_attention_norm: the processor normalises the text before `to_kv`, which a stored k/v skips."""
    attention = cross_attentions(prepared.unet)[1]
    attention.norm_cross = nn.LayerNorm(prepared.config.text_dim, dtype=torch.float64)


@pytest.mark.parametrize("change,message", [
    (with_image_prompt, "the prompt module ImagePrompt may depend on the image"),
    (with_scale_shift, "ResnetBlock2D with time_embedding_norm='scale_shift': only ResnetBlock2D with the 'default'"),
    (unfused, "cross-attention with AttnProcessor2_0: the prompt's k/v are folded into `to_kv`"),
    (with_norm_cross, "cross-attention with norm_cross: folding its k/v is not supported"),
])
def test_folding_refuses_what_it_cannot_fold_and_changes_nothing(fused, change, message):
    prepared = copy.deepcopy(fused)
    change(prepared)
    with pytest.raises(ValueError, match=message):
        fold_constant_inputs(prepared)
    assert isinstance(prepared.unet.time_embedding, TimestepEmbedding)
    assert all(resnet.time_emb_proj is not None for resnet in time_embedding_consumers(prepared.unet))
    assert all(not isinstance(a.to_kv, StoredKeyValue) for a in cross_attentions(prepared.unet))
