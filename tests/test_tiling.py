"""runtime.tiling: tile geometry, blending, exact per-tile bicubic, bounded memory, model acceptance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from runtime.tiling import (
    ArraySource,
    BicubicSource,
    NonFiniteOutputError,
    axis_profiles,
    fit_to_shape,
    plan_tiles,
    raised_cosine_ramp,
    run_tiled,
    tile_starts,
)



def psnr(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB between two arrays of the same shape."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)

def conv_function(seed: int = 0):
    """A real local operator (3x3 conv + tanh, zero padding) as tile function: [-1, 1] -> [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.3)
        conv.bias.zero_()

    def apply(tiles: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.tanh(conv(tiles))

    return apply


def random_image(channels, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((channels, height, width), generator=generator) * 2 - 1


def border_positions(starts, tile, length):
    """Indices i where a tile edge lies between pixel i and i + 1 inside the image."""
    edges = set()
    for start in starts:
        if start > 0:
            edges.add(start - 1)
        if start + tile < length:
            edges.add(start + tile - 1)
    return sorted(edges)


def seam_ratio(image: np.ndarray, plan) -> float:
    """Mean |gradient| across tile borders / mean |gradient| at every other position ([H, W, C] image)."""
    gx = np.abs(np.diff(image, axis=1)).mean(axis=(0, 2))  # gx[i]: between columns i and i + 1
    gy = np.abs(np.diff(image, axis=0)).mean(axis=(1, 2))
    bx = border_positions(plan.xs, plan.tile_w, plan.width)
    by = border_positions(plan.ys, plan.tile_h, plan.height)
    other_x = np.ones(gx.size, bool)
    other_x[bx] = False
    other_y = np.ones(gy.size, bool)
    other_y[by] = False
    at_borders = (gx[bx].sum() + gy[by].sum()) / (len(bx) + len(by))
    elsewhere = (gx[other_x].sum() + gy[other_y].sum()) / (other_x.sum() + other_y.sum())
    return float(at_borders / elsewhere)


# ----------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("length", [1, 5, 64, 100, 127, 128, 129, 300, 1000])
@pytest.mark.parametrize("tile,overlap", [(64, 16), (128, 32), (100, 0), (32, 31)])
def test_tiles_have_one_size_cover_everything_and_step_by_tile_minus_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    size = min(tile, length)
    covered = np.zeros(length, int)
    for start in starts:
        assert 0 <= start and start + size <= length  # every tile is full-size and inside
        covered[start : start + size] += 1
    assert covered.min() >= 1
    assert starts == sorted(set(starts))
    steps = np.diff(starts)
    assert all(step == tile - overlap for step in steps[:-1])
    if len(starts) > 1:
        assert starts[-1] == length - tile  # the last tile is moved inward to end at the edge
        assert 0 < steps[-1] <= tile - overlap


def test_image_smaller_than_a_tile_runs_whole():
    plan = plan_tiles(80, 96, 512, 64)
    assert plan.whole and (plan.tile_h, plan.tile_w) == (80, 96)
    plan = plan_tiles(80, 1000, 512, 64)  # smaller along one axis only: one shape, image height
    assert (plan.tile_h, plan.tile_w) == (80, 512) and plan.ys == (0,) and len(plan.xs) == 3
    assert plan_tiles(300, 200, None, 0).whole


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError, match="overlap"):
        plan_tiles(1000, 1000, 64, 64)
    with pytest.raises(ValueError, match="positive"):
        plan_tiles(0, 10, 64, 8)


def test_blend_profiles_are_strictly_positive_and_complementary():
    ramp = raised_cosine_ramp(16)
    assert ramp.min() > 0 and ramp.max() < 1
    np.testing.assert_allclose(ramp + ramp[::-1], 1, atol=1e-6)
    starts = tile_starts(300, 64, 16)
    profiles = axis_profiles(starts, 64)
    total = np.zeros(300)
    for start, profile in zip(starts, profiles):
        assert profile.min() > 0
        total[start : start + 64] += profile
    np.testing.assert_allclose(total, 1, atol=1e-5)  # a partition of unity, even at the moved last tile
    assert profiles[0][0] == 1 and profiles[-1][-1] == 1  # no ramp at the image border


# ----------------------------------------------------------------------------------------- sources


@pytest.mark.parametrize("scale", [1, 2, 3, 4])
def test_per_tile_bicubic_equals_whole_image_bicubic(scale):
    low_res = random_image(3, 23, 31, seed=scale)
    whole = F.interpolate(low_res[None], scale_factor=scale, mode="bicubic", align_corners=False)[0].clamp(-1, 1)
    source = BicubicSource(low_res, scale)
    assert (source.height, source.width) == (23 * scale, 31 * scale)
    rng = np.random.default_rng(scale)
    for _ in range(40):
        h = int(rng.integers(1, source.height + 1))
        w = int(rng.integers(1, source.width + 1))
        y = int(rng.integers(0, source.height - h + 1))
        x = int(rng.integers(0, source.width - w + 1))
        # Equal up to float rounding (the crop's SIMD order may differ for scales other than powers of 2).
        torch.testing.assert_close(source(y, x, h, w), whole[:, y : y + h, x : x + w], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ runner


@pytest.mark.parametrize("size,tile,overlap", [((150, 211), 64, 16), ((150, 211), 48, 8), ((64, 64), 64, 8),
                                               ((40, 300), 64, 24), ((150, 211), 100, 0), ((50, 61), 32, 31)])
def test_blending_reconstructs_a_pointwise_function_exactly(size, tile, overlap):
    image = random_image(3, *size)
    plan = plan_tiles(*size, tile, overlap)
    (out,) = run_tiled(ArraySource(image), plan, [lambda t: torch.tanh(2 * t)], tile_batch=3)
    expected = torch.tanh(2 * image).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)  # float32 rounding of sum(w y) / sum(w)


def test_tiled_conv_matches_whole_image_and_blending_hides_tile_edges():
    low_res = random_image(3, 40, 53)
    source = BicubicSource(low_res, 4)
    fn = conv_function()
    (whole,) = run_tiled(source, plan_tiles(160, 212, None, 0), [fn])
    blended_plan = plan_tiles(160, 212, 64, 16)
    (blended,) = run_tiled(source, blended_plan, [fn], tile_batch=2)
    (hard,) = run_tiled(source, plan_tiles(160, 212, 64, 0), [fn])
    # The conv's zero padding is wrong at every tile edge; blending gives those pixels ~no weight.
    assert psnr(blended, whole, 2.0) > 60
    assert psnr(hard, whole, 2.0) < 45  # without overlap the tile edges show: this test can fail
    assert seam_ratio(blended, blended_plan) < 1.1


def test_batching_does_not_change_the_result():
    source = ArraySource(random_image(3, 130, 170))
    plan = plan_tiles(130, 170, 48, 12)
    fn = conv_function(1)
    (one,) = run_tiled(source, plan, [fn], tile_batch=1)
    batch_sizes = []
    (many,) = run_tiled(source, plan, [fn], tile_batch=4, on_batch=lambda b: batch_sizes.append(len(b.boxes)))
    np.testing.assert_allclose(many, one, rtol=0, atol=1e-6)
    assert max(batch_sizes) == 4 and sum(batch_sizes) == plan.num_tiles


def test_several_functions_see_the_same_tiles():
    source = BicubicSource(random_image(3, 30, 30), 4)
    plan = plan_tiles(120, 120, 64, 16)
    fast, reference = conv_function(2), conv_function(2)
    seen = []

    def check(batch):
        seen.append(len(batch.boxes))
        assert len(batch.outputs) == 2
        torch.testing.assert_close(batch.outputs[0], batch.outputs[1])

    a, b = run_tiled(source, plan, [fast, reference], tile_batch=2, on_batch=check)
    np.testing.assert_array_equal(a, b)
    assert sum(seen) == plan.num_tiles


def test_non_finite_output_names_the_tile():
    source = ArraySource(random_image(3, 100, 100))
    plan = plan_tiles(100, 100, 64, 16)

    def broken(tiles):
        out = tiles.clone()
        if tiles[0, 0, 0, 0] == source.image[0, 36, 36]:  # the last tile (y=36, x=36)
            out[0, 1, 5, 5] = float("nan")
        return out

    with pytest.raises(NonFiniteOutputError) as caught:
        run_tiled(source, plan, [broken])
    assert caught.value.boxes == [(36, 36, 64, 64)]
    assert "y=36, x=36" in str(caught.value)


def test_wrong_output_shape_is_an_error():
    source = ArraySource(random_image(3, 50, 50))
    with pytest.raises(ValueError, match="returned shape"):
        run_tiled(source, plan_tiles(50, 50, 32, 8), [lambda t: t[..., :-1]])


def test_fixed_shape_functions_get_padded_tiles():
    shape = (64, 64)

    def static_engine(tiles):
        assert tuple(tiles.shape[-2:]) == shape
        return torch.tanh(2 * tiles)

    image = random_image(3, 40, 50)
    fn = fit_to_shape(static_engine, shape)
    (out,) = run_tiled(ArraySource(image), plan_tiles(40, 50, shape, 16), [fn])
    np.testing.assert_allclose(out, torch.tanh(2 * image).permute(1, 2, 0).numpy(), atol=2e-6)


@pytest.mark.parametrize("tile_size", [(32, 24), (32, 47), (63, 24)])
def test_fixed_shape_pads_a_tile_half_its_size_or_less_by_replicate(tile_size):
    """Reflect padding needs pad < size: a tile exactly half the fixed shape (pad == size) along either axis is
    replicate-padded, as the model pads (a 32x24 image on a 64x48 static graph must run, not raise)."""
    shape = (64, 48)
    seen = []

    def static_engine(tiles):
        seen.append(tiles)
        return torch.tanh(2 * tiles)

    tiles = torch.stack([random_image(3, *tile_size, seed=seed) for seed in (0, 1)])
    out = fit_to_shape(static_engine, shape)(tiles)
    pad = (0, shape[1] - tile_size[1], 0, shape[0] - tile_size[0])
    torch.testing.assert_close(seen[0], F.pad(tiles, pad, mode="replicate"), rtol=0, atol=0)
    torch.testing.assert_close(out, torch.tanh(2 * tiles), rtol=0, atol=0)


def test_memory_is_the_output_plus_one_band():
    """The process's peak memory grows by about one output array: no full-size accumulators (numpy or
    torch), no list of all tiles. Measured as the RSS high-water mark, which sees both allocators."""
    from runtime.report import PeakMemory

    height, width, tile = 2048, 2048, 128
    source = ArraySource(random_image(3, height, width))
    plan = plan_tiles(height, width, tile, 32)
    output_bytes = height * width * 3 * 4
    band_bytes = tile * width * 4 * 4  # sum (3 channels) + weight
    slack = 16 * 2**20  # tile batches, the allocators' own caching
    memory = PeakMemory(torch.device("cpu"))
    baseline = memory.reset()
    run_tiled(source, plan, [lambda t: t * 0.5], tile_batch=2)
    grown = memory.read() - baseline
    print(f"peak RSS growth {grown / 2**20:.1f} MiB, output {output_bytes / 2**20:.1f} MiB, "
          f"plan.peak_bytes {plan.peak_bytes(tile_batch=2) / 2**20:.1f} MiB")
    assert grown < output_bytes + 3 * band_bytes + slack  # a full-size sum + weight would add 64 MiB
    assert plan.peak_bytes(tile_batch=2) < output_bytes + 3 * band_bytes


# ----------------------------------------------------------------------------- the model (acceptance)


@pytest.fixture(scope="module")
def tiny_backend():
    guidesr = pytest.importorskip("guidesr")
    from runtime.backends import TorchBackend

    return TorchBackend(guidesr.load_default_model())


def photo_low_res(size: int) -> torch.Tensor:
    from skimage import data

    image = Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1).contiguous()


