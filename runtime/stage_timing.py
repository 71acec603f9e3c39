"""Where the time goes: GuideSR's forward split into its stages, each timed on its own.

    python -m runtime.stage_timing --preset sd-turbo --random-weights --size 512 --json OUT/stages.json
    python -m runtime.stage_timing --size 128          # the embedded demo model (on the CPU here)

The model is prepared as the compiled backend prepares it (`export.merge.inference_copy`: LoRA
merged, fp16 weights, channels_last) but runs eagerly, stage by stage, as `GuideSR.forward` calls
them. On CUDA each stage is captured in a CUDA graph and timed over graph replays
(`triton.testing.do_bench_cudagraph`), so the host's launch overhead, which dominates eager PyTorch
at batch 1, is left out: what remains is the GPU time of PyTorch's, cuDNN's and the Triton ops'
kernels, the time torch.compile has to beat. The whole forward is timed the same way, and once more
without a graph (`do_bench`: plain eager, host overhead included). On the CPU every time is a
`time.perf_counter` median.

FLOPs per stage come from FlopCounterMode on the same call; TFLOP/s = FLOPs / time, next to the
card's fp16 matmul rate (runtime.report.matmul_rate) where one is measured.

`--profile-compiled N` (CUDA) first builds the compiled backend for the same size and records N of its
graph replays with torch.profiler: GPU time per forward by kernel category (convolution, matmul,
attention, normalisation, other Inductor kernels, copies and memsets) and the 40 costliest kernels,
so a change to the compiled backend can be checked where it should act; then N calls of the compiled
function outside the graph, for the GPU time of each PyTorch op (convolutions, matmuls, attention) by
input shape; then the backend's whole calls (graph replay alone, tiles on the GPU, tiles on the CPU),
so the host side of a call is measured without a report run. The profile is written to --json as
soon as it is taken.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .cli import (EXIT_INTERRUPTED, add_model_arguments, bounded_int, check_model_arguments, check_output_file_argument,
                  plural, write_json)

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def stage_calls(model, image: torch.Tensor) -> dict[str, Callable[[], object]]:
    """{stage: a call of it on inputs made by running the stages before it once}, in forward order."""
    from guidesr.diffusion import unet_forward, vae_decode, vae_encode

    config = model.config
    guidance, _ = model.guidance(image)
    text = model.prompt(image)
    latent, skips = vae_encode(model.vae, image)
    denoised = latent + unet_forward(model.unet, latent, config.timestep, text, guidance, model.injections)
    return {
        "guidance branch": lambda: model.guidance(image),
        "prompt": lambda: model.prompt(image),
        "VAE encoder": lambda: vae_encode(model.vae, image),
        "UNet + long skip": lambda: latent + unet_forward(model.unet, latent, config.timestep, text, guidance,
                                                           model.injections),
        "VAE decoder + skips": lambda: vae_decode(model.vae, denoised, skips, model.vae_skips),
        "whole forward": lambda: model(image).r1,
    }


def count_flops(call: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        call()
    return int(counter.get_total_flops())


def time_call(call: Callable[[], object], device: torch.device, graph: bool, repeats: int) -> float:
    """Median milliseconds: CUDA-graph replays or plain launches on CUDA, perf_counter on the CPU."""
    if device.type == "cuda":
        from kernels.benchmark import graph_median_ms, median_ms

        return graph_median_ms(call) if graph else median_ms(call)
    from .report import time_ms

    call()
    return statistics.median(time_ms(call, device) for _ in range(repeats))


def measure(model, device: torch.device, precision: str, height: int, width: int, batch: int,
            repeats: int) -> list[dict]:
    """One row per stage (and the whole forward): ms, FLOPs, TFLOP/s, share of the staged sum."""
    dtype = DTYPES[precision]
    generator = torch.Generator(device="cpu").manual_seed(0)
    image = (torch.rand(batch, 3, height, width, generator=generator) * 2 - 1).to(
        device=device, dtype=dtype, memory_format=torch.channels_last)
    rows = []
    with torch.no_grad():
        calls = stage_calls(model, image)
        for name, call in calls.items():
            timing = "CUDA-graph replays" if device.type == "cuda" else "perf_counter"
            try:
                ms = time_call(call, device, graph=True, repeats=repeats)
            except Exception as err:  # noqa: BLE001 - a stage that cannot be captured keeps its row, with why
                rows.append({"stage": name, "error": f"{type(err).__name__}: {err}"})
                continue
            flops = count_flops(call)
            rows.append({"stage": name, "ms": ms, "timing": timing, "flops": flops,
                         "tflop_s": flops / (ms / 1e3) / 1e12})
        if device.type == "cuda":
            ms = time_call(calls["whole forward"], device, graph=False, repeats=repeats)
            rows.append({"stage": "whole forward, eager launches (no graph)", "ms": ms, "timing": "do_bench",
                         "flops": rows[-1].get("flops"), "tflop_s": None})
    stages = [row for row in rows if "ms" in row and not row["stage"].startswith("whole forward")]
    staged_ms = sum(row["ms"] for row in stages)
    for row in stages:
        row["share"] = row["ms"] / staged_ms
    return rows


# (category, pattern on the kernel name), first match wins: cuDNN's attention kernels before its convolutions;
# Inductor's kernels (triton_*) are named after the ops they fuse, which often include "convolution" (its bias)
KERNEL_CATEGORIES = (
    ("attention", re.compile(r"fmha|sdpa|flash|attention", re.I)),
    ("normalisation", re.compile(r"group_norm|layer_norm|var_mean", re.I)),
    ("other Inductor kernels", re.compile(r"^triton_")),
    ("copies and memsets", re.compile(r"memcpy|memset|copy", re.I)),  # before "conv", which "convert" contains
    ("convolution", re.compile(r"fprop|conv|dgrad|implicit_gemm", re.I)),
    ("matmul", re.compile(r"nvjet|gemm|cublas|cutlass", re.I)),
)


def kernel_category(name: str) -> str:
    return next((category for category, pattern in KERNEL_CATEGORIES if pattern.search(name)), "other")


def profile_compiled(model, device: torch.device, precision: str, height: int, width: int, batch: int,
                     replays: int) -> dict:
    """GPU milliseconds per forward of the compiled backend's graph replays, by category and by kernel."""
    from kernels.benchmark import kernel_ms

    from .backends.compiled import CompiledBackend

    backend = CompiledBackend(model, device, precision, (height, width), batch)
    tiles = torch.rand(batch, 3, height, width, device=device) * 2 - 1
    kernels = kernel_ms(lambda: backend(tiles), replays)
    rows = [{"name": name, "category": kernel_category(name)} | kernel for name, kernel in kernels.items()]
    categories: dict[str, float] = {}
    for row in rows:
        categories[row["category"]] = categories.get(row["category"], 0.0) + row["ms"]
    return {"backend": backend.describe(), "replays": replays, "gpu_ms_per_forward": sum(r["ms"] for r in rows),
            "call_ms": backend_call_ms(backend, tiles),
            "categories_ms": dict(sorted(categories.items(), key=lambda item: -item[1])), "kernels": rows,
            **op_device_ms(lambda: backend.compiled_forward(), replays)}


