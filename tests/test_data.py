"""HR image sources, the built-in sample set and the seeded (lq, hr) batch producer."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from guidesr.data import (
    SAMPLE_EVAL,
    SAMPLE_FILES,
    SAMPLE_TRAIN,
    HRImageFolder,
    PairConfig,
    SampleImages,
    TrainingPairs,
    batch_seed,
    eval_pairs,
    load_image,
    center_crop,
    random_crop_flip,
)
from guidesr.degradations import DegradationConfig
from runtime.imageio import write_image


def gradient_image(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), np.full_like(x, 128)],
                    axis=-1).astype(np.uint8)


def test_folder_finds_png_jpeg_webp_recursively(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(gradient_image(20, 30)).save(tmp_path / "one.png")
    Image.fromarray(gradient_image(20, 30)).save(tmp_path / "a" / "two.JPG", quality=95)
    Image.fromarray(gradient_image(20, 30)).save(tmp_path / "a" / "b" / "three.webp")
    Image.fromarray(gradient_image(20, 30)).convert("L").save(tmp_path / "a" / "b" / "grey.jpeg")
    (tmp_path / "notes.txt").write_text("not an image")
    folder = HRImageFolder(tmp_path)
    assert [p.name for p in folder.paths] == ["grey.jpeg", "three.webp", "two.JPG", "one.png"]
    for image in folder:
        assert image.shape == (3, 20, 30) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
    assert torch.allclose(folder[3], torch.from_numpy(gradient_image(20, 30)).permute(2, 0, 1) / 255.0)


def test_folder_finds_tiff_and_bmp_as_the_upscaler_does_and_keeps_16_bits(tmp_path):
    deep = np.random.default_rng(0).integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    write_image(tmp_path / "deep.tif", deep / 65535, bit_depth=16)
    Image.fromarray(gradient_image(20, 30)).save(tmp_path / "flat.BMP")
    Image.fromarray(gradient_image(20, 30)).save(tmp_path / "page.tiff")
    folder = HRImageFolder(tmp_path, crop_size=16)
    assert [p.name for p in folder.paths] == ["deep.tif", "flat.BMP", "page.tiff"]
    assert torch.allclose(folder[0], torch.from_numpy(deep / 65535).permute(2, 0, 1).float(), atol=1e-6)
    assert torch.allclose(folder[1], torch.from_numpy(gradient_image(20, 30)).permute(2, 0, 1) / 255.0)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(gradient_image(20, 30)).save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").shape == (3, 30, 20)


def test_unreadable_file_raises_naming_it(tmp_path):
    Image.fromarray(gradient_image(8, 8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG this is not really a png")
    folder = HRImageFolder(tmp_path)
    broken = folder.paths.index(tmp_path / "broken.png")
    with pytest.raises(ValueError, match="broken.png"):
        folder[broken]


def test_empty_or_missing_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no .* images"):
        HRImageFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HRImageFolder(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="notes.txt is not a folder"):
        HRImageFolder(tmp_path / "notes.txt")


def test_16bit_grey_keeps_its_range_and_bits(tmp_path):
    ramp = np.linspace(0, 65535, 40 * 50).round().astype(np.uint16).reshape(40, 50)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode == "I;16"
    expected = torch.from_numpy(ramp.astype(np.float32) / 65535).expand(3, -1, -1)
    loaded = load_image(tmp_path / "grey16.png")
    assert loaded.shape == (3, 40, 50) and loaded.dtype == torch.float32
    assert torch.allclose(loaded, expected, atol=1e-6)
    assert abs(loaded.mean().item() - 0.5) < 1e-3  # convert("RGB") clipped this to ~0.998
    # Big-endian 16-bit and 32-bit integer grey, as TIFF (and older Pillow's PNG decoder) give.
    Image.frombytes("I;16B", (50, 40), ramp.astype(">u2").tobytes()).save(tmp_path / "grey_big_endian.tiff")
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "grey_int32.tiff")
    for name, mode in (("grey_big_endian.tiff", "I;16B"), ("grey_int32.tiff", "I")):
        with Image.open(tmp_path / name) as image:
            assert image.mode == mode
        assert torch.allclose(load_image(tmp_path / name), expected, atol=1e-6), mode


def test_16bit_colour_png_keeps_its_range(tmp_path):
    from runtime.imageio import write_image

    rgb16 = np.random.default_rng(0).integers(0, 65536, (20, 30, 3)).astype(np.uint16)
    write_image(tmp_path / "rgb16.png", rgb16.astype(np.float32) / 65535, bit_depth=16)
    loaded = load_image(tmp_path / "rgb16.png").permute(1, 2, 0).numpy()
    assert np.abs(loaded - rgb16 / 65535).max() <= 1 / 255 + 1e-6


def test_out_of_range_and_float_images_are_refused_naming_the_file(tmp_path):
    Image.fromarray(np.full((8, 8), 70000, np.int32)).save(tmp_path / "wide.tiff")
    with pytest.raises(ValueError, match="wide.tiff.*outside 0..65535"):
        load_image(tmp_path / "wide.tiff")
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(ValueError, match="float.tiff.*mode F"):
        load_image(tmp_path / "float.tiff")


def test_transparency_is_composited_onto_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere, stored under every alpha value
    rgba[..., 3] = np.array([0, 128, 255, 255])[None, :]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    loaded = load_image(tmp_path / "rgba.png")
    alpha = torch.tensor([0, 128, 255, 255]) / 255.0
    assert torch.allclose(loaded[0, 0], 200 / 255 * alpha + 1 - alpha)
    assert torch.allclose(loaded[1, 0], 1 - alpha)  # green and blue: 0 under alpha, white elsewhere
    assert torch.equal(loaded[:, :, 0], torch.ones(3, 4))
    assert torch.allclose(loaded[:, :, 2:], torch.tensor([200 / 255, 0, 0]).view(3, 1, 1).expand(3, 4, 2))

    Image.fromarray(np.stack([np.full((4, 4), 50, np.uint8), rgba[..., 3]], -1), "LA").save(tmp_path / "la.png")
    assert torch.allclose(load_image(tmp_path / "la.png")[:, 0], (50 / 255 * alpha + 1 - alpha).expand(3, -1))

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30])
    palette.putpixel((0, 0), 0)
    palette.save(tmp_path / "p.png", transparency=0)
    loaded = load_image(tmp_path / "p.png")
    assert torch.equal(loaded[:, 0, 0], torch.ones(3))  # transparent black -> white
    assert torch.allclose(loaded[:, 1, 1], torch.tensor([10, 20, 30]) / 255.0)


def test_folder_with_crop_size_lists_every_unusable_file_up_front(tmp_path):
    Image.fromarray(gradient_image(40, 50)).save(tmp_path / "good.png")
    Image.fromarray(gradient_image(33, 90)).save(tmp_path / "just_fits.png")  # 33 > 64 / 2
    Image.fromarray(gradient_image(32, 90)).save(tmp_path / "too_short.png")  # 32 = 64 / 2
    Image.fromarray(gradient_image(90, 24)).save(tmp_path / "too_narrow.png")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    assert len(HRImageFolder(tmp_path)) == 5  # no crop size: nothing is opened
    with pytest.raises(ValueError) as error:
        HRImageFolder(tmp_path, crop_size=64)
    message = str(error.value)
    assert message.startswith("3 of 5 images cannot be used for 64x64 crops (each side needs at least 33 px):")
    assert "broken.png: cannot read image" in message
    assert "too_short.png: 90x32" in message and "too_narrow.png: 24x90" in message
    assert "good.png" not in message and "just_fits.png" not in message
    for name in ("broken.png", "too_short.png", "too_narrow.png"):
        (tmp_path / name).unlink()
    assert len(HRImageFolder(tmp_path, crop_size=64)) == 2


@pytest.mark.parametrize("suffix", [".png", ".webp"])
def test_an_animation_is_refused_up_front_as_load_image_refuses_it(tmp_path, suffix):
    frames = [Image.fromarray(gradient_image(40, 50) // (i + 1)) for i in range(3)]
    frames[0].save(tmp_path / f"animated{suffix}", save_all=True, append_images=frames[1:])
    Image.fromarray(gradient_image(40, 50)).save(tmp_path / "still.png")
    with pytest.raises(ValueError, match="3 frames"):
        load_image(tmp_path / f"animated{suffix}")
    with pytest.raises(ValueError) as error:
        HRImageFolder(tmp_path, crop_size=32)
    message = str(error.value)
    assert message.startswith("1 of 2 images cannot be used for 32x32 crops")
    assert f"animated{suffix}: cannot read image: 3 frames (an animation or a multi-page file)" in message
    assert "still.png" not in message


def test_up_front_pixel_limit_is_the_one_load_image_uses(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # load_image refuses over 2000 pixels
    Image.fromarray(gradient_image(30, 40)).save(tmp_path / "fits.png")
    Image.fromarray(gradient_image(50, 60)).save(tmp_path / "large.png")
    load_image(tmp_path / "fits.png")
    with pytest.raises(ValueError) as error:
        load_image(tmp_path / "large.png")
    pillows_limit = "over the limit of 0.002 megapixels (Pillow's decompression-bomb limit, 2 x PIL.Image.MAX_IMAGE"
    assert str(error.value).startswith(f"cannot read image {tmp_path / 'large.png'}: ")
    assert pillows_limit in str(error.value)
    assert "--max-megapixels" not in str(error.value)  # the runtime's option: training has none
    with pytest.raises(ValueError) as error:
        HRImageFolder(tmp_path, crop_size=32)
    assert "1 of 2 images" in str(error.value) and "large.png: cannot read image: " in str(error.value)
    assert pillows_limit in str(error.value) and "--max-megapixels" not in str(error.value)


def test_up_front_size_check_agrees_with_the_crops(tmp_path):
    g = torch.Generator().manual_seed(0)
    for side in range(10, 40):
        Image.fromarray(gradient_image(side, side + 7)).save(tmp_path / "image.png")
        for crop in (20, 21, 32, 33, 48):
            try:
                HRImageFolder(tmp_path, crop_size=crop)
                accepted = True
            except ValueError:
                accepted = False
            try:
                random_crop_flip(load_image(tmp_path / "image.png"), crop, g)
                center_crop(load_image(tmp_path / "image.png"), crop)
                croppable = True
            except ValueError:
                croppable = False
            assert accepted == croppable, (side, crop)


def test_sample_set_ships_with_scikit_image_and_holds_out_eval_images():
    assert set(SAMPLE_TRAIN).isdisjoint(SAMPLE_EVAL)
    assert set(SAMPLE_TRAIN) | set(SAMPLE_EVAL) == set(SAMPLE_FILES)
    assert 2 <= len(SAMPLE_EVAL) <= 3 and len(SAMPLE_TRAIN) >= 5
    train, evaluation = SampleImages("train"), SampleImages("eval")
    assert train.names == SAMPLE_TRAIN and evaluation.names == SAMPLE_EVAL
    for dataset in (train, evaluation):
        for path in dataset.paths:
            with Image.open(path) as image:  # header only: every photo is RGB and fits a 256 crop
                assert image.mode == "RGB" and min(image.size) >= 256, path
    image = evaluation[0]
    assert image.shape[0] == 3 and image.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown split"):
        SampleImages("test")


def test_random_crop_flip_takes_a_window_or_its_mirror():
    image = torch.rand(3, 40, 50)
    g = torch.Generator().manual_seed(0)
    flipped = 0
    for _ in range(20):
        crop = random_crop_flip(image, 16, g)
        assert crop.shape == (3, 16, 16)
        windows = image.unfold(1, 16, 1).unfold(2, 16, 1).permute(1, 2, 0, 3, 4)  # (25, 35, 3, 16, 16)
        if (windows == crop).flatten(2).all(-1).any():
            continue
        assert (windows == crop.flip(-1)).flatten(2).all(-1).any()
        flipped += 1
    assert 0 < flipped < 20
    # Smaller than the crop: reflect-padded up to it; far smaller: refused.
    assert random_crop_flip(torch.rand(3, 12, 40), 16, g).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="too small"):
        random_crop_flip(torch.rand(3, 6, 40), 16, g)


def small_pairs(seed: int) -> TrainingPairs:
    return TrainingPairs(SampleImages("train"), PairConfig(batch_size=2, crop_size=64, seed=seed))


def test_training_pairs_shapes_ranges_and_degradation():
    lq, hr = next(small_pairs(0))
    for tensor in (lq, hr):
        assert tensor.shape == (2, 3, 64, 64) and tensor.dtype == torch.float32
        assert tensor.min() >= -1 and tensor.max() <= 1
    assert hr.min() < -0.5 and hr.max() > 0.5  # [-1, 1], not [0, 1]
    assert (lq - hr).abs().mean() > 0.02  # the input really is degraded


def test_training_pairs_are_reproducible_from_the_seed():
    a, b, c = small_pairs(3), small_pairs(3), small_pairs(4)
    for _ in range(2):
        (lq_a, hr_a), (lq_b, hr_b), (_, hr_c) = next(a), next(b), next(c)
        assert torch.equal(lq_a, lq_b) and torch.equal(hr_a, hr_b)
        assert not torch.equal(hr_a, hr_c)


def test_eval_pairs_are_fixed_centre_crops():
    images = SampleImages("eval")
    lq, hr = eval_pairs(images, crop_size=64, seed=0)
    lq_again, _ = eval_pairs(images, crop_size=64, seed=0)
    assert lq.shape == hr.shape == (len(SAMPLE_EVAL), 3, 64, 64)
    assert torch.equal(lq, lq_again)
    first = images[0]
    top, left = (first.shape[1] - 64) // 2, (first.shape[2] - 64) // 2
    assert torch.equal(hr[0], first[:, top : top + 64, left : left + 64] * 2 - 1)
    with pytest.raises(ValueError, match="multiple of the scale"):
        TrainingPairs(images, PairConfig(crop_size=66, degradation=DegradationConfig()))


def test_eval_pairs_name_the_file_that_is_too_small(tmp_path):
    Image.fromarray(gradient_image(24, 24)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="small.png: image of 24x24 is too small for 64x64 crops"):
        eval_pairs(HRImageFolder(tmp_path), crop_size=64)


def test_eval_pairs_degrade_each_image_and_draw_on_its_own():
    images = SampleImages("eval")
    lq, hr = eval_pairs(images, crop_size=64, seed=3, draws=3)
    assert lq.shape == hr.shape == (3 * len(SAMPLE_EVAL), 3, 64, 64)
    assert torch.equal(hr[0], hr[2]) and not torch.equal(hr[2], hr[3])  # image-major
    assert not torch.equal(lq[0], lq[1]) and not torch.equal(lq[1], lq[2])  # the draws differ
    alone, _ = eval_pairs([images[0]], crop_size=64, seed=3, draws=3)
    assert torch.equal(alone, lq[:3])  # the first image's inputs do not depend on the images after it
    with pytest.raises(ValueError, match="draws"):
        eval_pairs(images, crop_size=64, draws=0)


def test_training_pairs_resume_at_any_batch_and_ignore_workers():
    images = SampleImages("train")
    config = PairConfig(batch_size=2, crop_size=64, seed=5)
    straight = TrainingPairs(images, config)
    batches = [next(straight) for _ in range(3)]
    resumed = TrainingPairs(images, config, start=2)
    lq, hr = next(resumed)
    assert torch.equal(lq, batches[2][0]) and torch.equal(hr, batches[2][1])
    with_workers = TrainingPairs(images, replace(config, num_workers=2), start=1)
    lq, hr = next(with_workers)
    assert torch.equal(lq, batches[1][0]) and torch.equal(hr, batches[1][1])
    other_rank = TrainingPairs(images, config, rank=1)
    assert not torch.equal(next(other_rank)[1], batches[0][1])


def test_ranks_never_draw_each_others_batches():
    """Every (rank, micro-batch) of a run has its own seed in the 32 bits a CPU generator keeps: eight ranks over a
    100k-step run see 800k distinct batches, not one stream shifted by a few thousand batches per rank."""
    seeds = {batch_seed(0, rank, index) % 2**32 for rank in range(8) for index in range(100_000)}
    assert len(seeds) == 8 * 100_000
    images = SampleImages("train")
    config = PairConfig(batch_size=2, crop_size=64, seed=0)
    first_of_rank_1 = next(TrainingPairs(images, config, rank=1))
    for index in (1, 7_919):
        later_of_rank_0 = next(TrainingPairs(images, config, start=index))
        assert not torch.equal(first_of_rank_1[1], later_of_rank_0[1])


def test_a_rank_refuses_batches_past_its_own():
    images = SampleImages("train")
    config = PairConfig(batch_size=2, crop_size=64, seed=0)
    with pytest.raises(ValueError, match="repeat another rank's"):
        next(TrainingPairs(images, config, start=2**24))
    with pytest.raises(ValueError, match="ranks 0 to 255"):
        TrainingPairs(images, config, rank=256)


@pytest.mark.gpu
def test_training_pairs_on_cuda_never_synchronise_and_resume_exactly():
    """Batches on CUDA draw their degradations from a CPU generator: making one neither reads the device nor
    waits for it, and a run resumed at batch k rebuilds batch k."""
    images = SampleImages("train")
    config = PairConfig(batch_size=2, crop_size=64, seed=0)
    pairs = TrainingPairs(images, config, device="cuda")
    next(pairs)  # first use: CUDA context, kernels, pinned memory pool
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = [next(pairs) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    lq, hr = next(TrainingPairs(images, config, device="cuda", start=2))
    assert lq.is_cuda and torch.equal(lq, batches[1][0]) and torch.equal(hr, batches[1][1])
