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
    eval_pairs,
    load_image,
    random_crop_flip,
)
from guidesr.degradations import DegradationConfig


def gradient_image(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), np.full_like(x, 128)], axis=-1).astype(np.uint8)


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
    with pytest.raises(FileNotFoundError):
        HRImageFolder(tmp_path / "missing")


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