def backend_call_ms(backend, tiles: torch.Tensor, calls: int = 50) -> dict[str, float]:
    """Median ms of whole backend calls (CUDA events, as runtime.report times them): the graph replay alone,
    tiles on the GPU, and tiles on the CPU (the host copies and the synchronisation included)."""
    from .report import time_ms

    host_tiles = tiles.cpu()
    cases = {"graph replay": backend.replay_graph, "device tensors": lambda: backend(tiles),
             "CPU tensors": lambda: backend(host_tiles)}
    result = {}
    for name, call in cases.items():
        call()
        result[name] = statistics.median(time_ms(call, tiles.device) for _ in range(calls))
    return result


def op_device_ms(call: Callable[[], object], calls: int, top: int = 60) -> dict:
    """From one profile of `call` (run without a CUDA graph, so the ops are seen):

    - "ops": the costliest PyTorch ops by the GPU time of the kernels each launches itself, with their input
      shapes (which convolution or matmul shape is slow). Inductor's own Triton kernels are launched from its
      generated code, not from an op: they are not here;
    - "memset_launchers": {op: memset kernels it launches per call}, most first, an op being the innermost
      PyTorch op whose launch the memset correlates with (where the forward's memsets come from)."""
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages(group_by_input_shape=True)
              if e.device_type == torch.autograd.DeviceType.CPU and e.self_device_time_total > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    memsets: dict[str, int] = {}
    for event in prof.events():
        count = sum("memset" in kernel.name.lower() for kernel in event.kernels)
        if count:
            memsets[event.name] = memsets.get(event.name, 0) + count
    return {"ops": [{"op": e.key, "shapes": str(e.input_shapes), "ms": e.self_device_time_total / 1e3 / calls,
                     "calls": e.count / calls} for e in events[:top]],
            "memset_launchers": {name: count / calls for name, count in sorted(memsets.items(), key=lambda i: -i[1])}}


