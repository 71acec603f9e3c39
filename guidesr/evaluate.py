"""PSNR / SSIM of a GuideSR model and of plain bicubic against the HR images.

    python -m guidesr.evaluate                       # embedded demo model, held-out sample photos
    python -m guidesr.evaluate --checkpoint C.json --data DIR --json results.json

Every HR image is centre-cropped to `--crop-size`, degraded `--draws` times with the project's
Real-ESRGAN pipeline under fixed seeds (the same LR inputs every run; each image and draw on its
own, see `guidesr.data.eval_pairs`), and restored 4x. Metrics: RGB and Y (BT.601), with a border
of `scale` pixels cropped, as is usual for SR; an image's scores are the mean over its draws, and
the table's mean is over images. PSNR is infinite for an output identical to its HR crop (a flat
crop that a draw's degradation left unchanged, say), and so is every mean it enters: the table
prints inf, the JSON null (JSON has no infinity; guidesr.train's metrics.jsonl does the same).

The results (--json) carry what they were measured on, so that a number that moves between runs
can be traced: `environment` (machine, CPU, Python, torch's CPU kernels and threads, torch / numpy /
Pillow / scikit-image versions, commit) and `fingerprints`, the sha256 of the HR crops, of the
degraded inputs (also per draw) and of the model's weights. Same input digests with other scores:
the model or its arithmetic changed; other input digests: the degradation gave other inputs.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from runtime.cli import (EXIT_INTERRUPTED, bounded_int, check_output_file_argument, non_finite_as_null, plural,
                         write_json)
from runtime.environment import environment

from .checkpoint import tensors_sha256, weights_sha256
from .config import PRESETS
from .data import SAMPLE_EVAL, HRImageFolder, SampleImages, check_crop_sizes, eval_pairs
from .degradations import DegradationConfig
from .loading import load_model
from .metrics import psnr, ssim

if TYPE_CHECKING:
    from .model import GuideSR

SSIM_WINDOW = 11  # guidesr.metrics.ssim's Gaussian window, in pixels
EVALUATION_MODULES = ("torch", "numpy", "PIL", "skimage")  # what reads, degrades and scores the images


def smallest_crop_size(border: int) -> int:
    """The smallest multiple of the degradation scale that leaves SSIM's window once a metric border
    of `border` pixels is cut off each side."""
    scale = DegradationConfig().scale
    return -(-(2 * border + SSIM_WINDOW) // scale) * scale


def crop_size_problem(crop_size: int, border: int) -> str | None:
    """Why `crop_size` cannot be evaluated with a metric border of `border` pixels, or None: the
    degradation needs a multiple of its scale, and SSIM needs its window inside the crop once the
    border is cut off."""
    scale, smallest = DegradationConfig().scale, smallest_crop_size(border)
    if crop_size % scale or crop_size < smallest:
        return (f"the crop size must be a multiple of {scale} (the degradation scale) and at least {smallest} "
                f"(SSIM's {SSIM_WINDOW}-px window inside the {border}-px metric border), got {crop_size}")
    return None


def evaluation_images(data: str, crop_size: int) -> tuple[SampleImages | HRImageFolder, list[str]]:
    """The HR images of `data` ('sample' or a folder) and their names. Raises one `ValueError` naming
    every file that is unreadable or too small for `crop_size` crops (from the headers alone)."""
    if data == "sample":
        images = SampleImages("eval")
        check_crop_sizes(images.paths, crop_size)
        return images, list(SAMPLE_EVAL)
    folder = HRImageFolder(data, crop_size=crop_size)
    return folder, [str(p.relative_to(folder.root)) for p in folder.paths]


def evaluation_set(data: str, crop_size: int, seed: int,
                   draws: int = 1) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(names, LR-upsampled inputs, HR) in [-1, 1], `draws` fixed-seed degradations per image, image-major."""
    images, names = evaluation_images(data, crop_size)
    lq, hr = eval_pairs(images, crop_size=crop_size, degradation=DegradationConfig(), seed=seed, draws=draws)
    return names, lq, hr


def _scores(restored: torch.Tensor, hr: torch.Tensor, border: int) -> dict[str, float]:
    a, b = (restored + 1) / 2, (hr + 1) / 2
    return {
        "psnr_rgb": psnr(a, b, crop=border),
        "ssim_rgb": ssim(a, b, crop=border),
        "psnr_y": psnr(a, b, crop=border, y_channel=True),
        "ssim_y": ssim(a, b, crop=border, y_channel=True),
    }


