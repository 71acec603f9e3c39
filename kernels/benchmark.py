"""Benchmark the fused kernels against eager PyTorch and torch.compile (GPU only).

    python -m kernels.benchmark [--json results.json]

All timings are `triton.testing.do_bench` medians in milliseconds, fp16, under torch.no_grad
(inference, the only mode the ops serve). do_bench flushes the L2 cache before every repetition,
so each call starts from DRAM. The "GB/s" columns are *effective* bandwidths: the op's minimum
traffic (what the fused kernel moves) divided by the measured time, printed next to the device's
copy bandwidth (a 1 GiB device-to-device `copy_`, counted as read + write) as the roofline.
Each op is also timed as CUDA-graph replays (`triton.testing.do_bench_cudagraph`), which removes
the host's launch overhead (about 0.1-0.2 ms per call of a Triton custom op in eager mode on the
first H200 run, enough to hide a 0.1 ms kernel); the GB/s use that GPU time:

- FCA channel attention, minimum 3·N·e bytes (read y twice, write z) with N = B·C·H·W;
- pixel-unshuffle + concat, minimum 2·(N_h + N_f)·e bytes (read each input once, write the output).

Sections: the attention op (Triton / eager / compiled reference) for C in {32, 64}, 512² to
2048², batch 1 and 4, NCHW, plus channels_last at the acceptance shape (the compiled model runs
channels_last), and there the op's three kernels one by one (torch.profiler) and the op with the
erf GELU instead of the fp16 fast form; PyTorch's GELU against a plain copy at the acceptance shape
(is an erf pass memory- or instruction-bound?); the whole FCA block (conv1 -> attention -> conv2 +
residual, the model's `guidesr.guidance.FCABlock`) with and without the kernel, NCHW and
channels_last; the model's six full-resolution 3x3 convolutions with a 3-channel side, as cuDNN runs
them and with that side zero-padded to 8 channels; the whole guidance branch of the
sd-turbo preset (C = 32, 4 FRBs of 2 FCA blocks, IGN) with and without the kernels, eager and
compiled; GroupNorm(32) + SiLU at the sd-turbo VAE's shapes, nn.GroupNorm (eager, compiled)
against the compiled backend's ChannelStatsGroupNorm (compiled); the VAE's 512-wide single-head
attention block at the 512² and 1024² outputs' latent sizes, compiled with SDPA against the compiled
backend's score-matrix form (runtime/backends/wide_head_attention.py); the unshuffle + concat op at
the injection's first and last scales (s = 8 with 64 guidance channels next to 320 UNet
channels, s = 64 with 1 next to 1280) and, for the same
shapes, concat + 1x1 projection against the equivalent 1x1 + (s x s, stride s) convolution pair
that never builds the concatenation.

Cases run in priority order (issue 5's acceptance shapes first: 1024², C = 64, batch 1), every
measured case is written to --json at once, and SIGTERM (a session's time limit) or Ctrl-C stops
the run after printing the table of what was measured; Ctrl-C exits 130 with a line saying what
was written.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from runtime.cli import EXIT_INTERRUPTED, check_output_file_argument, plural, write_json

SIZES = (512, 1024, 2048)
BATCHES = (1, 4)
FCA_CHANNELS = (32, 64)
INJECTION_SCALES = ((8, 64, 320), (64, 1, 1280))  # (s, guidance channels Cf, UNet channels Ch)
# the sd-turbo VAE's GroupNorm inputs at a 512x512 output (decoder: 128 ch at 512², 256 at 256², 512 at 128²)
GROUP_NORM_SHAPES = ((1, 128, 512, 512), (1, 256, 256, 256), (1, 512, 128, 128))
# the sd-turbo VAE's mid-block attention input (512 channels, one head) at 512x512 and 1024x1024 outputs
WIDE_HEAD_ATTENTION_SHAPES = ((1, 512, 64, 64), (1, 512, 128, 128))
# (in, out) channels of the sd-turbo model's full-resolution 3x3 convolutions with a 3-channel side
THIN_CONVS = ((3, 128), (128, 3), (3, 32), (64, 3), (3, 64))
ACCEPTANCE = (1, 64, 1024)  # (batch, C, size): issue 5's bandwidth and torch.compile checks
DEVICE = "cuda"
DTYPE = torch.float16
ELEMENT_BYTES = 2


class Stop(BaseException):
    """SIGTERM: stop measuring, print what was measured."""


def _stop(signum, frame) -> None:
    raise Stop(signal.Signals(signum).name)


def median_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, return_mode="median"))


def graph_median_ms(fn) -> float:
    """The median of CUDA-graph replays: GPU time without the host's launch overhead (no L2 flush)."""
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, return_mode="median"))


