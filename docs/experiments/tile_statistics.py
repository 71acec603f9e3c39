"""How far tiled upscaling drifts from whole-image upscaling, and how much sharing statistics would recover.

    PYTHONPATH=. python docs/experiments/tile_statistics.py astronaut coffee chelsea
    PYTHONPATH=. python docs/experiments/tile_statistics.py coffee --tiles 512/64

A one-off measurement, not part of the package: the numbers it printed on 2026-11-27 (2-core CPU, the
embedded demo model, fp32) are in docs/design/runtime.md, "Tiling and the model's global statistics".

For each scikit-image photo (cropped to a multiple of 32 and bicubic-downscaled 4x to make the LR
input) it upscales the whole image once, as the reference, and then tiled (tile/overlap 256/32 and
128/32 by default, the runtime's tile plan and raised-cosine blending), with the model's two per-image
statistics (every GroupNorm's group mean/variance, every FCA block's channel mean) taken from:

- local:     each tile's own activations (what the runtime does);
- synced:    every tile's *owned* region (a partition of the image: tile boundaries at the middle of
             each overlap), pooled over all tiles run as one batch, layer by layer. These are the
             whole image's statistics up to the tiles' border effects, but they need every tile in
             memory at once, which is what tiling exists to avoid;
- lowres d:  one extra pass of the whole image at 1/d of the resolution (LR downscaled d times with
             antialiasing), whose statistics every tile then uses (the "fast mode" of tiled-VAE
             implementations); d = 1 is the whole image itself, an oracle;
- passes k:  k passes over the tiles, bounded memory: pass 1 is local and records owned-region sums,
             pass j normalises with what pass j-1 recorded (a fixed-point iteration; layer l is exact
             only after l passes).

Printed: PSNR of each tiled result against the whole-image result (data range 2, the model's [-1, 1]).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data
from torch import nn

from guidesr import load_default_model
from guidesr.guidance import FCABlock
from runtime.tiling import BicubicSource, axis_profiles, plan_tiles, tile_starts


@dataclass
class Statistics:
    """What the instrumented layers do: normalise with `use` (else their own input), record owned sums."""

    owned: list[tuple[float, float, float, float]] | None = None  # per batch item: owned fraction y0, y1, x0, x1
    aspect: float = 1.0  # tile height / width, to unflatten the VAE attention's [B, C, HW] GroupNorm input
    pool_batch: bool = False  # synced: statistics over the owned regions of the whole batch
    use: dict | None = None  # layer -> (sum, sum of squares, count) per channel from an earlier pass
    record: dict = field(default_factory=dict)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            h = round((x.shape[-1] * self.aspect) ** 0.5)
            w = x.shape[-1] // h
        else:
            h, w = x.shape[-2:]
        m = torch.zeros(len(self.owned), 1, h, w, dtype=torch.float64)
        for b, (y0, y1, x0, x1) in enumerate(self.owned):
            m[b, :, round(y0 * h):round(y1 * h), round(x0 * w):round(x1 * w)] = 1
        return m if x.dim() == 4 else m.flatten(2)

    def sums(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.mask(x)
        xd = x.double()
        dims = (0,) + tuple(range(2, x.dim()))
        return (xd * m).sum(dims), (xd * xd * m).sum(dims), m.sum()

    def channel_moments(self, key: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-channel (mean, mean of squares) to normalise with, or None for the input's own."""
        if self.owned is not None and not self.pool_batch:
            s, s2, n = self.sums(x)
            old = self.record.get(key)
            self.record[key] = (s, s2, n) if old is None else (old[0] + s, old[1] + s2, old[2] + n)
        if self.pool_batch:
            s, s2, n = self.sums(x)
        elif self.use is not None:
            s, s2, n = self.use[key]
        else:
            return None
        return s / n, s2 / n


class SharedGroupNorm(nn.Module):
    def __init__(self, norm: nn.GroupNorm, key: str, stats: Statistics):
        super().__init__()
        self.norm, self.key, self.stats = norm, key, stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.stats.channel_moments(self.key, x)
        if moments is None:
            return self.norm(x)
        groups, channels = self.norm.num_groups, x.shape[1]
        mean_c, square_c = (m.view(groups, -1) for m in moments)
        mean = mean_c.mean(1).repeat_interleave(channels // groups).float()
        var = (square_c.mean(1) - mean_c.mean(1) ** 2).repeat_interleave(channels // groups).float()
        shape = (1, channels) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.norm.eps)
        return y * self.norm.weight.view(shape) + self.norm.bias.view(shape)


class SharedFCA(nn.Module):
    def __init__(self, block: FCABlock, key: str, stats: Statistics):
        super().__init__()
        self.block, self.key, self.stats = block, key, stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        g = F.gelu(b.conv1(x))
        moments = self.stats.channel_moments(self.key, g)
        pooled = g.mean(dim=(2, 3)) if moments is None else moments[0].float()[None].expand(g.shape[0], -1)
        c = g.shape[1]
        gate = torch.sigmoid(F.linear(pooled, b.attention.weight.reshape(c, c), b.attention.bias))
        return x + b.conv2(g * gate[:, :, None, None])


def instrument(model: nn.Module, stats: Statistics) -> None:
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, SharedGroupNorm(child, f"norm{count}", stats))
            elif isinstance(child, FCABlock):
                setattr(parent, name, SharedFCA(child, f"fca{count}", stats))
            else:
                continue
            count += 1