@torch.no_grad()
def evaluate(model: GuideSR, data: str = "sample", crop_size: int = 256, seed: int = 0, draws: int = 4) -> dict:
    border = model.config.scale
    problem = crop_size_problem(crop_size, border)
    if problem is not None:
        raise ValueError(problem)
    names, lq, hr = evaluation_set(data, crop_size, seed, draws)
    rows = []
    for i, name in enumerate(names):
        scores = []
        for draw, (x, y) in enumerate(zip(lq[i * draws : (i + 1) * draws], hr[i * draws : (i + 1) * draws])):
            x, y = x.unsqueeze(0), y.unsqueeze(0)
            restored = model(x).r1
            if not torch.isfinite(restored).all():
                raise FloatingPointError(f"the model's output for {name} (draw {draw + 1} of {draws}) has NaN/Inf")
            scores.append({"model": _scores(restored, y, border), "bicubic": _scores(x.clamp(-1, 1), y, border),
                           "lq_sha256": tensors_sha256({"lq": x})})
        rows.append({"image": name, **_mean(scores), "draws": scores})
    return {"images": rows, "mean": _mean(rows), "crop_size": crop_size, "degradation_seed": seed, "draws": draws,
            "data": data, "preset": model.config.preset, "checkpoint_sha256": model.checkpoint_sha256,
            "fingerprints": {"hr_sha256": tensors_sha256({"hr": hr}), "lq_sha256": tensors_sha256({"lq": lq}),
                             "weights_sha256": weights_sha256(model)},
            "environment": environment(lq.device, EVALUATION_MODULES)}


def _mean(rows: list[dict]) -> dict[str, dict[str, float]]:
    return {method: {k: sum(r[method][k] for r in rows) / len(rows) for k in rows[0][method]}
            for method in ("model", "bicubic")}


def format_table(results: dict) -> str:
    lines = ["| image | method | PSNR RGB | SSIM RGB | PSNR Y | SSIM Y |", "|---|---|---|---|---|---|"]
    for row in results["images"] + [{"image": "**mean**", **results["mean"]}]:
        for method in ("bicubic", "model"):
            s = row[method]
            lines.append(f"| {row['image']} | {method} | {s['psnr_rgb']:.2f} | {s['ssim_rgb']:.4f} | "
                         f"{s['psnr_y']:.2f} | {s['ssim_y']:.4f} |")
    gain = results["mean"]["model"]["psnr_rgb"] - results["mean"]["bicubic"]["psnr_rgb"]
    gain_text = "undefined (both mean PSNRs are infinite)" if math.isnan(gain) else f"{gain:+.2f} dB PSNR"
    lines.append(f"\nmodel - bicubic: {gain_text} (RGB); {plural(results['draws'], 'degradation draw')} per "
                 f"image, seed {results['degradation_seed']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        return _evaluate(argv)
    except KeyboardInterrupt:
        print("interrupted (SIGINT): no results written", file=sys.stderr)
        return EXIT_INTERRUPTED


def _evaluate(argv: list[str] | None) -> int:
    scale = DegradationConfig().scale
    p = argparse.ArgumentParser(prog="python -m guidesr.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint JSON (default: the embedded demo model)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="must match the checkpoint's preset (default: not checked)")
    p.add_argument("--base-model", default=None,
                   help="diffusers folder with unet/ and vae/ (default: the base model the checkpoint names)")
    p.add_argument("--data", default="sample",
                   help="'sample' (held-out scikit-image photos) or a folder of HR images (default sample)")
    p.add_argument("--crop-size", type=int, default=256,
                   help=f"side of the centre crop of each HR image, in HR pixels: a multiple of {scale}, at least "
                        f"{smallest_crop_size(scale)}; every image side must be over half of it (default 256)")
    p.add_argument("--seed", type=int, default=0, help="degradation seed (default 0)")
    p.add_argument("--draws", type=bounded_int(1), default=4,
                   help="degradations per image (default 4), each its own seed")
    p.add_argument("--json", type=Path, default=None, help="write the full results here (default: not written)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json (default: refuse it)")
    args = p.parse_args(argv)
    problem = crop_size_problem(args.crop_size, border=scale)
    if problem is not None:
        p.error(f"--crop-size: {problem}")
    check_output_file_argument(p, "--json", args.json, overwrite=args.overwrite)
    try:
        evaluation_images(args.data, args.crop_size)
    except (ValueError, OSError) as error:
        p.error(str(error))
    try:  # CheckpointError and BaseModelError are ValueErrors: a bad --checkpoint, --preset or --base-model
        model = load_model(args.checkpoint, args.preset, args.base_model)
    except ValueError as error:
        p.exit(2, f"{p.prog}: error: {error}\n")
    try:
        results = evaluate(model, args.data, args.crop_size, args.seed, args.draws)
    except FloatingPointError as error:
        p.exit(1, f"{p.prog}: error: {error}; no results written\n")
    print(format_table(results), flush=True)  # first: the results are not lost if --json cannot be written
    if args.json is not None:
        try:
            write_json(non_finite_as_null(results), args.json)
        except OSError as error:
            p.exit(1, f"{p.prog}: error: cannot write --json {args.json}: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
