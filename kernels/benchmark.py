"""Benchmark the fused kernels against eager PyTorch and torch.compile (GPU only).

    python -m kernels.benchmark [--json results.json]

All timings are `triton.testing.do_bench` medians in milliseconds, fp16, under torch.no_grad
(inference, the only mode the ops serve). do_bench flushes the L2 cache before every repetition,
so each call starts from DRAM. The "GB/s" columns are *effective* bandwidths: the op's minimum
traffic (what the fused kernel moves) divided by the measured time, printed next to the device's
copy bandwidth (a 1 GiB device-to-device `copy_`, counted as read + write) as the roofline:

- FCA channel attention, minimum 3·N·e bytes (read y twice, write z) with N = B·C·H·W;
- pixel-unshuffle + concat, minimum 2·(N_h + N_f)·e bytes (read each input once, write the output).

Sections: the attention op (Triton / eager / compiled reference) for C in {32, 64}, 512² to
2048², batch 1 and 4; the whole FCA block (conv1 -> attention -> conv2 + residual, the model's
`guidesr.guidance.FCABlock`) with and without the kernel; the unshuffle + concat op at the
injection's first and last scales (s = 8 with 64 guidance channels next to 320 UNet channels,
s = 64 with 1 next to 1280) and, for the same shapes, concat + 1x1 projection against the
equivalent 1x1 + (s x s, stride s) convolution pair that never builds the concatenation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

SIZES = (512, 1024, 2048)
BATCHES = (1, 4)
FCA_CHANNELS = (32, 64)
INJECTION_SCALES = ((8, 64, 320), (64, 1, 1280))  # (s, guidance channels Cf, UNet channels Ch)
DEVICE = "cuda"
DTYPE = torch.float16
ELEMENT_BYTES = 2


def median_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, return_mode="median"))


def copy_bandwidth_gbs() -> float:
    src = torch.empty(2**29, dtype=DTYPE, device=DEVICE)  # 1 GiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * ELEMENT_BYTES / ms / 1e6


def bench_fca_attention(results: list[dict]) -> None:
    from kernels.fca_attention import fca_channel_attention, fca_channel_attention_reference

    compiled = torch.compile(fca_channel_attention_reference, dynamic=False)
    for channels in FCA_CHANNELS:
        weight = torch.randn(channels, channels, 1, 1, device=DEVICE, dtype=DTYPE) / channels**0.5
        bias = torch.randn(channels, device=DEVICE, dtype=DTYPE) * 0.1
        for size in SIZES:
            for batch in BATCHES:
                y = torch.randn(batch, channels, size, size, device=DEVICE, dtype=DTYPE)
                fused = fca_channel_attention(y, weight, bias, use_kernel=True)
                eager = fca_channel_attention_reference(y, weight, bias)
                times = {
                    "triton": median_ms(lambda: fca_channel_attention(y, weight, bias, use_kernel=True)),
                    "eager": median_ms(lambda: fca_channel_attention_reference(y, weight, bias)),
                    "compile": median_ms(lambda: compiled(y, weight, bias)),
                }
                results.append({
                    "section": "fca_attention", "shape": [batch, channels, size, size], "ms": times,
                    "min_bytes": 3 * y.numel() * ELEMENT_BYTES,
                    "max_abs_diff_vs_eager": (fused.float() - eager.float()).abs().max().item(),
                })
                del y, fused, eager


def bench_fca_block(results: list[dict]) -> None:
    from guidesr.guidance import FCABlock

    for channels in FCA_CHANNELS:
        block = FCABlock(channels).to(DEVICE, DTYPE).eval()
        for size in SIZES:
            for batch in BATCHES:
                x = torch.randn(batch, channels, size, size, device=DEVICE, dtype=DTYPE)
                times = {}
                for name, use_kernel in (("triton", True), ("eager", False)):
                    block.use_kernel = use_kernel
                    times[name] = median_ms(lambda: block(x))
                results.append({"section": "fca_block", "shape": [batch, channels, size, size], "ms": times})
                del x


def bench_unshuffle_concat(results: list[dict]) -> None:
    from kernels.pixel_unshuffle_concat import pixel_unshuffle_concat, pixel_unshuffle_concat_reference

    compiled = torch.compile(pixel_unshuffle_concat_reference, dynamic=False)
    for s, cf, ch in INJECTION_SCALES:
        width = ch + cf * s * s
        weight = torch.randn(ch, width, 1, 1, device=DEVICE, dtype=DTYPE) / width**0.5
        bias = torch.randn(ch, device=DEVICE, dtype=DTYPE) * 0.1
        weight_h = weight[:, :ch].contiguous()
        weight_f = weight[:, ch:].reshape(ch, cf, s, s).contiguous()  # unshuffle's channel order c*s*s + i*s + j
        for size in SIZES:
            for batch in BATCHES:
                h = torch.randn(batch, ch, size // s, size // s, device=DEVICE, dtype=DTYPE)
                f = torch.randn(batch, cf, size, size, device=DEVICE, dtype=DTYPE)

                def concat_then_project():
                    return F.conv2d(pixel_unshuffle_concat(h, f, s, use_kernel=True), weight, bias)

                def eager_concat_then_project():
                    return F.conv2d(pixel_unshuffle_concat_reference(h, f, s), weight, bias)

                def strided_projection():
                    return F.conv2d(h, weight_h, bias) + F.conv2d(f, weight_f, stride=s)

                times = {
                    "triton": median_ms(lambda: pixel_unshuffle_concat(h, f, s, use_kernel=True)),
                    "eager": median_ms(lambda: pixel_unshuffle_concat_reference(h, f, s)),
                    "compile": median_ms(lambda: compiled(h, f, s)),
                    "triton_concat+1x1": median_ms(concat_then_project),
                    "eager_concat+1x1": median_ms(eager_concat_then_project),
                    "1x1+strided_conv": median_ms(strided_projection),
                }
                fused = pixel_unshuffle_concat(h, f, s, use_kernel=True)
                exact = torch.equal(fused, pixel_unshuffle_concat_reference(h, f, s))
                projection_diff = (concat_then_project().float() - strided_projection().float()).abs().max().item()
                results.append({
                    "section": "unshuffle_concat", "shape": {"h": list(h.shape), "f": list(f.shape), "s": s},
                    "ms": times, "min_bytes": 2 * (h.numel() + f.numel()) * ELEMENT_BYTES,
                    "equal_to_eager": exact, "max_abs_diff_concat_vs_strided_projection": projection_diff,
                })
                del h, f, fused


def print_table(results: list[dict], copy_gbs: float) -> None:
    print(f"\ncopy bandwidth (roofline): {copy_gbs:.0f} GB/s; GB/s below = minimum bytes / time")
    print(f"{'section':<17}{'shape':<34}{'triton':>9}{'eager':>9}{'compile':>9}{'x eager':>8}{'x comp':>8}{'GB/s':>7}")
    for r in results:
        t = r["ms"]
        shape = r["shape"] if r["section"] != "unshuffle_concat" else f"s={r['shape']['s']} f={r['shape']['f']}"
        compile_ms = t.get("compile")
        print(
            f"{r['section']:<17}{str(shape):<34}{t['triton']:>9.3f}{t['eager']:>9.3f}"
            + (f"{compile_ms:>9.3f}" if compile_ms else f"{'-':>9}")
            + f"{t['eager'] / t['triton']:>8.2f}"
            + (f"{compile_ms / t['triton']:>8.2f}" if compile_ms else f"{'-':>8}")
            + (f"{r['min_bytes'] / t['triton'] / 1e6:>7.0f}" if "min_bytes" in r else f"{'-':>7}")
        )
    print("\nconcat + 1x1 projection vs the 1x1 + strided-conv pair (ms)")
    for r in results:
        if r["section"] == "unshuffle_concat":
            t = r["ms"]
            print(
                f"  s={r['shape']['s']:<3} f={str(r['shape']['f']):<22} triton concat+1x1 {t['triton_concat+1x1']:8.3f}"
                f"  eager concat+1x1 {t['eager_concat+1x1']:8.3f}  1x1+strided {t['1x1+strided_conv']:8.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write every measurement to this JSON file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernels.benchmark needs a CUDA GPU and Triton; torch.cuda.is_available() is False here.")

    torch.backends.cudnn.benchmark = True
    # One static compilation per shape; fail rather than silently fall back to eager past the limit.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    start = time.perf_counter()
    copy_gbs = copy_bandwidth_gbs()
    results: list[dict] = []
    with torch.no_grad():
        for section in (bench_fca_attention, bench_fca_block, bench_unshuffle_concat):
            section(results)
            print(f"[{time.perf_counter() - start:6.1f} s] {section.__name__} done", flush=True)

    if args.json:
        import triton

        with open(args.json, "w") as fh:
            json.dump({
                "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "dtype": str(DTYPE), "copy_bandwidth_gbs": copy_gbs, "results": results,
            }, fh, indent=2)
    print_table(results, copy_gbs)


if __name__ == "__main__":
    main()