def kernel_ms(fn, calls: int = 20) -> dict[str, dict[str, float]]:
    """{kernel: {"ms", "launches"} per call of `fn`}, costliest first (torch.profiler; consecutive calls,
    no L2 flush). Kernels replayed from a CUDA graph are seen too."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.key_averages() if e.self_device_time_total > 0),
                    key=lambda e: -e.self_device_time_total)
    return {e.key: {"ms": e.self_device_time_total / 1e3 / calls, "launches": e.count / calls} for e in events}


def time_calls(calls: dict[str, Callable[[], object]]) -> dict[str, dict[str, float]]:
    """{"ms": do_bench medians, "graph_ms": CUDA-graph medians}, each keyed like `calls`."""
    return {"ms": {name: median_ms(call) for name, call in calls.items()},
            "graph_ms": {name: graph_median_ms(call) for name, call in calls.items()}}


def copy_bandwidth_gbs() -> float:
    src = torch.randn(2**29, dtype=DTYPE, device=DEVICE)  # 1 GiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * ELEMENT_BYTES / ms / 1e6


class Compiled:
    """One torch.compile per function, shared by every shape (one static graph per shape)."""

    def __init__(self):
        self._functions: dict[Callable, Callable] = {}

    def __call__(self, fn: Callable) -> Callable:
        if fn not in self._functions:
            self._functions[fn] = torch.compile(fn, dynamic=False)
        return self._functions[fn]


def fca_attention_case(compiled: Compiled, batch: int, channels: int, size: int, channels_last: bool = False) -> dict:
    from kernels.fca_attention import fca_channel_attention, fca_channel_attention_reference

    generator = torch.Generator(DEVICE).manual_seed(channels)
    weight = torch.randn(channels, channels, 1, 1, device=DEVICE, dtype=DTYPE, generator=generator) / channels**0.5
    bias = torch.randn(channels, device=DEVICE, dtype=DTYPE, generator=generator) * 0.1
    y = torch.randn(batch, channels, size, size, device=DEVICE, dtype=DTYPE)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    reference = compiled(fca_channel_attention_reference)
    fused = fca_channel_attention(y, weight, bias, use_kernel=True)
    eager = fca_channel_attention_reference(y, weight, bias)
    times = time_calls({"triton": lambda: fca_channel_attention(y, weight, bias, use_kernel=True),
                        "eager": lambda: fca_channel_attention_reference(y, weight, bias),
                        "compile": lambda: reference(y, weight, bias)})
    row = {"section": "fca_attention", "shape": [batch, channels, size, size],
           "layout": "channels_last" if channels_last else "NCHW", **times,
           "min_bytes": 3 * y.numel() * ELEMENT_BYTES,
           "max_abs_diff_vs_eager": (fused.float() - eager.float()).abs().max().item()}
    if (batch, channels, size) == ACCEPTANCE:  # where the op's time goes: its three kernels, and erf's cost
        from kernels.fca_attention import fca_channel_attention_triton

        row["triton_kernel_ms"] = kernel_ms(lambda: fca_channel_attention(y, weight, bias, use_kernel=True))
        row["erf_gelu"] = time_calls({"triton": lambda: fca_channel_attention_triton(y, weight, bias, fast_gelu=False)})
        erf = fca_channel_attention_triton(y, weight, bias, fast_gelu=False)
        row["max_abs_diff_fast_vs_erf_gelu"] = (fused.float() - erf.float()).abs().max().item()
    return row


def gelu_cost_case(batch: int, channels: int, size: int) -> dict:
    """Is an erf-GELU pass memory- or instruction-bound? PyTorch's GELU (fp32 erf on fp16 data) against a
    plain copy of the same tensor, both reading and writing it once (2·N·e bytes). The fused attention
    evaluates GELU in two passes; if GELU is much slower than the copy, that is where its time goes."""
    y = torch.randn(batch, channels, size, size, device=DEVICE, dtype=DTYPE)
    out = torch.empty_like(y)
    calls = {"copy": lambda: out.copy_(y), "gelu": lambda: torch.nn.functional.gelu(y)}
    times = time_calls(calls)
    return {"section": "gelu_cost", "shape": [batch, channels, size, size], "layout": "NCHW", **times,
            "gbs": {name: 2 * y.numel() * ELEMENT_BYTES / ms / 1e6 for name, ms in times["graph_ms"].items()}}


def fca_block_case(batch: int, channels: int, size: int, channels_last: bool = False) -> dict:
    from guidesr.guidance import FCABlock

    torch.manual_seed(channels)
    block = FCABlock(channels).to(DEVICE, DTYPE).eval()
    x = torch.randn(batch, channels, size, size, device=DEVICE, dtype=DTYPE)
    if channels_last:  # as the compiled model runs it
        block, x = block.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    times, graph_times = {}, {}
    for name, use_kernel in (("triton", True), ("eager", False)):
        block.use_kernel = use_kernel
        times[name] = median_ms(lambda: block(x))
        graph_times[name] = graph_median_ms(lambda: block(x))
    return {"section": "fca_block", "shape": [batch, channels, size, size],
            "layout": "channels_last" if channels_last else "NCHW", "ms": times, "graph_ms": graph_times}


def guidance_branch_case(batch: int, size: int) -> dict:
    """The sd-turbo preset's guidance branch, NCHW and channels_last, kernels on/off, eager/compiled; also each
    compiled variant's first call (compilation included), to see what the kernels' call sites cost the build."""
    from guidesr.config import sd_turbo_config
    from guidesr.guidance import GuidanceBranch
    from guidesr.model import set_kernels_enabled

    settings = sd_turbo_config().guidance
    torch.manual_seed(0)
    branch = GuidanceBranch(settings.channels, settings.num_frb, settings.fca_per_frb).to(DEVICE, DTYPE).eval()
    branch = branch.to(memory_format=torch.channels_last)
    image = torch.randn(batch, 3, size, size, device=DEVICE, dtype=DTYPE).contiguous(memory_format=torch.channels_last)

    times, graph_times, first_call_s = {}, {}, {}
    for name, on in (("triton", True), ("eager", False)):
        set_kernels_enabled(branch, on)
        times[name] = median_ms(lambda: branch(image))
        graph_times[name] = graph_median_ms(lambda: branch(image))
    for name, on in (("compile_triton", True), ("compile", False)):
        set_kernels_enabled(branch, on)
        compiled = torch.compile(branch.forward, dynamic=False)  # dynamo guards on the kernels switch
        torch.cuda.synchronize()
        start = time.perf_counter()
        compiled(image)
        torch.cuda.synchronize()
        first_call_s[name] = time.perf_counter() - start
        times[name] = median_ms(lambda: compiled(image))
        graph_times[name] = graph_median_ms(lambda: compiled(image))
    return {"section": "guidance_branch", "shape": [batch, 3, size, size], "layout": "channels_last",
            "channels": settings.channels, "ms": times, "graph_ms": graph_times, "first_call_s": first_call_s}


def group_norm_case(shape: tuple[int, int, int, int]) -> dict:
    """GroupNorm(32) + SiLU as the VAE runs it (channels_last): nn.GroupNorm eager and compiled, and
    the compiled backend's ChannelStatsGroupNorm compiled (runtime/backends/group_norm.py)."""
    from runtime.backends.group_norm import ChannelStatsGroupNorm

    norm = torch.nn.GroupNorm(32, shape[1], eps=1e-6).to(DEVICE, DTYPE)
    per_channel = ChannelStatsGroupNorm(norm)
    x = torch.randn(shape, device=DEVICE, dtype=DTYPE).contiguous(memory_format=torch.channels_last)
    compiled_norm = torch.compile(lambda t: F.silu(norm(t)), dynamic=False)
    compiled_channel_stats = torch.compile(lambda t: F.silu(per_channel(t)), dynamic=False)
    calls = {"eager": lambda: F.silu(norm(x)), "compile": lambda: compiled_norm(x),
             "compile_channel_stats": lambda: compiled_channel_stats(x)}
    difference = (calls["compile_channel_stats"]().float() - calls["eager"]().float()).abs().max().item()
    return {"section": "group_norm", "shape": list(shape), "layout": "channels_last", **time_calls(calls),
            "min_bytes": 3 * x.numel() * ELEMENT_BYTES, "max_abs_diff_channel_stats_vs_eager": difference}


