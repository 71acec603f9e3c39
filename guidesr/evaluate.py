"""PSNR / SSIM of a GuideSR model and of plain bicubic against the HR images.

    python -m guidesr.evaluate                       # embedded demo model, held-out sample photos
    python -m guidesr.evaluate --checkpoint C.json --data DIR --json results.json

Every HR image is centre-cropped to `--crop-size`, degraded with the project's Real-ESRGAN pipeline
under a fixed seed (the same LR inputs every run), and restored 4x. Metrics: RGB and Y (BT.601),
with a border of `scale` pixels cropped, as is usual for SR.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .data import SAMPLE_EVAL, HRImageFolder, SampleImages, eval_pairs
from .degradations import DegradationConfig
from .loading import load_model
from .metrics import psnr, ssim
from .model import GuideSR


def evaluation_set(data: str, crop_size: int, seed: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(names, LR-upsampled inputs, HR) in [-1, 1]; the LR is degraded with a fixed seed."""
    if data == "sample":
        images, names = SampleImages("eval"), list(SAMPLE_EVAL)
    else:
        images = HRImageFolder(data)
        names = [str(p.relative_to(images.root)) for p in images.paths]
    lq, hr = eval_pairs(images, crop_size=crop_size, degradation=DegradationConfig(), seed=seed)
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
def evaluate(model: GuideSR, data: str = "sample", crop_size: int = 256, seed: int = 0) -> dict:
    names, lq, hr = evaluation_set(data, crop_size, seed)
    border = model.config.scale
    rows = []
    for name, x, y in zip(names, lq, hr):
        x, y = x.unsqueeze(0), y.unsqueeze(0)
        restored = model(x).r1
        rows.append({"image": name, "model": _scores(restored, y, border), "bicubic": _scores(x.clamp(-1, 1), y, border)})
    mean = {
        method: {k: sum(r[method][k] for r in rows) / len(rows) for k in rows[0][method]}
        for method in ("model", "bicubic")
    }
    return {"images": rows, "mean": mean, "crop_size": crop_size, "degradation_seed": seed, "data": data,
            "preset": model.config.preset, "checkpoint_sha256": model.checkpoint_sha256}


def format_table(results: dict) -> str:
    lines = ["| image | method | PSNR RGB | SSIM RGB | PSNR Y | SSIM Y |", "|---|---|---|---|---|---|"]
    for row in results["images"] + [{"image": "**mean**", **results["mean"]}]:
        for method in ("bicubic", "model"):
            s = row[method]
            lines.append(f"| {row['image']} | {method} | {s['psnr_rgb']:.2f} | {s['ssim_rgb']:.4f} | "
                         f"{s['psnr_y']:.2f} | {s['ssim_y']:.4f} |")
    gain = results["mean"]["model"]["psnr_rgb"] - results["mean"]["bicubic"]["psnr_rgb"]
    lines.append(f"\nmodel - bicubic: {gain:+.2f} dB PSNR (RGB)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint JSON (default: the embedded demo model)")
    p.add_argument("--preset", default=None)
    p.add_argument("--base-model", default=None)
    p.add_argument("--data", default="sample", help="'sample' (held-out scikit-image photos) or a folder of HR images")
    p.add_argument("--crop-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="degradation seed")
    p.add_argument("--json", type=Path, default=None, help="write the full results here")
    args = p.parse_args(argv)
    model = load_model(args.checkpoint, args.preset, args.base_model)
    results = evaluate(model, args.data, args.crop_size, args.seed)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))


if __name__ == "__main__":
    main()
