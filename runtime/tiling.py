"""Overlapping tiles of one shape, run through one or more tile functions, blended band by band.

Geometry (`plan_tiles`): along each axis, tile starts step by (tile - overlap) from 0 and the last
one is moved inward to end exactly at the image edge, so every tile has the same shape (static
engines and CUDA graphs need one shape). An image no larger than the tile along an axis gets one
tile of the image's own length along it (so an image smaller than a tile runs whole, in one call;
the model pads to its size multiple itself). All tiles live at OUTPUT resolution.

Blending: a tile's weight is the outer product of two 1-D profiles. A profile is 1 inside and,
over the full width of the overlap with the previous / next tile along that axis, a raised-cosine
ramp 0.5 - 0.5 cos(pi (i + 0.5) / n), which is strictly positive and whose mirror image sums with
it to exactly 1. No ramp is applied at the image border. Outputs are accumulated as sum(w * y)
and sum(w) and divided, so any overlap (including the larger one next to the moved last tile)
gives a smooth, exact partition of unity.

Memory: tiles are produced one row of tiles at a time and never all at once. The accumulators
cover one band of tile_h output rows (sum: C x tile_h x W float32 per tile function, weight:
tile_h x W float32; torch tensors, channel-first like the tiles, so each tile is blended by one
multi-threaded in-place `addcmul_`: on a 2-core CPU, 2026-11-26, this cut the blending of a
2160x3840 frame in 512 px tiles from ~32 to ~4-7 ms per tile, against numpy arrays in HWC order
that needed a strided transpose of every tile; docs/benchmarks.md); when a row of tiles is
done, the rows no later tile touches are divided out into the output array and the band slides
down. The only image-sized arrays are the outputs: one H x W x C float32 array per tile function.
Input tiles come from a `TileSource`; the `BicubicSource` upsamples each tile from the
low-resolution image (with a 2-pixel LR margin, so it is bit-identical to upsampling the whole
image) and never builds the output-sized upsample.

Peak memory for one tile function, output H x W, C = 3, tile t x t, batch B:
    12 H W (output) + 16 t W (band sum + weight) + ~24 B t^2 (input/output tile batches)
    + the LR image + the tile function's own working memory.

Several tile functions can be run on the very same input tiles (`run_tiled(source, plan,
[fast, reference])`): each gets its own output, and `on_batch` sees every batch's inputs and all
outputs, which is what a validation pass (PSNR / max-abs against a reference) needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

TileFn = Callable[[torch.Tensor], torch.Tensor]  # [B, 3, th, tw] float32 in [-1, 1] -> same shape


class NonFiniteOutputError(ValueError):
    """A tile function returned NaN or Inf."""

    def __init__(self, function_index: int, boxes: Sequence[tuple[int, int, int, int]], path: str | None = None):
        self.function_index = function_index
        self.boxes = list(boxes)
        self.path = path
        where = ", ".join(f"(y={y}, x={x}, {h}x{w})" for y, x, h, w in self.boxes[:4])
        more = f" and {len(self.boxes) - 4} more" if len(self.boxes) > 4 else ""
        image = f"{path}: " if path else ""
        super().__init__(f"{image}tile function {function_index} produced NaN/Inf in the tile(s) at {where}{more}")


# ----------------------------------------------------------------------------------------- geometry


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of size `tile` covering [0, length), stepping by tile - overlap, the last moved inward."""
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    if tile >= length:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile) = [0, {tile}), got {overlap}")
    starts = list(range(0, length - tile, tile - overlap))
    starts.append(length - tile)
    return starts


def raised_cosine_ramp(n: int) -> np.ndarray:
    """n strictly positive weights rising from ~0 to ~1; ramp(n) + ramp(n)[::-1] == 1."""
    i = np.arange(n, dtype=np.float64) + 0.5
    return (0.5 - 0.5 * np.cos(np.pi * i / n)).astype(np.float32)