def wide_head_attention_case(shape: tuple[int, int, int, int]) -> dict:
    """The VAE's single-head 512-wide attention block (GroupNorm, q/k/v, attention, out, residual) compiled
    with SDPA (AttnProcessor2_0: the memory-efficient kernel) and with the compiled backend's
    WideHeadAttnProcessor (score matrix through cuBLAS; runtime/backends/wide_head_attention.py)."""
    import copy

    from diffusers.models.attention_processor import Attention

    from runtime.backends.group_norm import use_channel_stats_group_norm
    from runtime.backends.wide_head_attention import use_wide_head_attention

    channels = shape[1]
    sdpa = Attention(channels, heads=1, dim_head=channels, norm_num_groups=32, eps=1e-6, residual_connection=True,
                     bias=True, upcast_softmax=True, _from_deprecated_attn_block=True).to(DEVICE, DTYPE).eval()
    use_channel_stats_group_norm(sdpa)
    wide = copy.deepcopy(sdpa)
    assert use_wide_head_attention(wide) == 1
    x = torch.randn(shape, device=DEVICE, dtype=DTYPE).contiguous(memory_format=torch.channels_last)
    compiled_sdpa, compiled_wide = torch.compile(sdpa, dynamic=False), torch.compile(wide, dynamic=False)
    calls = {"eager_sdpa": lambda: sdpa(x), "compile_sdpa": lambda: compiled_sdpa(x),
             "compile_score_matrix": lambda: compiled_wide(x)}
    difference = (calls["compile_score_matrix"]().float() - calls["eager_sdpa"]().float()).abs().max().item()
    tokens = shape[2] * shape[3]
    return {"section": "wide_head_attention", "shape": list(shape), "layout": "channels_last", **time_calls(calls),
            "attention_flops": 4 * shape[0] * tokens * tokens * channels,
            "max_abs_diff_score_matrix_vs_eager_sdpa": difference}