def format_profile(profile: dict, top: int = 40) -> str:
    lines = [f"\n{profile['backend']}: {profile['gpu_ms_per_forward']:.3f} GPU-ms per forward "
             f"(torch.profiler, {plural(profile['replays'], 'replay')})",
             "| category | ms per forward |", "|---|---|"]
    lines += [f"| {category} | {ms:.3f} |" for category, ms in profile["categories_ms"].items()]
    lines += ["", "| kernel | category | ms per forward | launches per forward |", "|---|---|---|---|"]
    lines += [f"| {k['name'][:100]} | {k['category']} | {k['ms']:.3f} | {k['launches']:g} |"
              for k in profile["kernels"][:top]]
    lines += ["", "| op (outside the graph) | input shapes | GPU ms per forward | calls per forward |",
              "|---|---|---|---|"]
    lines += [f"| {op['op']} | {op['shapes'][:120]} | {op['ms']:.3f} | {op['calls']:g} |"
              for op in profile["ops"][:top]]
    memsets = profile["memset_launchers"]
    lines += ["", f"memsets per forward outside the graph: {sum(memsets.values()):g}"
              + "".join(f"; {op} {n:g}" for op, n in memsets.items())]
    lines += ["", "whole calls, median ms: " + ", ".join(f"{name} {ms:.3f}" for name, ms in profile["call_ms"].items())]
    return "\n".join(lines)


