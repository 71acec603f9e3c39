"""Attention with heads wider than flash attention takes, as matmul -> softmax -> matmul: the compiled backend's
form of the VAE's attention.

sd-turbo's VAE has one single-head attention of width 512 in its encoder's and its decoder's mid-block.
`F.scaled_dot_product_attention` (diffusers' AttnProcessor2_0) cannot give 512-wide heads to its flash
(<= 256) or cuDNN kernels and falls back to the memory-efficient kernel. On an H200 (2026-11-26,
docs/results/2026-11-26-h200-session2/compiled-512-profile.txt) that kernel took 0.333 ms per call at
4096 tokens (a 512x512 output), 7x its arithmetic (2 x 17 GFLOP = 0.046 ms at 744 TFLOP/s).

For such layers `WideHeadAttnProcessor` runs diffusers' own `AttnProcessor`, which materialises the
score matrix: `baddbmm` (cuBLAS, fp32 accumulation, rounded to fp16), softmax in fp32 (the VAE's
`upcast_softmax`; Inductor fuses the cast, the softmax and the rounding into one kernel), `bmm`.
Prediction for 4096 tokens, fp16: two 17 GFLOP matmuls ~0.05 ms, the 32 MB score matrix written,
read and written again by the softmax, read by the second matmul (~130 MB) ~0.04 ms: about 0.1 ms per
call instead of 0.333, i.e. the compiled 512x512 forward ~0.45 ms faster. Measured on the H200
(2026-11-26, commit 67fdbe6, kernels.benchmark's `wide_head_attention` case: the whole block, GroupNorm,
projections and residual included, compiled, CUDA-graph ms): 0.376 -> 0.140 at 4096 tokens (0.24 ms
per call, 0.47 ms per forward), 4.247 -> 1.526 at 16384 tokens (a 1024x1024 output).

Accuracy: the logits are rounded to fp16 (baddbmm's output) before the fp32 softmax, where SDPA's
kernels keep them in fp32. On the H200 the block's fp16 output differed from eager SDPA's by at most
1.95e-3 (about one fp16 step at the block's output scale), and the whole compiled forward's PSNR
against the fp32 reference went from 56.52 to 56.17 dB with this and the GroupNorm change together
(the target is 40 dB); tests/test_wide_head_attention.py bounds the error on a GPU.

The score matrix costs B·heads·T·T_kv elements of the activation dtype (32 MB at 512x512; 512 MB at
1024x1024, where T = 16384). Above `max_score_bytes` per call the processor keeps SDPA, whose kernels
never materialise it. The choice depends on shapes only, so under torch.compile (static shapes) it is
made once, at trace time.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

FLASH_MAX_HEAD_DIM = 256  # PyTorch's flash-attention kernel takes head widths up to 256
MAX_SCORE_BYTES = 1 << 30


class WideHeadAttnProcessor:
    """diffusers' AttnProcessor (explicit score matrix) while that matrix fits in `max_score_bytes`, else SDPA."""

    def __init__(self, max_score_bytes: int = MAX_SCORE_BYTES):
        self.max_score_bytes = max_score_bytes
        self.with_scores = AttnProcessor()
        self.with_sdpa = AttnProcessor2_0()

    def score_bytes(self, attn: Attention, hidden_states: torch.Tensor,
                    encoder_hidden_states: torch.Tensor | None) -> int:
        batch = hidden_states.shape[0]
        queries = hidden_states.shape[2:].numel() if hidden_states.dim() == 4 else hidden_states.shape[1]
        keys = queries if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        return batch * attn.heads * queries * keys * hidden_states.element_size()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        fits = self.score_bytes(attn, hidden_states, encoder_hidden_states) <= self.max_score_bytes
        processor = self.with_scores if fits else self.with_sdpa
        return processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def head_dim(attn: Attention) -> int:
    return attn.inner_dim // attn.heads


def use_wide_head_attention(model: nn.Module, max_score_bytes: int = MAX_SCORE_BYTES) -> int:
    """Give every diffusers `Attention` with heads wider than FLASH_MAX_HEAD_DIM a WideHeadAttnProcessor;
    returns how many. Narrower heads keep their processor (SDPA's flash kernel serves them)."""
    wide = [module for module in model.modules()
            if isinstance(module, Attention) and head_dim(module) > FLASH_MAX_HEAD_DIM]
    for module in wide:
        module.set_processor(WideHeadAttnProcessor(max_score_bytes))
    return len(wide)