def axis_profiles(starts: Sequence[int], tile: int) -> list[np.ndarray]:
    """One blending profile per tile along an axis: ramps over the real overlap with each neighbour."""
    profiles = []
    for k, start in enumerate(starts):
        profile = np.ones(tile, np.float32)
        if k > 0:
            overlap = starts[k - 1] + tile - start
            if overlap > 0:
                profile[:overlap] *= raised_cosine_ramp(overlap)
        if k + 1 < len(starts):
            overlap = start + tile - starts[k + 1]
            if overlap > 0:
                profile[tile - overlap :] *= raised_cosine_ramp(overlap)[::-1]
        profiles.append(profile)
    return profiles


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one image go (all in output pixels)."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def num_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def whole(self) -> bool:
        """One tile that is the whole image."""
        return self.num_tiles == 1

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(y, x, h, w) of every tile, row by row."""
        return [(y, x, self.tile_h, self.tile_w) for y in self.ys for x in self.xs]

    def peak_bytes(self, channels: int = 3, functions: int = 1, tile_batch: int = 1) -> int:
        """Bytes of the arrays run_tiled allocates (outputs, band accumulators, tile batches)."""
        output = 4 * self.height * self.width * channels * functions
        band = 4 * self.tile_h * self.width * (channels * functions + 1)
        tiles = 4 * tile_batch * self.tile_h * self.tile_w * channels * (1 + 2 * functions)
        return output + band + tiles


def plan_tiles(height: int, width: int, tile: int | tuple[int, int] | None, overlap: int) -> TilePlan:
    """Plan tiles for an output of height x width. `tile` None or 0: the whole image in one call."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if tile is None or tile == 0:
        tile_h, tile_w = height, width
    elif isinstance(tile, int):
        tile_h = tile_w = tile
    else:
        tile_h, tile_w = tile
    if tile_h <= 0 or tile_w <= 0:
        raise ValueError(f"tile size must be positive, got {tile_h}x{tile_w}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    tile_h, tile_w = min(tile_h, height), min(tile_w, width)
    return TilePlan(
        height=height, width=width, tile_h=tile_h, tile_w=tile_w, overlap=overlap,
        ys=tuple(tile_starts(height, tile_h, overlap)), xs=tuple(tile_starts(width, tile_w, overlap)),
    )


# ------------------------------------------------------------------------------------------ sources


class TileSource(Protocol):
    """Gives the input of one tile: [C, h, w] float32 at output resolution."""

    height: int
    width: int

    def __call__(self, y: int, x: int, h: int, w: int) -> torch.Tensor: ...


class ArraySource:
    """Tiles cut from an image already at output resolution ([C, H, W] tensor)."""

    def __init__(self, image: torch.Tensor):
        if image.ndim != 3:
            raise ValueError(f"expected a [C, H, W] tensor, got shape {tuple(image.shape)}")
        self.image = image
        self.height, self.width = image.shape[-2:]

    def __call__(self, y: int, x: int, h: int, w: int) -> torch.Tensor:
        return self.image[:, y : y + h, x : x + w]


class BicubicSource:
    """Tiles of the bicubic x`scale` upsample of a LR image, each computed from a small LR crop.

    PyTorch's bicubic (align_corners=False) reads LR pixels floor(c) - 1 .. floor(c) + 2 for the
    LR coordinate c = (Y + 0.5) / scale - 0.5 of output row Y, clamping at the image border. An LR
    crop with 2 pixels of margin (clipped at the image border, where clamping then matches) thus
    gives exactly the values of the whole-image upsample. Values are clamped to `clamp`.
    """

    MARGIN = 2

    def __init__(self, low_res: torch.Tensor, scale: int, clamp: tuple[float, float] | None = (-1.0, 1.0)):
        if low_res.ndim != 3:
            raise ValueError(f"expected a [C, h, w] tensor, got shape {tuple(low_res.shape)}")
        if int(scale) != scale or scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        self.low_res = low_res
        self.scale = int(scale)
        self.clamp = clamp
        self.height = low_res.shape[-2] * self.scale
        self.width = low_res.shape[-1] * self.scale

    def _lr_range(self, start: int, length: int, lr_length: int) -> tuple[int, int]:
        first = max(0, start // self.scale - self.MARGIN)
        last = min(lr_length, (start + length - 1) // self.scale + self.MARGIN + 1)
        return first, last

    def __call__(self, y: int, x: int, h: int, w: int) -> torch.Tensor:
        ly0, ly1 = self._lr_range(y, h, self.low_res.shape[-2])
        lx0, lx1 = self._lr_range(x, w, self.low_res.shape[-1])
        crop = self.low_res[None, :, ly0:ly1, lx0:lx1]
        if self.scale == 1:
            up = crop
        else:
            up = F.interpolate(crop, scale_factor=self.scale, mode="bicubic", align_corners=False)
        oy, ox = y - ly0 * self.scale, x - lx0 * self.scale
        tile = up[0, :, oy : oy + h, ox : ox + w]
        if self.clamp is not None:
            tile = tile.clamp(*self.clamp)
        return tile


def fit_to_shape(fn: TileFn, shape: tuple[int, int]) -> TileFn:
    """Adapt a tile function that only accepts one fixed (h, w) to smaller tiles: pad, run, crop.

    Padding is reflect where the tile is large enough, replicate otherwise (like the model's own).
    """
    target_h, target_w = shape

    def fitted(tiles: torch.Tensor) -> torch.Tensor:
        h, w = tiles.shape[-2:]
        if (h, w) == (target_h, target_w):
            return fn(tiles)
        if h > target_h or w > target_w:
            raise ValueError(f"tile {h}x{w} is larger than the fixed tile shape {target_h}x{target_w}")
        pad = (0, target_w - w, 0, target_h - h)
        mode = "reflect" if target_h - h < h and target_w - w < w else "replicate"
        return fn(F.pad(tiles, pad, mode=mode))[..., :h, :w]

    return fitted


# ------------------------------------------------------------------------------------------- runner


@dataclass
class TileBatch:
    """One batch as run: boxes (y, x, h, w), the shared input and each function's output."""

    boxes: list[tuple[int, int, int, int]]
    inputs: torch.Tensor
    outputs: list[torch.Tensor]
    total_tiles: int  # in the whole plan, for progress bars


def run_tiled(
    source: TileSource,
    plan: TilePlan,
    functions: Sequence[TileFn],
    tile_batch: int = 1,
    on_batch: Callable[[TileBatch], None] | None = None,
    check_finite: bool = True,
) -> list[np.ndarray]:
    """Run every function on the same tiles and blend; returns one [H, W, C] float32 array per function."""
    if (source.height, source.width) != (plan.height, plan.width):
        raise ValueError(f"source is {source.height}x{source.width} but the plan is for {plan.height}x{plan.width}")
    if not functions:
        raise ValueError("need at least one tile function")
    if tile_batch < 1:
        raise ValueError(f"tile_batch must be >= 1, got {tile_batch}")
    th, tw, width = plan.tile_h, plan.tile_w, plan.width
    profiles_y = [torch.from_numpy(p) for p in axis_profiles(plan.ys, th)]
    profiles_x = [torch.from_numpy(p) for p in axis_profiles(plan.xs, tw)]

    outputs: list[np.ndarray] | None = None  # allocated once the channel count is known
    sums: list[torch.Tensor] = []  # [C, th, W] per function: channel-first like the tiles
    weight = torch.zeros(th, width)
    for row, y in enumerate(plan.ys):
        for first in range(0, len(plan.xs), tile_batch):
            columns = range(first, min(first + tile_batch, len(plan.xs)))
            boxes = [(y, plan.xs[c], th, tw) for c in columns]
            inputs = torch.stack([source(*box) for box in boxes]).float()
            results = []
            for index, fn in enumerate(functions):
                result = fn(inputs)
                if result.shape != inputs.shape:
                    raise ValueError(f"tile function {index} returned shape {tuple(result.shape)} "
                                     f"for input {tuple(inputs.shape)}")
                if check_finite:
                    bad = ~torch.isfinite(result).flatten(1).all(dim=1)
                    if bad.any():
                        raise NonFiniteOutputError(index, [b for b, flag in zip(boxes, bad.tolist()) if flag])
                results.append(result)
            if outputs is None:
                channels = inputs.shape[1]
                outputs = [np.empty((plan.height, width, channels), np.float32) for _ in functions]
                sums = [torch.zeros(channels, th, width) for _ in functions]
            for j, c in enumerate(columns):
                x = plan.xs[c]
                w = torch.outer(profiles_y[row], profiles_x[c])
                weight[:, x : x + tw] += w
                for acc, result in zip(sums, results):
                    acc[:, :, x : x + tw].addcmul_(result[j].detach().float().cpu(), w)
            if on_batch is not None:
                on_batch(TileBatch(boxes=boxes, inputs=inputs, outputs=results, total_tiles=plan.num_tiles))
        # Rows before the next tile row's start are final: divide them out, then slide the band down.
        done = (plan.ys[row + 1] - y) if row + 1 < len(plan.ys) else th
        for out, acc in zip(outputs, sums):
            torch.from_numpy(out[y : y + done]).copy_((acc[:, :done] / weight[:done]).permute(1, 2, 0))
            acc[:, : th - done] = acc[:, done:].clone()  # source and target overlap
            acc[:, th - done :] = 0
        weight[: th - done] = weight[done:].clone()
        weight[th - done :] = 0
    assert outputs is not None
    return outputs