def thin_conv_case(in_channels: int, out_channels: int, size: int, padded: int = 8) -> dict:
    """A 3x3 convolution with 3 input or 3 output channels at full resolution (the sd-turbo model has six
    at 512²: the VAE's conv_in and conv_out, the guidance branch's first convolution, the IGN's three),
    channels_last fp16, as cuDNN runs it and with the thin side zero-padded to `padded` channels (the
    same result: zero input channels add nothing, extra output channels are sliced off)."""
    x = (torch.randn(1, in_channels, size, size, device=DEVICE, dtype=DTYPE)
         ).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(out_channels, in_channels, 3, 3, device=DEVICE, dtype=DTYPE) / (9 * in_channels) ** 0.5
              ).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(out_channels, device=DEVICE, dtype=DTYPE)
    if in_channels < out_channels:
        x_pad = F.pad(x, (0, 0, 0, 0, 0, padded - in_channels)).contiguous(memory_format=torch.channels_last)
        w_pad = F.pad(weight, (0, 0, 0, 0, 0, padded - in_channels)).contiguous(memory_format=torch.channels_last)
        b_pad = bias
    else:
        x_pad = x
        w_pad = (F.pad(weight, (0, 0, 0, 0, 0, 0, 0, padded - out_channels))
                 ).contiguous(memory_format=torch.channels_last)
        b_pad = F.pad(bias, (0, padded - out_channels))
    calls = {"cudnn": lambda: F.conv2d(x, weight, bias, padding=1),
             f"padded_{padded}": lambda: F.conv2d(x_pad, w_pad, b_pad, padding=1)[:, :out_channels]}
    difference = (calls["cudnn"]().float() - calls[f"padded_{padded}"]().float()).abs().max().item()
    return {"section": "thin_conv", "shape": [1, in_channels, out_channels, size], "layout": "channels_last",
            **time_calls(calls), "max_abs_diff_padded": difference}