def format_table(rows: list[dict], title: str, matmul_tflop_s: float | None, precision: str = "fp16") -> str:
    lines = [title, "| stage | ms | GFLOP | TFLOP/s | share of the stages |", "|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['stage']} | failed: {row['error']} | | | |")
            continue
        flops = f"{row['flops'] / 1e9:.1f}" if row.get("flops") is not None else ""
        rate = f"{row['tflop_s']:.3g}" if row.get("tflop_s") is not None else ""
        share = f"{row['share']:.0%}" if row.get("share") is not None else ""
        lines.append(f"| {row['stage']} | {row['ms']:.3f} | {flops} | {rate} | {share} |")
    if matmul_tflop_s is not None:
        lines.append(f"\nmeasured {precision} matmul rate: {matmul_tflop_s:.0f} TFLOP/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    profile_written_to: list[Path] = []
    try:
        return _stage_timing(argv, profile_written_to)
    except KeyboardInterrupt:
        written = (f"--json {profile_written_to[0]} has the compiled profile only, no stage times"
                   if profile_written_to else "nothing written")
        print(f"interrupted (SIGINT): {written}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _stage_timing(argv: list[str] | None, profile_written_to: list[Path]) -> int:
    """main's work; the --json holding the compiled profile alone, once written, is appended to
    `profile_written_to`."""
    from guidesr.config import PRESETS

    from .backends.base import BackendError
    from .backends.registry import resolve_device
    from .report import load_model_from_args, matmul_rate, parse_size

    parser = argparse.ArgumentParser(prog="python -m runtime.stage_timing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, PRESETS)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=tuple(DTYPES), help="default: fp16 on CUDA, fp32 on the CPU")
    parser.add_argument("--size", type=parse_size, default=(512, 512), help="output size, N or HxW (default 512)")
    parser.add_argument("--batch", type=bounded_int(1), default=1,
                        help="images of --size per forward (default 1; with --profile-compiled, also the compiled "
                             "backend's tile batch)")
    parser.add_argument("--triton-kernels", choices=("on", "off"), default="on",
                        help="the fused Triton ops (used on CUDA only; default on)")
    parser.add_argument("--repeats", type=bounded_int(1), default=10,
                        help="timed calls per stage on the CPU (default 10)")
    parser.add_argument("--profile-compiled", type=bounded_int(0), default=0, metavar="N",
                        help="CUDA: first profile N graph replays of the compiled backend at this size (default 0: no)")
    parser.add_argument("--json", type=Path, help="write the rows and settings here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json (default: refuse it)")
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    check_output_file_argument(parser, "--json", args.json, overwrite=args.overwrite)
    try:
        device = resolve_device(args.device)
    except BackendError as err:
        parser.error(str(err))
    if args.profile_compiled and device.type != "cuda":
        parser.error(f"--profile-compiled needs a CUDA device (the compiled backend's), not {device}")
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    try:  # CheckpointError and BaseModelError are ValueErrors
        model, weights = load_model_from_args(args)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    multiple = model.descriptor.size_multiple
    height, width = args.size
    if height % multiple or width % multiple:
        parser.error(f"--size {height}x{width} must be a multiple of the model's size multiple {multiple}")
    # export.merge and guidesr.model import peft and diffusers (seconds): not before the arguments are checked
    from export.merge import inference_copy
    from guidesr.model import set_kernels_enabled

    set_kernels_enabled(model, args.triton_kernels == "on")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    profile = None
    if args.profile_compiled:  # first: a run stopped at a time limit during the stages has printed it
        profile = profile_compiled(model, device, precision, height, width, args.batch, args.profile_compiled)
        print(format_profile(profile), flush=True)
        if args.json is not None:
            _write_json(parser, args.json, {"compiled_profile": profile})
            profile_written_to.append(args.json)
    prepared = inference_copy(model, device, DTYPES[precision])
    rows = measure(prepared, device, precision, height, width, args.batch, args.repeats)
    rate = matmul_rate(device, precision) / 1e12 if device.type == "cuda" else None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    kernels = (f"Triton kernels {args.triton_kernels}" if device.type == "cuda"
               else "no Triton kernels (the fused ops run as plain PyTorch on the CPU)")
    title = (f"{model.config.preset} ({weights}), {precision}, batch {args.batch}, {height}x{width} output, "
             f"{device_name}, {kernels}")
    print(format_table(rows, title, rate, precision))
    if args.json is not None:
        _write_json(parser, args.json, {"title": title, "device": device_name, "matmul_tflop_s": rate,
                                        "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                        "compiled_profile": profile})
    return 1 if any("error" in row for row in rows) else 0


def _write_json(parser: argparse.ArgumentParser, path: Path, data: dict) -> None:
    """`data` into `path` whole (runtime.cli.write_json), or exit 1 with one line saying why it could not be."""
    try:
        write_json(data, path)
    except OSError as error:
        parser.exit(1, f"{parser.prog}: error: cannot write --json {path}: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
