"""runtime.backends.wide_head_attention: the score-matrix form is the same attention as SDPA, in float64 and
within each dtype's own error; it is used only for wide heads and only while the score matrix fits."""

import copy

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from guidesr.config import SD_TURBO_VAE
from runtime.backends.wide_head_attention import (
    FLASH_MAX_HEAD_DIM,
    WideHeadAttnProcessor,
    head_dim,
    use_wide_head_attention,
)


def vae_attention(channels: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> Attention:
    """A single-head attention block built as diffusers' VAE mid-block builds it, with random weights."""
    torch.manual_seed(seed)
    attn = Attention(channels, heads=1, dim_head=channels, norm_num_groups=8, eps=1e-6, residual_connection=True,
                     bias=True, upcast_softmax=True, _from_deprecated_attn_block=True)
    return attn.to(dtype).eval()


def image(shape: tuple[int, ...], dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def run(attn: Attention, processor, *inputs: torch.Tensor) -> torch.Tensor:
    attn.set_processor(processor)
    with torch.no_grad():
        return attn(*inputs)


def case_inputs(case: str, dtype: torch.dtype = torch.float64) -> tuple[Attention, tuple[torch.Tensor, ...]]:
    """A VAE-like 4-D input (odd, non-square latent, batch 3) or a two-head cross-attention on sequences."""
    if case == "vae_4d":
        return vae_attention(264, dtype), (image((3, 264, 5, 7), dtype),)
    torch.manual_seed(2)
    attn = Attention(264, cross_attention_dim=40, heads=2, dim_head=264, bias=True).to(dtype).eval()
    return attn, (image((2, 9, 264), dtype), image((2, 6, 40), dtype, seed=3))


# diffusers' `upcast_softmax` (the VAE's) computes the softmax in float32 even for float64 inputs
@pytest.mark.parametrize("case,atol", [("vae_4d", 1e-6), ("cross_3d", 1e-10)])
def test_equals_sdpa_in_float64(case, atol):
    attn, inputs = case_inputs(case)
    assert head_dim(attn) > FLASH_MAX_HEAD_DIM
    expected = run(attn, AttnProcessor2_0(), *inputs)
    torch.testing.assert_close(run(attn, WideHeadAttnProcessor(), *inputs), expected, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_error_is_within_twice_sdpas_own(dtype):
    """Against float64: at most twice SDPA's error in the same dtype, plus a small atol."""
    attn64, (x64,) = case_inputs("vae_4d")
    attn = copy.deepcopy(attn64).to(dtype)
    x = x64.to(dtype)
    expected = run(attn64, AttnProcessor2_0(), x.double())  # the input's own rounding is not the op's error
    ours = run(attn, WideHeadAttnProcessor(), x)
    theirs = run(attn, AttnProcessor2_0(), x)
    assert ours.dtype == dtype
    atol = {torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
    assert (ours.double() - expected).abs().max().item() <= 2 * (theirs.double() - expected).abs().max().item() + atol


def test_score_matrix_size_decides_the_form():
    attn, (x,) = case_inputs("vae_4d", torch.float32)
    processor = WideHeadAttnProcessor()
    assert processor.score_bytes(attn, x, None) == 3 * 1 * 35 * 35 * 4  # batch x heads x tokens x tokens x fp32
    with_scores, with_sdpa = run(attn, AttnProcessor(), x), run(attn, AttnProcessor2_0(), x)
    assert not torch.equal(with_scores, with_sdpa)  # else the checks below could not tell the forms apart
    fits = WideHeadAttnProcessor(max_score_bytes=processor.score_bytes(attn, x, None))
    too_large = WideHeadAttnProcessor(max_score_bytes=processor.score_bytes(attn, x, None) - 1)
    assert torch.equal(run(attn, fits, x), with_scores)
    assert torch.equal(run(attn, too_large, x), with_sdpa)


def test_swap_only_touches_heads_wider_than_flash_takes():
    """Head width, not the total width of several heads, decides; the swap passes its score-matrix limit on."""
    model = nn.ModuleDict({"wide": vae_attention(FLASH_MAX_HEAD_DIM + 8), "narrow": vae_attention(FLASH_MAX_HEAD_DIM),
                           "many_heads": Attention(512, heads=8, dim_head=64)})
    kept = {name: model[name].processor for name in ("narrow", "many_heads")}
    assert head_dim(model["many_heads"]) == 64
    assert use_wide_head_attention(model, max_score_bytes=12345) == 1
    assert isinstance(model["wide"].processor, WideHeadAttnProcessor)
    assert model["wide"].processor.max_score_bytes == 12345
    assert all(model[name].processor is processor for name, processor in kept.items())


def test_the_sd_turbo_vae_has_two_wide_head_attentions():
    """The attention the swap is for: one 512-wide head in the encoder's and in the decoder's mid-block."""
    with torch.device("meta"):
        vae = AutoencoderKL(**SD_TURBO_VAE)
    assert use_wide_head_attention(vae) == 2
    assert [head_dim(m) for m in vae.modules() if isinstance(m, Attention)] == [512, 512]


@pytest.mark.gpu
def test_compiled_fp16_matches_fp32_sdpa_on_cuda():
    """As the compiled backend runs it: fp16, channels_last, torch.compile, 64x64 latent (a 512x512 output)."""
    attn32 = vae_attention(512, torch.float32).cuda()
    attn16 = copy.deepcopy(attn32).half()
    use_wide_head_attention(attn16)
    x = image((1, 512, 64, 64), torch.float32).cuda()
    expected = run(attn32, AttnProcessor2_0(), x)
    with torch.no_grad():
        result = torch.compile(attn16, dynamic=False)(x.half().contiguous(memory_format=torch.channels_last))
    sdpa16 = run(copy.deepcopy(attn32).half(), AttnProcessor2_0(), x.half())
    error, sdpa_error = ((r.float() - expected).abs().max().item() for r in (result, sdpa16))
    assert torch.isfinite(result).all() and error <= 2 * sdpa_error + 2e-3


def test_score_bytes_of_cross_attention_count_the_keys():
    """Keys come from the encoder states (6 here), not the queries (9)."""
    attn, (x, context) = case_inputs("cross_3d")
    assert WideHeadAttnProcessor().score_bytes(attn, x, context) == 2 * 2 * 9 * 6 * 8  # batch, heads, T, T_kv, fp64


@pytest.mark.parametrize("latent, form", [(128, "scores"), (256, "sdpa")])
def test_default_limit_keeps_the_score_form_up_to_a_1024_output(latent, form):
    """fp16, one 512-wide head: a 1024x1024 output (512 MB of scores, the measured win) uses them,
    2048x2048 (8 GB) SDPA."""
    processor, chosen = WideHeadAttnProcessor(), []
    processor.with_scores = lambda *args: chosen.append("scores")
    processor.with_sdpa = lambda *args: chosen.append("sdpa")
    with torch.device("meta"):
        attn = Attention(512, heads=1, dim_head=512)
        processor(attn, torch.empty(1, 512, latent, latent, dtype=torch.float16))
    assert chosen == [form]
