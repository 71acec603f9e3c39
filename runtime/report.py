"""Performance report: latency, throughput, memory and accuracy of every backend (issue 7).

    python -m runtime.report                                   # the embedded demo model, every backend here
    python -m runtime.report --preset sd-turbo --random-weights --device cuda --backends torch compiled \\
        --precisions fp16 --sizes 512 1024 --tiled 2160x3840 --tiled-backends compiled
    python -m runtime.report --preset tiny --random-weights --sizes 64 96 --tiled 128 --tile 64 --repeats 2

Sizes are output pixels, H or HxW (a 4K UHD frame is 2160x3840). For every backend x precision x
size it measures, on one input photo (scikit-image's astronaut, resized to the LR size and
upsampled bicubically per tile, as the runtime does):

- latency, median and p90 after at least --warmup untimed calls, continued until they add up to
  --warmup-s seconds (after 3 calls, the first H200 host-path samples were still 3-5 ms slow), with
  CUDA events on the GPU and time.perf_counter on the CPU. Whole sizes (--sizes): --repeats calls
  of the `Backend` on a prepared input (CPU tensor in, CPU tensor out, so the host<->device copies
  are included); on CUDA, backends with `device_io` (torch, compiled) are also timed with the input already on
  the GPU and the output left there ("device I/O": the model without the host round trip).
  Tiled sizes (--tiled): --tiled-repeats whole `run_tiled` passes as the runtime makes them
  (each tile upsampled from the LR image, tiles of --tile with --overlap, blending included);
- throughput: output megapixels per second at the median;
- peak memory during the timed calls: torch.cuda.max_memory_allocated on the GPU (memory that
  ONNX Runtime or TensorRT allocate outside PyTorch's allocator is not in it), the process's RSS
  high-water mark (VmHWM, reset through /proc/self/clear_refs) on the CPU. Both include the
  model's weights;
- accuracy against the PyTorch fp32 reference (--validate's: eager, fp32 without TF32, Triton
  kernels off, on the same device and tiles), compared as --validate compares (R1 mapped to
  [0, 1] and clipped; PSNR, SSIM and max-abs from guidesr.metrics);
- the arithmetic floor: the FLOPs of one image (torch.utils.flop_counter.FlopCounterMode on the
  model with LoRA merged, counted on the meta device; a tiled size counts every tile) divided
  by the measured matrix rate of that precision (a large matmul on random data), and the gap
  = median / floor.

A static backend (compiled; onnxruntime exporting its own graph) is built for one tile shape:
once per whole size and once for --tile; its build time (compilation, export) is in each row
(`backend_setup_s`). `--cudnn-benchmark` turns cudnn.benchmark on for the whole run, so eager
PyTorch is compared with tuned cuDNN algorithms too.

`--quality sample|DIR` adds PSNR/SSIM against ground truth (next to bicubic) on the held-out
sample photos or a folder of HR images, degraded as guidesr.evaluate does.

Writes into --out: report.json, report.md, latency.png and accuracy.png; where any of them exists
already, it stops before measuring (status 2) unless --overwrite is given, which removes them before
the first measurement, so that a run killed midway never leaves its files beside an earlier run's.
report.json is rewritten after every measured row ("complete": false until the end), so an
interrupted run keeps what it measured; SIGTERM or Ctrl-C stops the run and still writes all four
files ("interrupted" says so).
Exit status: 0 when every row was measured, 1 when any failed (the error is in its row) or SIGTERM
stopped the run (a session's time limit), 2 for bad options, 130 when Ctrl-C stopped it.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from export.graphs import size_argument
from guidesr.config import PRESETS
from guidesr.metrics import psnr, ssim

from .cli import (EXIT_INTERRUPTED, add_model_arguments, bounded_float, bounded_int, check_model_arguments,
                  check_output_files, plural, write_json)
from .environment import environment
from .backends import BACKENDS, PRECISIONS, Backend, BackendError, create_backend, resolve_device
from .tiling import BicubicSource, TilePlan, fit_to_shape, plan_tiles, run_tiled
from .upscale import checked_tile, overlap_problem
from .validate import ReferenceBackend, compare_images

DEFAULT_SIZES = ("256", "512", "1024")
DEFAULT_TILED = ("2048", "2160x3840")
JSON_NAME, MARKDOWN_NAME, LATENCY_PLOT, ACCURACY_PLOT = "report.json", "report.md", "latency.png", "accuracy.png"
REPORT_FILES = (JSON_NAME, MARKDOWN_NAME, LATENCY_PLOT, ACCURACY_PLOT)
MATMUL_SIZE = {"cuda": 8192, "cpu": 1024}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
VERSIONED_MODULES = ("torch", "triton", "onnxruntime", "tensorrt", "diffusers", "numpy")


@dataclass(frozen=True)
class Geometry:
    """An output size, run whole (one call) or tiled."""

    height: int
    width: int
    tiled: bool

    @property
    def label(self) -> str:
        return f"{self.height}x{self.width}" + (" tiled" if self.tiled else "")

    @property
    def megapixels(self) -> float:
        return self.height * self.width / 1e6


parse_size = size_argument("size")  # '512' -> (512, 512); '2160x3840' -> (2160, 3840), height first: export's --tile


# ------------------------------------------------------------------------------------- measuring


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on the GPU (idle gaps included), perf_counter on the CPU."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    start_s = time.perf_counter()
    fn()
    return (time.perf_counter() - start_s) * 1e3


class PeakMemory:
    """Peak memory over a window: CUDA allocator peak, or the process's RSS high-water mark."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.source = ("torch.cuda.max_memory_allocated (PyTorch's allocator only: memory ONNX Runtime "
                           "or TensorRT allocate themselves is not counted); includes every model on the device "
                           "(the reference's fp32 model; the torch backend's LoRA-merged copy)")
        else:
            self.source = ("process RSS high-water mark (VmHWM after a reset via /proc/self/clear_refs); "
                           "includes the model")

    def reset(self) -> int:
        """Start a window; returns what is in use now (allocated on the GPU, resident on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: resets VmHWM to the current RSS
        return self._status_bytes("VmRSS:")

    def read(self) -> int:
        """The peak since reset()."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return self._status_bytes("VmHWM:")

    @staticmethod
    def _status_bytes(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024  # kB
        raise RuntimeError(f"/proc/self/status has no {field} line")


def warm_up(fn: Callable[[], object], device: torch.device, calls: int, seconds: float) -> list[float]:
    """Untimed calls: at least `calls`, continued until they add up to `seconds`; returns their milliseconds."""
    times: list[float] = []
    while len(times) < calls or sum(times) < seconds * 1e3:
        times.append(time_ms(fn, device))
    return times


def latency_stats(samples: list[float]) -> dict:
    return {"median": float(np.median(samples)), "p90": float(np.percentile(samples, 90)),
            "min": float(min(samples)), "samples": [round(s, 4) for s in samples]}


def matmul_rate(device: torch.device, precision: str, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matmul in the precision's dtype on random data (median of `repeats`)."""
    n = MATMUL_SIZE[device.type]
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=DTYPES[precision], generator=generator)
    b = torch.randn(n, n, device=device, dtype=DTYPES[precision], generator=generator)
    for _ in range(3):
        torch.mm(a, b)
    median_ms = float(np.median([time_ms(lambda: torch.mm(a, b), device) for _ in range(repeats)]))
    return 2 * n**3 / (median_ms / 1e3)


class FlopCounter:
    """FLOPs of one forward at a given size, on a meta-device copy of the architecture (no memory, no compute)."""

    def __init__(self, config):
        from guidesr.model import GuideSR

        with torch.device("meta"):
            self.model = GuideSR(config)
        self.model.merge_lora()  # what export and deployment run
        self.model.eval().requires_grad_(False)
        self._cache: dict[tuple[int, int], int] = {}

    def __call__(self, height: int, width: int) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        if (height, width) not in self._cache:
            with FlopCounterMode(display=False) as counter:
                self.model(torch.empty(1, 3, height, width, device="meta"))
            self._cache[(height, width)] = int(counter.get_total_flops())
        return self._cache[(height, width)]


def photo_lr(height: int, width: int, scale: int) -> torch.Tensor:
    """The LR input for an output of height x width: scikit-image's astronaut, Lanczos-resized, [3, h, w] in [-1, 1]."""
    from PIL import Image
    from skimage import data

    if height % scale or width % scale:
        raise ValueError(f"size {height}x{width} is not a multiple of the model's scale {scale}")
    photo = Image.fromarray(data.astronaut()).resize((width // scale, height // scale), Image.LANCZOS)
    return torch.from_numpy(np.asarray(photo, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def accuracy(output: torch.Tensor, reference: torch.Tensor) -> dict:
    """--validate's comparison (runtime.validate.compare_images: R1 mapped to [0, 1] and clipped as it would
    be written; PSNR, SSIM, max-abs), PSNR None when identical, and how much of the reference is clamped."""
    def image(r1: torch.Tensor) -> np.ndarray:
        return ((r1[0].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)

    value, similarity, worst = compare_images(image(output), image(reference))
    return {"psnr_db": None if math.isinf(value) else value, "ssim": similarity, "max_abs": worst,
            "reference_clamped_fraction": float((reference.abs() >= 1).float().mean())}


def tile_function(backend: Backend):
    return fit_to_shape(backend, backend.tile_shape) if backend.tile_shape is not None else backend


def plan_for(backend: Backend, geometry: Geometry, tile: int, overlap: int) -> TilePlan:
    tile_shape = checked_tile(backend, tile, overlap) if geometry.tiled else None
    return plan_tiles(geometry.height, geometry.width, tile_shape, overlap)


def run_tiles(function, source: BicubicSource, plan: TilePlan, tile_batch: int) -> torch.Tensor:
    """One tiled pass as the runtime makes it (tiles upsampled from the LR image, run, blended): [1, 3, H, W]."""
    (image,) = run_tiled(source, plan, [function], tile_batch=tile_batch)
    return torch.from_numpy(image).permute(2, 0, 1)[None]


# ---------------------------------------------------------------------------------------- the run


class Report:
    def __init__(self, args: argparse.Namespace, command: str, model, weights: str, device: torch.device):
        self.args = args
        self.model = model
        self.device = device
        self.scale = model.config.scale
        self.memory = PeakMemory(device)
        self.flops = FlopCounter(model.config)
        self._references: dict[tuple, torch.Tensor] = {}
        self._sources: dict[tuple[int, int], BicubicSource] = {}
        self.data = {
            "title": report_title(model.config.preset, args.random_weights),
            "complete": False,
            "preset": model.config.preset,
            "random_weights": args.random_weights,
            "weights": weights,
            "command": command,
            "environment": environment(device, VERSIONED_MODULES),
            "settings": {
                "device": str(device), "sizes": [list(s) for s in args.sizes], "tiled": [list(s) for s in args.tiled],
                "tile": args.tile, "overlap": args.overlap, "tile_batch": args.tile_batch, "warmup": args.warmup,
                "warmup_s": args.warmup_s,
                "repeats": args.repeats, "tiled_repeats": args.tiled_repeats, "cudnn_benchmark": args.cudnn_benchmark,
                "compile_mode": "max-autotune-no-cudagraphs" if args.autotune else "default",
                "triton_kernels": args.triton_kernels,
                "input": "scikit-image astronaut, Lanczos-resized to the LR size, bicubic x scale per tile",
            },
            "reference": f"PyTorch fp32 reference (runtime.validate.ReferenceBackend: eager, no TF32, Triton kernels "
                         f"off) on {device}, same input and tiles",
            "memory_measure": self.memory.source,
            "latency_measure": ("CUDA events" if device.type == "cuda" else "time.perf_counter")
            + " around each timed call (a Backend call with CPU tensors in and out, or a whole run_tiled pass; "
            "'device I/O': the same whole-image call with the input already on the GPU and the output left there)",
            "flops_measure": "torch.utils.flop_counter.FlopCounterMode, model with LoRA merged, batch 1, meta device",
            "matmul_rate_flops": {},
            "results": [],
            "skipped": [],
            "quality": None,
        }

    def source(self, geometry: Geometry) -> BicubicSource:
        key = (geometry.height, geometry.width)
        if key not in self._sources:
            self._sources[key] = BicubicSource(photo_lr(geometry.height, geometry.width, self.scale), self.scale)
        return self._sources[key]

    def whole_input(self, geometry: Geometry) -> torch.Tensor:
        """[1, 3, H, W]: the model's input for a whole-image call."""
        return self.source(geometry)(0, 0, geometry.height, geometry.width)[None]

    def reference(self, geometry: Geometry, plan: TilePlan) -> torch.Tensor:
        key = (plan.height, plan.width, plan.tile_h, plan.tile_w, plan.overlap)
        if key not in self._references:
            reference = ReferenceBackend(self.model, self.device)
            self._references[key] = (reference(self.whole_input(geometry)) if plan.whole
                                     else run_tiles(reference, self.source(geometry), plan, self.args.tile_batch))
        return self._references[key]

    def matmul_rate(self, precision: str) -> float:
        rates = self.data["matmul_rate_flops"]
        if precision not in rates:
            rates[precision] = matmul_rate(self.device, precision)
        return rates[precision]

    def measure(self, backend: Backend, geometry: Geometry) -> dict:
        args, device = self.args, self.device
        function = tile_function(backend)
        plan = plan_for(backend, geometry, args.tile, args.overlap)
        source = self.source(geometry)
        if plan.whole:  # one Backend call on a prepared input
            image = self.whole_input(geometry)
            warm_input, repeats = image, args.repeats
        else:  # the whole tiled pass: per-tile upsampling, Backend calls, blending
            batch = min(args.tile_batch, plan.num_tiles)
            warm_input = source(0, 0, plan.tile_h, plan.tile_w)[None].expand(batch, -1, -1, -1).contiguous()
            repeats = args.tiled_repeats
        warmup_ms = warm_up(lambda: function(warm_input), device, args.warmup, args.warmup_s)
        last = {}

        def one_pass() -> None:
            last["output"] = function(image) if plan.whole else run_tiles(function, source, plan, args.tile_batch)

        in_use = self.memory.reset()
        samples = [time_ms(one_pass, device) for _ in range(repeats)]
        peak = self.memory.read()
        output = last["output"]
        if not torch.isfinite(output).all():
            raise FloatingPointError(f"{backend.name} {backend.precision} produced NaN/Inf at {geometry.label}")
        latency = latency_stats(samples)
        device_io = self.measure_device_io(function, backend, image) if plan.whole else None
        tile_flops = self.flops(plan.tile_h, plan.tile_w)
        flops = tile_flops * plan.num_tiles
        floor_ms = flops / self.matmul_rate(backend.precision) * 1e3
        return {
            "backend": backend.name, "precision": backend.precision, "description": backend.describe(),
            "mode": "tiled" if geometry.tiled else "whole", "height": geometry.height, "width": geometry.width,
            "megapixels": geometry.megapixels, "tile": [plan.tile_h, plan.tile_w], "overlap": plan.overlap,
            "tiles": plan.num_tiles, "warmup_ms": [round(s, 4) for s in warmup_ms], "repeats": repeats,
            "latency_ms": latency, "device_io_latency_ms": device_io,
            "throughput_mp_s": geometry.megapixels / (latency["median"] / 1e3),
            "memory_at_start_bytes": in_use, "peak_memory_bytes": peak,
            "accuracy": accuracy(output, self.reference(geometry, plan)),
            "flops": flops, "floor_ms": floor_ms, "gap_to_floor": latency["median"] / floor_ms,
            "torch_settings": torch_settings(), "error": None,
        }

    def measure_device_io(self, function, backend: Backend, image: torch.Tensor) -> dict | None:
        """Latency of the same call with the input already on the GPU and the output left there (no host
        round trip; backends with `device_io` on CUDA only, else None)."""
        if self.device.type != "cuda" or not backend.device_io:
            return None
        on_device = image.to(self.device)
        warm_up(lambda: function(on_device), self.device, self.args.warmup, self.args.warmup_s)
        samples = [time_ms(lambda: function(on_device), self.device) for _ in range(self.args.repeats)]
        return latency_stats(samples)

    def add_quality(self, backend: Backend, evaluation) -> None:
        names, lq, hr = evaluation
        restored = torch.cat([tile_function(backend)(x[None]) for x in lq])
        self.data["quality"]["results"].append(
            quality_scores(restored, hr, self.scale) | {"backend": backend.name, "precision": backend.precision})

    def record_failure(self, name: str, precision: str, item, error: str) -> int:
        """A failed item keeps its place in the report, with the error; returns 1 (a count)."""
        tqdm.write(f"FAILED {name} {precision} {item if item == QUALITY else item.label}: {error}", file=sys.stderr)
        if item == QUALITY:
            self.data["quality"]["results"].append({"backend": name, "precision": precision, "error": error})
        else:
            self.data["results"].append({
                "backend": name, "precision": precision, "mode": "tiled" if item.tiled else "whole",
                "height": item.height, "width": item.width, "megapixels": item.megapixels, "error": error})
        return 1

    def save(self) -> None:
        write_json(self.data, Path(self.args.out) / JSON_NAME)


def report_title(preset: str, random_weights: bool) -> str:
    return f"GuideSR benchmark: {preset}" + (", random weights" if random_weights else "")


def quality_scores(restored: torch.Tensor, hr: torch.Tensor, border: int) -> dict:
    a, b = (restored + 1) / 2, (hr + 1) / 2
    return {"psnr_rgb": psnr(a, b, crop=border), "ssim_rgb": ssim(a, b, crop=border)}


def torch_settings() -> dict:
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------ output


def format_markdown(data: dict) -> str:
    env = data["environment"]
    lines = [f"# {data['title']}", ""]
    if data["random_weights"]:
        lines += ["**Random weights**: an untrained model of the real size; latency and memory are "
                  "representative, accuracy only compares backends with each other.", ""]
    lines += [
        f"- command: `{data['command']}`",
        f"- date (UTC): {env['date_utc']}; commit: `{env['git_commit']}`",
        f"- machine: {env['gpu'] or 'no GPU'}"
        + (f" (driver {env['gpu_driver']}, CUDA {env['cuda']})" if env["gpu"] else "")
        + f"; CPU {env['cpu']} x {env['cpu_count']}; {env['platform']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v is not None),
        f"- weights: {data['weights']}",
        f"- input: {data['settings']['input']}",
        f"- latency: {data['latency_measure']}; median and p90 of {plural(data['settings']['repeats'], 'call')} on a "
        f"prepared input (tiled: of "
        f"{plural(data['settings']['tiled_repeats'], 'whole run_tiled pass', 'whole run_tiled passes')}, per-tile "
        f"upsampling and blending included) after at least {plural(data['settings']['warmup'], 'warm-up call')} and "
        f"{data['settings']['warmup_s']} s of them",
        f"- memory: {data['memory_measure']}; (+calls): the part above what was in use when the timed calls began",
        f"- accuracy: against the {data['reference']}; R1 in [0, 1]; the reference is clamped at 0 or 1 in "
        f"{_clamped_percent(data)} of its values (where it is clamped, differences can hide)",
        f"- settings: tile {data['settings']['tile']}, overlap {data['settings']['overlap']}, tile batch "
        f"{data['settings']['tile_batch']}, cudnn.benchmark {data['settings']['cudnn_benchmark']}, Triton kernels "
        f"{data['settings']['triton_kernels']}, compiled backend's torch.compile mode "
        f"{data['settings']['compile_mode']}; compiler "
        f"environment: {data['environment']['compiler_env'] or 'none'}",
        f"- floor: FLOPs ({data['flops_measure']}) / measured matmul rate ("
        + (", ".join(f"{p} {r / 1e12:.2f} TFLOP/s" for p, r in data["matmul_rate_flops"].items()) or "not measured")
        + ")",
        "",
        "| backend | precision | size (HxW) | tiles | median ms | p90 ms | device I/O median ms | MP/s "
        "| peak MiB (+calls) | PSNR dB | SSIM | max-abs | TFLOP | floor ms | gap | build s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if "interrupted" in data:
        lines[2:2] = [f"**Incomplete**: {data['interrupted']}.", ""]
    order = {name: k for k, name in enumerate(dict.fromkeys(r["backend"] for r in data["results"]))}
    rows = sorted(data["results"],
                  key=lambda r: (order[r["backend"]], r["precision"], r["mode"] != "whole", r["megapixels"]))
    for row in rows:
        size = f"{row['height']}x{row['width']}"
        if row["error"] is not None:
            lines.append(f"| {row['backend']} | {row['precision']} | {size} | {row['mode']} | "
                         f"failed: {_table_cell(row['error'])} " + "| " * 11 + "|")
            continue
        acc, lat = row["accuracy"], row["latency_ms"]
        tiles = f"{row['tiles']} x {row['tile'][0]}x{row['tile'][1]}" if row["mode"] == "tiled" else "whole"
        psnr_text = "identical" if acc["psnr_db"] is None else f"{acc['psnr_db']:.2f}"
        device_io = "-" if row["device_io_latency_ms"] is None else f"{row['device_io_latency_ms']['median']:.2f}"
        lines.append(
            f"| {row['backend']} | {row['precision']} | {size} | {tiles} | {lat['median']:.2f} | {lat['p90']:.2f} | "
            f"{device_io} | "
            f"{row['throughput_mp_s']:.3f} | {row['peak_memory_bytes'] / 2**20:.0f} "
            f"(+{(row['peak_memory_bytes'] - row['memory_at_start_bytes']) / 2**20:.0f}) | {psnr_text} | "
            f"{'n/a' if acc['ssim'] is None else format(acc['ssim'], '.5f')} | "
            f"{acc['max_abs']:.2e} | {row['flops'] / 1e12:.3f} | {row['floor_ms']:.2f} | {row['gap_to_floor']:.1f}x | "
            f"{row['backend_setup_s']:.1f} |")
    if data["skipped"]:
        lines += ["", "Not measured here:", ""]
        lines += [f"- {s['backend']} {s['precision'] or ''}: {s['reason']}" for s in data["skipped"]]
    quality = data["quality"]
    if quality is not None:
        lines += ["", f"## Quality against ground truth ({quality['data']}, {quality['crop_size']} px crops, "
                      f"{quality['border']} px border)", "", "| method | PSNR RGB | SSIM RGB |", "|---|---|---|",
                  f"| bicubic | {quality['bicubic']['psnr_rgb']:.2f} | {quality['bicubic']['ssim_rgb']:.4f} |"]
        lines += [f"| {q['backend']} {q['precision']} | failed: {_table_cell(q['error'])} | |" if "error" in q
                  else f"| {q['backend']} {q['precision']} | {q['psnr_rgb']:.2f} | {q['ssim_rgb']:.4f} |"
                  for q in quality["results"]]
    return "\n".join(lines) + "\n"


def _table_cell(text: str) -> str:
    """`text` as one Markdown table cell: a `|` escaped, line breaks as spaces (an error message may hold both)."""
    return " ".join(text.replace("|", "\\|").split())


def _clamped_percent(data: dict) -> str:
    values = [r["accuracy"]["reference_clamped_fraction"] for r in data["results"] if r["error"] is None]
    return f"{100 * min(values):.1f}-{100 * max(values):.1f}%" if values else "n/a"


def _series(data: dict) -> dict[str, list[dict]]:
    series: dict[str, list[dict]] = {}
    for row in data["results"]:
        if row["error"] is None:
            series.setdefault(f"{row['backend']} {row['precision']}", []).append(row)
    return series


def plot_latency(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in _series(data).items():
        rows = sorted(rows, key=lambda r: r["megapixels"])
        line, = ax.plot([r["megapixels"] for r in rows], [r["latency_ms"]["median"] for r in rows], "-", label=name)
        for row in rows:
            ax.plot(row["megapixels"], row["latency_ms"]["median"], "s" if row["mode"] == "tiled" else "o",
                    color=line.get_color())
    floors: dict[str, dict[float, float]] = {}  # per precision: the same work over the same matmul rate
    for rows in _series(data).values():
        for row in rows:
            points = floors.setdefault(row["precision"], {})
            points[row["megapixels"]] = min(points.get(row["megapixels"], math.inf), row["floor_ms"])
    for k, (precision, points) in enumerate(sorted(floors.items())):
        sizes = sorted(points)
        ax.plot(sizes, [points[m] for m in sizes], ":", color="black", alpha=1 - 0.4 * k,
                label=f"arithmetic floor, {precision} (FLOPs / matmul rate)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on short ranges
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("output megapixels (circles: one call, squares: tiled)")
    ax.set_ylabel("median latency, ms")
    ax.set_title(f"{data['title']}\n{data['environment']['gpu'] or data['environment']['cpu']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if floors:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no row was measured: the errors are in report.md", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _size_label(row: dict) -> str:
    return f"{row['height']}x{row['width']}" + (" tiled" if row["mode"] == "tiled" else "")


def plot_accuracy(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(data)
    labels = list(dict.fromkeys(_size_label(r) for rows in series.values() for r in rows))
    finite = [r["accuracy"]["psnr_db"] for rows in series.values() for r in rows
              if r["accuracy"]["psnr_db"] is not None]
    top = max([60.0] + [value + 5 for value in finite])  # identical outputs (infinite PSNR) are drawn at the top
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(1, len(series))
    for k, (name, rows) in enumerate(series.items()):
        xs = [labels.index(_size_label(r)) + (k - (len(series) - 1) / 2) * width for r in rows]
        values = [r["accuracy"]["psnr_db"] for r in rows]
        ax.bar(xs, [top if v is None else v for v in values], width, color=f"C{k}", label=name,
               hatch=[("//" if v is None else "") for v in values])
        for x, value in zip(xs, values):
            ax.annotate("identical" if value is None else f"{value:.1f}", (x, top if value is None else value),
                        ha="center", va="bottom", fontsize=7)
    ax.axhline(40, color="grey", linestyle="--", linewidth=1, label="40 dB (issue 7 target for fp16)")
    ax.set_ylim(0, top * 1.08)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("PSNR vs PyTorch fp32 reference, dB")
    ax.set_title(f"{data['title']}: accuracy vs fp32 reference\n"
                 f"{data['environment']['gpu'] or data['environment']['cpu']}", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser.add_argument_group("model (default: the embedded demo checkpoint)"), PRESETS)
    run = parser.add_argument_group("what to measure")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--backends", nargs="+", help="default: every registered backend that can run on the device")
    run.add_argument("--tiled-backends", nargs="*", help="backends for the tiled sizes (default: --backends)")
    run.add_argument("--precisions", nargs="+", choices=PRECISIONS,
                     help="default: fp16 and fp32 on CUDA, fp32 on the CPU")
    run.add_argument("--sizes", nargs="*", type=parse_size, default=[parse_size(s) for s in DEFAULT_SIZES],
                     help=f"whole-image output sizes, N or HxW (default {' '.join(DEFAULT_SIZES)})")
    run.add_argument("--tiled", nargs="*", type=parse_size, default=[parse_size(s) for s in DEFAULT_TILED],
                     help=f"tiled output sizes (default {' '.join(DEFAULT_TILED)}: 2048 square and a 4K UHD frame)")
    run.add_argument("--tile", type=bounded_int(1), default=512,
                     help="tile size for --tiled, output pixels (default 512)")
    run.add_argument("--overlap", type=bounded_int(0), default=64, help="tile overlap, output pixels (default 64)")
    run.add_argument("--tile-batch", type=bounded_int(1), default=1, help="tiles per backend call (default 1)")
    run.add_argument("--warmup", type=bounded_int(0), default=3,
                     help="untimed calls before timing, at least (default 3)")
    run.add_argument("--warmup-s", type=bounded_float(0), default=1.0,
                     help="... and more until the untimed calls add up to this many seconds (default 1.0)")
    run.add_argument("--repeats", type=bounded_int(1), default=20, help="timed calls per whole size (default 20)")
    run.add_argument("--tiled-repeats", type=bounded_int(1), default=3, help="timed passes per tiled size (default 3)")
    run.add_argument("--onnx", type=Path,
                     help="an exported graph for the onnxruntime backend (default: it exports one per tile shape)")
    run.add_argument("--engine", type=Path, help="a TensorRT engine (python -m export engine) for the tensorrt backend")
    run.add_argument("--autotune", action="store_true",
                     help="compiled backend: torch.compile mode max-autotune-no-cudagraphs instead of the default "
                          "(slow to build: one sd-turbo 512x512 build was not finished after 200 s on an H200)")
    run.add_argument("--triton-kernels", choices=("on", "off"), default="on",
                     help="the model's fused Triton kernels on CUDA (default on, the model's default); the fp32 "
                          "reference always runs without them")
    run.add_argument("--cudnn-benchmark", action="store_true",
                     help="torch.backends.cudnn.benchmark = True for the whole run (eager PyTorch then gets the "
                          "cuDNN algorithms the compiled backend picks with it); recorded per row")
    run.add_argument("--quality", metavar="sample|DIR",
                     help="also PSNR/SSIM against ground truth (next to bicubic) on the held-out sample photos "
                          "or a folder of HR images")
    run.add_argument("--quality-crop", type=int, default=256, help="HR crop size for --quality (default 256)")
    parser.add_argument("--out", type=Path, default=Path("artifacts/report"),
                        help="output folder (default artifacts/report)")
    parser.add_argument("--overwrite", action="store_true",
                        help="remove the report's files already in --out before the first measurement (default: "
                             "refuse them)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in (args.backends or []) + (args.tiled_backends or []):
        if name not in BACKENDS:
            parser.error(f"unknown backend {name!r}; registered: {', '.join(BACKENDS)}")
    check_model_arguments(parser, args)
    for option, path, backend in (("--onnx", args.onnx, "onnxruntime"), ("--engine", args.engine, "tensorrt")):
        if path is None:
            continue
        if not path.is_file():
            parser.error(f"{option} {path}: {'is a folder' if path.is_dir() else 'no such file'}")
        if args.backends is not None and backend not in args.backends + (args.tiled_backends or []):
            parser.error(f"{option} is for the {backend} backend, which --backends leaves out")
    problem = overlap_problem(args.overlap, (args.tile, args.tile), f"--tile {args.tile}")
    if problem is not None:
        parser.error(problem)
    if not args.sizes and not args.tiled:
        parser.error("nothing to measure: give --sizes and/or --tiled")
    if args.quality:
        from guidesr.degradations import DegradationConfig
        from guidesr.evaluate import crop_size_problem, evaluation_images

        problem = crop_size_problem(args.quality_crop, border=DegradationConfig().scale)
        if problem is not None:
            parser.error(f"--quality-crop: {problem}")
        try:
            evaluation_images(args.quality, args.quality_crop)
        except (ValueError, OSError) as error:
            parser.error(f"--quality {args.quality}: {error}")
    check_output_files(parser, args.out, REPORT_FILES, overwrite=args.overwrite)


def load_model_from_args(args: argparse.Namespace):
    """(model, description of its weights) from --checkpoint / --preset / --base-model / --random-weights."""
    from guidesr import model_for_preset

    from .upscale import load_model

    if args.random_weights:
        return model_for_preset(args.preset), f"random weights (untrained {args.preset}, random base weights)"
    model = load_model(args.checkpoint, args.preset, args.base_model)
    source = args.checkpoint or "the embedded demo checkpoint"
    return model, f"{source} (sha256 {model.checkpoint_sha256})"


class Interrupted(BaseException):
    """SIGTERM (a session's time limit) or Ctrl-C: stop measuring, write what was measured."""


def _interrupt(signum, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


QUALITY = "quality"  # the work item of --quality, run on the backend built for its crop size


def work_plan(args: argparse.Namespace, device: torch.device, size_multiple: int) -> list[tuple[str, str, dict]]:
    """[(backend, precision, {tile the backend is built for: [Geometry or QUALITY, ...]})] in run order.

    Static backends (compiled, onnxruntime's own export) are built for one tile shape: a whole size
    (and the --quality crop) is its own tile, rounded up to the size multiple as the model pads it
    (a static backend rounds a tile down, and a larger image does not fit it); tiled sizes share
    --tile. Geometries with the same tile share one build.
    """
    precisions = args.precisions or (["fp16", "fp32"] if device.type == "cuda" else ["fp32"])
    backends = args.backends or [name for name in BACKENDS if BACKENDS[name].unavailable_reason(device) is None]
    tiled_backends = backends if args.tiled_backends is None else args.tiled_backends
    plan = []
    for name in dict.fromkeys(backends + tiled_backends):
        groups: dict[tuple[int, int], list] = {}
        if name in backends:
            for height, width in args.sizes:
                groups.setdefault(padded_shape(height, width, size_multiple), []).append(
                    Geometry(height, width, False))
        if name in tiled_backends:
            for height, width in args.tiled:
                groups.setdefault((args.tile, args.tile), []).append(Geometry(height, width, True))
        if args.quality and name in backends:
            groups.setdefault(padded_shape(args.quality_crop, args.quality_crop, size_multiple), []).append(QUALITY)
        plan += [(name, precision, groups) for precision in precisions if groups]
    return plan


def padded_shape(height: int, width: int, size_multiple: int) -> tuple[int, int]:
    """height x width rounded up to the size multiple: the shape the model runs an image of that size at."""
    return -(-height // size_multiple) * size_multiple, -(-width // size_multiple) * size_multiple


def main(argv: list[str] | None = None) -> int:
    try:
        return _report(argv)
    except KeyboardInterrupt:
        print("interrupted (SIGINT) before the report files were all written", file=sys.stderr)
        return EXIT_INTERRUPTED


def _report(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    command = " ".join(["python -m runtime.report", *(sys.argv[1:] if argv is None else argv)])
    try:
        device = resolve_device(args.device)
        model, weights = load_model_from_args(args)
    except (ValueError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model.eval()
    from guidesr.model import set_kernels_enabled  # imports diffusers and peft (seconds): not at `--help`

    set_kernels_enabled(model, args.triton_kernels == "on")
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    report = Report(args, command, model, weights, device)
    if args.backends is None:
        for name, spec in BACKENDS.items():
            reason = spec.unavailable_reason(device)
            if reason is not None:
                report.data["skipped"].append({"backend": name, "precision": None, "reason": reason})
    plan = work_plan(args, device, model.config.size_multiple)
    evaluation = None
    if args.quality:
        names, lq, hr = evaluation = _evaluation_set(args)
        report.data["quality"] = {"data": args.quality, "crop_size": args.quality_crop, "border": model.config.scale,
                                  "images": names, "bicubic": quality_scores(lq.clamp(-1, 1), hr, model.config.scale),
                                  "results": []}
    for name in REPORT_FILES:
        (Path(args.out) / name).unlink(missing_ok=True)
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    progress = tqdm(total=sum(len(items) for _, _, groups in plan for items in groups.values()), desc="report",
                    unit="case")
    failed = 0
    ctrl_c = False
    try:
        for name, precision, groups in plan:
            failed += _run_backend(report, name, precision, groups, evaluation, progress)
    except (Interrupted, KeyboardInterrupt) as stop:
        ctrl_c = isinstance(stop, KeyboardInterrupt)
        why = str(stop) or "SIGINT"
        report.data["interrupted"] = f"stopped by {why}; the rows above were measured, the rest were not"
        tqdm.write(f"interrupted ({why}): writing what was measured", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        progress.close()
    report.data["complete"] = "interrupted" not in report.data
    out = Path(args.out)
    report.save()
    (out / MARKDOWN_NAME).write_text(format_markdown(report.data))
    plot_latency(report.data, out / LATENCY_PLOT)
    plot_accuracy(report.data, out / ACCURACY_PLOT)
    print(format_markdown(report.data))
    print(f"wrote {', '.join(str(out / name) for name in REPORT_FILES)}")
    if ctrl_c:
        return EXIT_INTERRUPTED
    return 1 if failed or not report.data["complete"] else 0


def _run_backend(report: Report, name: str, precision: str, groups: dict, evaluation, progress) -> int:
    """Measure one backend in one precision on every item; returns the number of failed items."""
    args, device = report.args, report.device
    artifacts = {"onnx": args.onnx} if name == "onnxruntime" else {"engine": args.engine} if name == "tensorrt" else {}
    backend, failed = None, 0
    remaining = sum(len(items) for items in groups.values())
    for tile, items in groups.items():
        if backend is None or backend.tile_shape is not None:  # dynamic backends are built once
            backend = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            start = time.perf_counter()
            try:
                backend, _ = create_backend(name, report.model, device, precision, tile=tile,
                                            tile_batch=args.tile_batch, autotune=args.autotune, **artifacts)
            except BackendError as err:  # cannot run here as asked: say why, go on with the others
                report.data["skipped"].append({"backend": name, "precision": precision, "reason": str(err)})
                tqdm.write(f"skipped {name} {precision}: {err}")
                progress.update(remaining)
                return failed
            except Exception as err:  # noqa: BLE001 - a broken build fails its rows, not the report
                traceback.print_exc()
                for item in items:
                    failed += report.record_failure(name, precision, item, f"building the backend: {_error(err)}")
                    progress.update(1)
                remaining -= len(items)
                continue
            setup_s = time.perf_counter() - start
        for item in items:
            label = QUALITY if item == QUALITY else item.label
            progress.set_postfix_str(f"{name} {precision} {label}")
            try:
                if item == QUALITY:
                    report.add_quality(backend, evaluation)
                else:
                    row = report.measure(backend, item) | {"backend_setup_s": setup_s}
                    report.data["results"].append(row)
                    tqdm.write(_row_line(row))
            except Exception as err:  # noqa: BLE001 - one failed case must not lose the others' numbers
                traceback.print_exc()
                failed += report.record_failure(name, precision, item, _error(err))
            report.save()
            progress.update(1)
            remaining -= 1
    return failed


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _row_line(row: dict) -> str:
    psnr_db = row["accuracy"]["psnr_db"]
    device_io = row["device_io_latency_ms"]
    return (f"{row['backend']} {row['precision']} {row['height']}x{row['width']} {row['mode']}: "
            f"median {row['latency_ms']['median']:.2f} ms, p90 {row['latency_ms']['p90']:.2f} ms, "
            + ("" if device_io is None else f"device I/O median {device_io['median']:.2f} ms, ")
            + f"{row['throughput_mp_s']:.3f} MP/s, "
            f"PSNR vs fp32 {'identical' if psnr_db is None else f'{psnr_db:.2f} dB'}, "
            f"{row['gap_to_floor']:.1f}x the floor")


def _evaluation_set(args: argparse.Namespace):
    from guidesr.evaluate import evaluation_set

    return evaluation_set(args.quality, args.quality_crop, seed=0)


if __name__ == "__main__":
    sys.exit(main())