def owned_fractions(length: int, tile: int, overlap: int) -> dict[int, tuple[float, float]]:
    starts = tile_starts(length, tile, overlap)
    size = min(tile, length)
    bounds = [0.0] + [(starts[k] + size + starts[k + 1]) / 2 for k in range(len(starts) - 1)] + [float(length)]
    return {s: ((bounds[k] - s) / size, (bounds[k + 1] - s) / size) for k, s in enumerate(starts)}


def blend(outputs: torch.Tensor, plan) -> torch.Tensor:
    """The runtime's raised-cosine blend of [N, 3, th, tw] tile outputs (plan order)."""
    py, px = axis_profiles(plan.ys, plan.tile_h), axis_profiles(plan.xs, plan.tile_w)
    total = torch.zeros(3, plan.height, plan.width, dtype=torch.float64)
    weight = torch.zeros(plan.height, plan.width, dtype=torch.float64)
    k = 0
    for i, y in enumerate(plan.ys):
        for j, x in enumerate(plan.xs):
            w = torch.from_numpy(np.outer(py[i], px[j])).double()
            total[:, y:y + plan.tile_h, x:x + plan.tile_w] += outputs[k].double() * w
            weight[y:y + plan.tile_h, x:x + plan.tile_w] += w
            k += 1
    return (total / weight).float()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * np.log10(4.0 / ((a - b) ** 2).mean().item()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("images", nargs="+", help="scikit-image photo names")
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--tiles", default="256/32,128/32", help="tile/overlap pairs, output pixels")
    args = parser.parse_args()
    torch.set_num_threads(2)
    stats = Statistics()
    model = load_default_model().eval()
    instrument(model, stats)
    run = torch.no_grad()(lambda x: model(x).r1)
    for name in args.images:
        photo = getattr(data, name)()
        h, w = photo.shape[0] // 32 * 32, photo.shape[1] // 32 * 32
        lr = np.asarray(Image.fromarray(photo[:h, :w]).resize((w // 4, h // 4), Image.BICUBIC))
        low_res = torch.from_numpy(lr.astype(np.float32) / 255).permute(2, 0, 1) * 2 - 1
        source = BicubicSource(low_res, 4)
        whole = run(source(0, 0, h, w)[None])[0]
        for tile, overlap in (tuple(map(int, pair.split("/"))) for pair in args.tiles.split(",")):
            plan = plan_tiles(h, w, tile, overlap)
            fy, fx = owned_fractions(h, tile, overlap), owned_fractions(w, tile, overlap)
            boxes = plan.boxes()
            tiles = torch.stack([source(*box) for box in boxes])
            owned = [(*fy[y], *fx[x]) for y, x, _, _ in boxes]
            results = {}

            stats.owned, stats.use, stats.pool_batch = None, None, False
            results["local"] = psnr(blend(torch.cat([run(t[None]) for t in tiles]), plan), whole)

            stats.owned, stats.aspect, stats.pool_batch = owned, plan.tile_h / plan.tile_w, True
            results["synced"] = psnr(blend(run(tiles), plan), whole)
            stats.pool_batch = False

            for d in (1, 2, 4):
                small = low_res[None] if d == 1 else F.interpolate(
                    low_res[None], scale_factor=1 / d, mode="bicubic", antialias=True, align_corners=False)
                small_source = BicubicSource(small[0].clamp(-1, 1), 4)
                multiple = model.config.size_multiple  # the model pads the whole image to it (the tiles are multiples)
                padded = [-(-side // multiple) * multiple for side in (small_source.height, small_source.width)]
                stats.owned, stats.aspect, stats.use, stats.record = [(0, 1, 0, 1)], padded[0] / padded[1], None, {}
                run(small_source(0, 0, small_source.height, small_source.width)[None])
                stats.owned, stats.use = None, stats.record
                results[f"lowres {d}"] = psnr(blend(torch.cat([run(t[None]) for t in tiles]), plan), whole)

            stats.use, stats.aspect = None, plan.tile_h / plan.tile_w
            for k in range(1, args.passes + 1):
                stats.record = {}
                outputs = []
                for t, own in zip(tiles, owned):
                    stats.owned = [own]
                    outputs.append(run(t[None]))
                if k > 1:
                    results[f"passes {k}"] = psnr(blend(torch.cat(outputs), plan), whole)
                stats.use = stats.record
            stats.owned, stats.use = None, None
            cells = "  ".join(f"{key} {value:.2f}" for key, value in results.items())
            print(f"{name} {h}x{w} tiles {tile}/{overlap} ({plan.num_tiles}): {cells}", flush=True)


if __name__ == "__main__":
    main()