def unshuffle_concat_case(compiled: Compiled, s: int, cf: int, ch: int, batch: int, size: int) -> dict:
    from kernels.pixel_unshuffle_concat import pixel_unshuffle_concat, pixel_unshuffle_concat_reference

    width = ch + cf * s * s
    weight = torch.randn(ch, width, 1, 1, device=DEVICE, dtype=DTYPE) / width**0.5
    bias = torch.randn(ch, device=DEVICE, dtype=DTYPE) * 0.1
    weight_h = weight[:, :ch].contiguous()
    weight_f = weight[:, ch:].reshape(ch, cf, s, s).contiguous()  # unshuffle's channel order c*s*s + i*s + j
    h = torch.randn(batch, ch, size // s, size // s, device=DEVICE, dtype=DTYPE)
    f = torch.randn(batch, cf, size, size, device=DEVICE, dtype=DTYPE)
    reference = compiled(pixel_unshuffle_concat_reference)

    def concat_then_project():
        return F.conv2d(pixel_unshuffle_concat(h, f, s, use_kernel=True), weight, bias)

    def eager_concat_then_project():
        return F.conv2d(pixel_unshuffle_concat_reference(h, f, s), weight, bias)

    def strided_projection():
        return F.conv2d(h, weight_h, bias) + F.conv2d(f, weight_f, stride=s)

    times = time_calls({"triton": lambda: pixel_unshuffle_concat(h, f, s, use_kernel=True),
                        "eager": lambda: pixel_unshuffle_concat_reference(h, f, s),
                        "compile": lambda: reference(h, f, s)})
    times["ms"] |= {"triton_concat+1x1": median_ms(concat_then_project),
                    "eager_concat+1x1": median_ms(eager_concat_then_project),
                    "1x1+strided_conv": median_ms(strided_projection)}
    exact = torch.equal(pixel_unshuffle_concat(h, f, s, use_kernel=True), pixel_unshuffle_concat_reference(h, f, s))
    projection_diff = (concat_then_project().float() - strided_projection().float()).abs().max().item()
    return {"section": "unshuffle_concat", "shape": {"h": list(h.shape), "f": list(f.shape), "s": s},
            **times, "min_bytes": 2 * (h.numel() + f.numel()) * ELEMENT_BYTES,
            "equal_to_eager": exact, "max_abs_diff_concat_vs_strided_projection": projection_diff}


def plan(compiled: Compiled) -> list[tuple[str, Callable[[], dict]]]:
    """(label, case) in priority order: the acceptance shapes, the model's shapes, then the grid."""
    first = [
        (f"fca_attention {ACCEPTANCE}", lambda: fca_attention_case(compiled, *ACCEPTANCE)),
        (f"gelu_cost {ACCEPTANCE}", lambda: gelu_cost_case(*ACCEPTANCE)),
        (f"fca_block {ACCEPTANCE}", lambda: fca_block_case(*ACCEPTANCE)),
        (f"fca_attention {ACCEPTANCE} channels_last",
         lambda: fca_attention_case(compiled, *ACCEPTANCE, channels_last=True)),
        (f"fca_block {ACCEPTANCE} channels_last", lambda: fca_block_case(*ACCEPTANCE, channels_last=True)),
        *[(f"thin_conv {cin}->{cout} 512", lambda cin=cin, cout=cout: thin_conv_case(cin, cout, 512))
          for cin, cout in THIN_CONVS],
        ("guidance_branch 1x512", lambda: guidance_branch_case(1, 512)),
        *[(f"group_norm {shape}", lambda shape=shape: group_norm_case(shape)) for shape in GROUP_NORM_SHAPES],
        *[(f"wide_head_attention {shape}", lambda shape=shape: wide_head_attention_case(shape))
          for shape in WIDE_HEAD_ATTENTION_SHAPES],
        ("unshuffle_concat s=8 1x1024", lambda: unshuffle_concat_case(compiled, *INJECTION_SCALES[0], 1, 1024)),
    ]
    grid = []
    for size in SIZES:
        for batch in BATCHES:
            for channels in FCA_CHANNELS:
                if (batch, channels, size) != ACCEPTANCE:
                    grid.append((f"fca_attention {(batch, channels, size)}",
                                 lambda b=batch, c=channels, n=size: fca_attention_case(compiled, b, c, n)))
                    grid.append((f"fca_block {(batch, channels, size)}",
                                 lambda b=batch, c=channels, n=size: fca_block_case(b, c, n)))
            for s, cf, ch in INJECTION_SCALES:
                if (s, batch, size) != (8, 1, 1024):
                    grid.append((f"unshuffle_concat s={s} {batch}x{size}",
                                 lambda s=s, cf=cf, ch=ch, b=batch, n=size:
                                     unshuffle_concat_case(compiled, s, cf, ch, b, n)))
    return first + grid + [("guidance_branch 1x1024", lambda: guidance_branch_case(1, 1024))]


def print_table(results: list[dict], copy_gbs: float) -> None:
    print(f"\ncopy bandwidth (roofline): {copy_gbs:.0f} GB/s; GB/s below = minimum bytes / CUDA-graph time")
    print("ms: do_bench (stream launches, L2 flushed); in brackets: CUDA-graph replays (no host overhead)")
    print(f"{'section':<17}{'shape':<40}{'triton':>9}{'eager':>9}{'compile':>9}{'x eager':>8}{'x comp':>8}"
          f"{'graph triton/eager/compile':>30}{'GB/s':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['label']:<57} FAILED: {r['error']}")
            continue
        if r["section"] in ("group_norm", "wide_head_attention", "gelu_cost", "thin_conv"):
            continue
        t, g = r["ms"], r.get("graph_ms", {})
        shape = r["shape"] if r["section"] != "unshuffle_concat" else f"s={r['shape']['s']} f={r['shape']['f']}"
        shape = f"{shape} {r['layout']}" if r.get("layout") == "channels_last" else str(shape)
        compile_ms = t.get("compile")
        print(
            f"{r['section']:<17}{shape:<40}{t['triton']:>9.3f}{t['eager']:>9.3f}"
            + (f"{compile_ms:>9.3f}" if compile_ms else f"{'-':>9}")
            + f"{t['eager'] / t['triton']:>8.2f}"
            + (f"{compile_ms / t['triton']:>8.2f}" if compile_ms else f"{'-':>8}")
            + f"{'/'.join(f'{v:.3f}' for v in g.values()):>30}"
            + (f"{r['min_bytes'] / g['triton'] / 1e6:>7.0f}" if "min_bytes" in r else f"{'-':>7}")
        )
    branches = [r for r in results if r["section"] == "guidance_branch" and "error" not in r]
    if branches:
        print("\nguidance branch (sd-turbo preset, channels_last; ms): eager / eager+triton / compile / compile+triton")
        for r in branches:
            t, g, first = r["ms"], r["graph_ms"], r["first_call_s"]
            print(f"  {r['shape']}: {t['eager']:.3f} / {t['triton']:.3f} / {t['compile']:.3f} / "
                  f"{t['compile_triton']:.3f}"
                  f"   CUDA graph: {g['eager']:.3f} / {g['triton']:.3f} / {g['compile']:.3f} / "
                  f"{g['compile_triton']:.3f}"
                  f"   first compiled call: {first['compile']:.1f} s / {first['compile_triton']:.1f} s")
    for r in results:
        if "erf_gelu" in r:
            erf_ms = r["erf_gelu"]["graph_ms"]["triton"]
            print(f"\nFCA attention {r['shape']} {r['layout']} with erf GELU instead of the fast form: {erf_ms:.3f} ms "
                  f"(CUDA graph; {r['min_bytes'] / erf_ms / 1e6:.0f} GB/s; max |fast - erf| "
                  f"{r['max_abs_diff_fast_vs_erf_gelu']:.2e})")
        if "triton_kernel_ms" in r:
            n_bytes = r["min_bytes"] // 3
            print(f"\nFCA attention's kernels at {r['shape']} {r['layout']} (torch.profiler, ms per call; "
                  f"GB/s at N·e for the partial sums, 2·N·e for the gated GELU):")
            for name, kernel in r["triton_kernel_ms"].items():
                ms = kernel["ms"]
                moved = {"_gelu_partial_sum_kernel": n_bytes, "_gated_gelu_kernel": 2 * n_bytes}.get(name)
                print(f"  {name}: {ms:.4f}" + (f" ({moved / ms / 1e6:.0f} GB/s)" if moved else ""))
        if r["section"] == "gelu_cost" and "error" not in r:
            g, rates = r["graph_ms"], r["gbs"]
            print(f"\nGELU vs copy of {r['shape']} fp16 (CUDA-graph ms, GB/s at 2·N·e): copy {g['copy']:.3f} "
                  f"({rates['copy']:.0f}), GELU {g['gelu']:.3f} ({rates['gelu']:.0f})")
    print_graph_comparison(
        results, "group_norm", ("eager", "compile", "compile_channel_stats"),
        "GroupNorm(32) + SiLU, channels_last, CUDA-graph ms (GB/s at 3·N·e): eager / compile / compile "
        "ChannelStatsGroupNorm",
        lambda r, g: "(" + " / ".join(f"{r['min_bytes'] / ms / 1e6:.0f}" for ms in g) + " GB/s)")
    print_graph_comparison(
        results, "wide_head_attention", ("eager_sdpa", "compile_sdpa", "compile_score_matrix"),
        "VAE attention block (1 head of 512), channels_last, CUDA-graph ms: eager SDPA / compile SDPA / compile "
        "score matrix",
        lambda r, g: f"(max |score matrix - SDPA| {r['max_abs_diff_score_matrix_vs_eager_sdpa']:.2e})")
    print_graph_comparison(
        results, "thin_conv", ("cudnn", "padded_8"),
        "3x3 convolutions with a 3-channel side, [1, in, out, size], channels_last, CUDA-graph ms: cuDNN / "
        "thin side zero-padded to 8",
        lambda r, g: f"(max |padded - cuDNN| {r['max_abs_diff_padded']:.2e})")
    print("\nconcat + 1x1 projection vs the 1x1 + strided-conv pair (ms)")
    for r in results:
        if r["section"] == "unshuffle_concat" and "error" not in r:
            t = r["ms"]
            print(
                f"  s={r['shape']['s']:<3} f={str(r['shape']['f']):<22} triton concat+1x1 {t['triton_concat+1x1']:8.3f}"
                f"  eager concat+1x1 {t['eager_concat+1x1']:8.3f}  1x1+strided {t['1x1+strided_conv']:8.3f}"
            )


def print_graph_comparison(results: list[dict], section: str, keys: tuple[str, ...], heading: str,
                           detail: Callable[[dict, list[float]], str]) -> None:
    """One line per measured row of `section`: its CUDA-graph ms for `keys`, then `detail(row, those ms)`."""
    rows = [r for r in results if r["section"] == section and "error" not in r]
    if rows:
        print(f"\n{heading}")
    for r in rows:
        graph = [r["graph_ms"][key] for key in keys]
        print(f"  {r['shape']}: {' / '.join(f'{ms:.3f}' for ms in graph)}   {detail(r, graph)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.benchmark", description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 2 when the command could not run (bad options, no CUDA GPU), "
                                            "130 when Ctrl-C stopped it, else 0 (also when SIGTERM stopped it); "
                                            "either way what was measured is printed and written.")
    parser.add_argument("--json", metavar="PATH", help="write every measurement to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json (default: refuse it)")
    args = parser.parse_args(argv)
    json_path = Path(args.json) if args.json else None
    check_output_file_argument(parser, "--json", json_path, overwrite=args.overwrite)
    results: list[dict] = []
    try:
        return _benchmark(parser, json_path, results)
    except KeyboardInterrupt:
        print(interrupted_summary(results, json_path), file=sys.stderr)
        return EXIT_INTERRUPTED


def _benchmark(parser: argparse.ArgumentParser, json_path: Path | None, results: list[dict]) -> int:
    """main's measurements, each appended to `results` as it is taken."""
    if not torch.cuda.is_available():  # status 2, as every command here says "could not run"
        parser.exit(2, f"{parser.prog}: error: it needs a CUDA GPU and Triton; torch.cuda.is_available() is False "
                       f"here\n")
    import triton

    torch.backends.cudnn.benchmark = True
    # One static compilation per shape; fail rather than silently fall back to eager past the limit.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    signal.signal(signal.SIGTERM, _stop)
    copy_gbs = copy_bandwidth_gbs()
    data = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "dtype": str(DTYPE), "copy_bandwidth_gbs": copy_gbs, "complete": False, "results": results}
    stopped_by = measure_cases(plan(Compiled()), data, json_path)
    if stopped_by == "SIGTERM":
        print("stopped by SIGTERM: the table shows what was measured", flush=True)
    if json_path is not None:
        write_json(data, json_path)
    print_table(results, copy_gbs)
    if stopped_by == "SIGINT":
        print(interrupted_summary(results, json_path), file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def measure_cases(cases: list[tuple[str, Callable[[], dict]]], data: dict, json_path: Path | None) -> str | None:
    """Run `cases` ((label, case) in priority order) into data["results"], `data` written to `json_path` after each
    row and data["complete"] set once all ran. Returns what stopped them early ("SIGTERM", "SIGINT"), or None."""
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for label, case in cases:
                try:
                    row = case() | {"label": label}
                except torch.cuda.OutOfMemoryError as err:  # a too-large shape fails its row only
                    row = {"label": label, "section": label.split()[0], "error": f"{type(err).__name__}: {err}"}
                data["results"].append(row)
                print(f"[{time.perf_counter() - start:6.1f} s] {label}: "
                      + (row.get("error") or ", ".join(f"{k} {v:.3f} ms" for k, v in row["ms"].items())), flush=True)
                torch.cuda.empty_cache()
                if json_path is not None:
                    write_json(data, json_path)
        data["complete"] = True
    except Stop as stop:
        return str(stop)
    except KeyboardInterrupt:
        return "SIGINT"
    return None


def interrupted_summary(results: list[dict], json_path: Path | None) -> str:
    """The line Ctrl-C prints: how many cases were measured, and where they were written."""
    if not results:
        return "interrupted (SIGINT) before the first case was measured: nothing written"
    written = f"written to {json_path} (complete: false)" if json_path is not None else "nothing written (no --json)"
    return f"interrupted (SIGINT) after {plural(len(results), 'measured case')}: {written}"


if __name__ == "__main__":
    sys.exit(main())