def test_tiled_model_output_matches_untiled_without_seams(tiny_backend):
    """Acceptance 1: tiny preset, torch backend: tiled vs whole-image PSNR >= 35 dB and no seams.

    The seam measure is the mean |gradient| across tile borders over the mean elsewhere, divided
    by the same ratio of the untiled output at the same positions (so the picture's own edges
    that happen to lie on a border cancel out); it must stay within 10% of 1. Hard-edged tiles
    (no overlap) on the same image must fail it, or the measure would prove nothing.
    """
    source = BicubicSource(photo_low_res(64), 4)  # 256 x 256 output
    (whole,) = run_tiled(source, plan_tiles(256, 256, None, 0), [tiny_backend])
    plan = plan_tiles(256, 256, 192, 64)  # 2 x 2 tiles; the second row/column is moved inward to 64
    assert plan.ys == plan.xs == (0, 64)
    (tiled,) = run_tiled(source, plan, [tiny_backend], tile_batch=2)
    assert psnr(tiled, whole, 2.0) >= 35
    assert seam_ratio(tiled, plan) / seam_ratio(whole, plan) <= 1.1

    hard_plan = plan_tiles(256, 256, 128, 0)
    (hard,) = run_tiled(source, hard_plan, [tiny_backend], tile_batch=2)
    assert seam_ratio(hard, hard_plan) / seam_ratio(whole, hard_plan) > 1.1
