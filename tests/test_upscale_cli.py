"""runtime.upscale: the command line (files, folders, errors, skipping, atomic writes) and the Python API.

The model is the real tiny GuideSR, saved once per module as a checkpoint + base folder and
passed with --checkpoint (the way a user runs their own model); images are tiny (24x20 LR).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import runtime
from runtime import imageio
from runtime.backends import Backend, TorchBackend
from runtime.imageio import ImageWriteError, read_image, write_image
from runtime.tiling import NonFiniteOutputError
import runtime.upscale as upscale_module
from runtime.upscale import (EXIT_CANNOT_RUN, EXIT_FAILED_IMAGES, EXIT_INTERRUPTED, collect_jobs, effective_tile, main,
                             upscale_array, upscale_file)

from helpers import status_after_ctrl_c

REPO = Path(__file__).resolve().parents[1]


def save_tiny_checkpoint(root: Path, poison: bool = False) -> Path:
    """A tiny-preset GuideSR as a user has it: base folder (diffusers format) + checkpoint JSON."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from guidesr import build_model, preset_config
    from guidesr.checkpoint import save_checkpoint

    config = preset_config("tiny")
    base = root / "base"
    if not base.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            UNet2DConditionModel(**config.unet).save_pretrained(base / "unet")
            AutoencoderKL(**config.vae).save_pretrained(base / "vae")
    model = build_model(config, base)
    if poison:  # a diverged training run: the stored prompt embedding is NaN
        with torch.no_grad():
            model.prompt.embedding.fill_(float("nan"))
    return save_checkpoint(model, root / ("diverged" if poison else "tiny"), base_model="base")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def diverged_checkpoint(checkpoint) -> Path:
    return save_tiny_checkpoint(checkpoint.parent, poison=True)


@pytest.fixture(scope="module")
def backend(checkpoint) -> TorchBackend:
    import guidesr

    return TorchBackend(guidesr.load_model(checkpoint=checkpoint))


RNG = np.random.default_rng(7)


def make_inputs(folder: Path) -> dict[str, tuple[str, int, tuple]]:
    """Mixed inputs; returns name -> (expected output mode, bit depth, LR shape)."""
    folder.mkdir(parents=True, exist_ok=True)
    h, w = 20, 24
    rgb = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(rgb).save(folder / "photo.jpg", quality=90)
    Image.fromarray(rgb[..., 0]).save(folder / "grey.png")
    rgba = np.concatenate([rgb, np.linspace(0, 255, w, dtype=np.uint8)[None, :, None].repeat(h, 0)], axis=2)
    Image.fromarray(rgba).save(folder / "rgba.png")
    deep = RNG.integers(0, 65536, (h, w, 3), dtype=np.uint16)
    write_image(folder / "deep.png", deep / 65535, bit_depth=16)
    tifffile.imwrite(folder / "deep_grey.tif", deep[..., 0])
    return {
        "rgb": ("RGB", 8, (h, w)), "photo": ("RGB", 8, (h, w)), "grey": ("L", 8, (h, w)),
        "rgba": ("RGBA", 8, (h, w)), "deep": ("RGB", 16, (h, w)), "deep_grey": ("L", 16, (h, w)),
    }


def test_folder_batch_with_mixed_and_broken_inputs(tmp_path, checkpoint, capsys):
    expected = make_inputs(tmp_path / "in")
    good_png = (tmp_path / "in" / "rgb.png").read_bytes()
    (tmp_path / "in" / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    (tmp_path / "in" / "notes.png").write_text("not an image, despite the name\n")
    (tmp_path / "in" / "readme.txt").write_text("ignored: not an image extension\n")
    (tmp_path / "in" / ".hidden.png").write_bytes(good_png)  # hidden files are not picked up

    code = main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--checkpoint", str(checkpoint)])
    captured = capsys.readouterr()
    assert code == 1, captured
    assert "note: 1 file without an image extension left alone: readme.txt" in captured.out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"{name}.png" for name in expected)
    for name, (mode, bits, (h, w)) in expected.items():
        array, info = read_image(tmp_path / "out" / f"{name}.png")
        assert (info.mode, info.bit_depth, info.height, info.width) == (mode, bits, 4 * h, 4 * w), name
        assert np.isfinite(array).all() and array.std() > 0.01, name
    # alpha is the bicubic upsample of the input's (a left-to-right ramp)
    alpha = read_image(tmp_path / "out" / "rgba.png")[0][..., 3]
    assert alpha[:, :8].mean() < 0.1 and alpha[:, -8:].mean() > 0.9
    assert "truncated.png" in captured.err and "truncated" in captured.err
    assert "notes.png" in captured.err and "not a recognised image" in captured.err
    assert "6 written, 0 skipped (already there), 2 failed" in captured.out


def test_what_the_output_format_drops_is_noted(tmp_path, checkpoint, capsys):
    make_inputs(tmp_path / "in")
    code = main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--format", "jpg", "--checkpoint", str(checkpoint)])
    captured = capsys.readouterr()
    assert code == 0, captured
    notes = [line for line in captured.out.splitlines() if "note:" in line]
    assert len(notes) == 3, notes  # rgba: alpha; deep, deep_grey: 16 bits
    assert any("rgba.jpg: JPEG has no alpha channel; the alpha channel is dropped" in line for line in notes)
    for name in ("deep.jpg", "deep_grey.jpg"):
        assert any(f"{name}: JPEG holds 8 bits a channel" in line for line in notes), name
    assert "6 written" in captured.out


def test_unreadable_headers_are_reported_before_the_model_loads(tmp_path, checkpoint, capsys, monkeypatch):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.png").write_text("not an image\n")
    Image.new("RGB", (3000, 3000)).save(tmp_path / "in" / "big.png")

    def no_model(*args):
        raise AssertionError("the model was loaded although no input can be read")

    monkeypatch.setattr(upscale_module, "_make_backend", no_model)
    code = main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--checkpoint", str(checkpoint),
                 "--max-megapixels", "1"])
    captured = capsys.readouterr()
    assert code == 1
    assert "notes.png: not a recognised image" in captured.err
    assert "big.png: 3000x3000 = 9.0 megapixels is over the limit of 1 megapixels" in captured.err
    assert "0 written, 0 skipped (already there), 2 failed" in captured.out


def test_existing_outputs_are_skipped_unless_overwrite(tmp_path, checkpoint, capsys):
    make_inputs(tmp_path / "in")
    for name in ("photo.jpg", "grey.png", "rgba.png", "deep.png", "deep_grey.tif"):
        (tmp_path / "in" / name).unlink()
    Image.fromarray(RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "in" / "second.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "rgb.png").write_bytes(b"precious: do not touch")

    args = [str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--checkpoint", str(checkpoint)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "out" / "rgb.png").read_bytes() == b"precious: do not touch"
    assert "skip:" in out and "rgb.png exists" in out
    assert read_image(tmp_path / "out" / "second.png")[1].width == 96
    assert "1 written, 1 skipped" in out

    assert main(args) == 0  # everything is there: nothing to do, the model is not even loaded
    assert "0 written, 2 skipped" in capsys.readouterr().out

    assert main(args + ["--overwrite"]) == 0
    assert read_image(tmp_path / "out" / "rgb.png")[1].width == 96
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["rgb.png", "second.png"]


def test_a_failed_write_leaves_no_partial_file_and_the_batch_goes_on(tmp_path, checkpoint, capsys, monkeypatch):
    make_inputs(tmp_path / "in")
    real_encode = imageio._encode

    def disk_full_for_grey(stream, pixels, *options):
        if pixels.ndim == 3 and pixels.shape[2] == 1 and pixels.dtype == np.uint8:  # grey.png's output
            stream.write(b"\x89PNG\r\n\x1a\n half an image")
            raise OSError(28, "No space left on device")
        return real_encode(stream, pixels, *options)

    monkeypatch.setattr(imageio, "_encode", disk_full_for_grey)
    code = main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--checkpoint", str(checkpoint)])
    captured = capsys.readouterr()
    assert code == 1
    assert "grey.png" in captured.err and "No space left" in captured.err
    names = sorted(p.name for p in (tmp_path / "out").iterdir())  # hidden temporaries would show here too
    assert names == ["deep.png", "deep_grey.png", "photo.png", "rgb.png", "rgba.png"]


def test_single_file_output_format_from_the_extension_and_format_for_folders(tmp_path, checkpoint, capsys):
    make_inputs(tmp_path / "in")
    source = tmp_path / "in" / "rgb.png"
    assert main([str(source), "-o", str(tmp_path / "single.jpg"), "--checkpoint", str(checkpoint),
                 "--jpeg-quality", "80", "--tile", "64", "--overlap", "16", "--tile-batch", "2"]) == 0
    array, info = read_image(tmp_path / "single.jpg")
    assert info.format == "jpeg" and array.shape == (80, 96, 3)

    assert main([str(source), str(tmp_path / "in" / "rgba.png"), "-o", str(tmp_path / "webp"), "--format", "webp",
                 "--checkpoint", str(checkpoint)]) == 0
    assert sorted(p.name for p in (tmp_path / "webp").iterdir()) == ["rgb.webp", "rgba.webp"]
    assert read_image(tmp_path / "webp" / "rgba.webp")[1].mode == "RGBA"

    capsys.readouterr()
    assert main([str(source), str(source), "-o", str(tmp_path / "two.png"), "--checkpoint", str(checkpoint)]) == 2
    assert "not a single file" in capsys.readouterr().err


def test_recursive_keeps_subfolders_and_never_rescans_its_own_output(tmp_path, checkpoint, capsys):
    pixels = RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    (tmp_path / "in" / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(pixels).save(tmp_path / "in" / "a.png")
    Image.fromarray(pixels).save(tmp_path / "in" / "sub" / "deeper" / "b.jpg")
    out = tmp_path / "in" / "upscaled"  # inside the input folder
    args = [str(tmp_path / "in"), "--recursive", "-o", str(out), "--checkpoint", str(checkpoint)]
    assert main(args) == 0
    found = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert found == ["a.png", "sub/deeper/b.png"]
    assert main(args) == 0
    assert "0 written, 2 skipped" in capsys.readouterr().out
    assert not (out / "upscaled").exists()


def test_output_name_collisions_are_reported(tmp_path):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "in" / "same.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "in" / "same.jpg")
    jobs = collect_jobs([tmp_path / "in"], tmp_path / "out")
    assert [job.source.name for job in jobs.jobs] == ["same.jpg"]
    assert len(jobs.failures) == 1 and "same.png" in jobs.failures[0] and "also the output of" in jobs.failures[0]


def test_an_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "b.jpg")
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    jobs = collect_jobs([tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "b.png"], tmp_path)
    assert jobs.jobs == []
    assert len(jobs.failures) == 3 and all("is an input; the input is never replaced" in f for f in jobs.failures)


def test_model_output_with_nan_is_an_error_naming_the_file(tmp_path, diverged_checkpoint, capsys):
    make_inputs(tmp_path / "in")
    code = main([str(tmp_path / "in" / "rgb.png"), "-o", str(tmp_path / "out"),
                 "--checkpoint", str(diverged_checkpoint)])
    captured = capsys.readouterr()
    assert code == 1
    assert "rgb.png" in captured.err and "NaN/Inf" in captured.err
    assert list((tmp_path / "out").iterdir()) == []


def test_python_api(tmp_path, backend):
    grey = RNG.integers(0, 256, (20, 24), dtype=np.uint8)
    result = runtime.upscale(grey, backend=backend)  # `runtime.upscale` is the callable module
    assert result.shape == (80, 96, 1) and result.dtype == np.float32
    assert 0 <= result.min() and result.max() <= 1

    rgba = RNG.random((20, 24, 4), dtype=np.float32)
    assert runtime.upscale(rgba, backend=backend, tile=64, overlap=16).shape == (80, 96, 4)

    path = write_image(tmp_path / "in.png", RNG.random((20, 24, 3), dtype=np.float32))
    from_file = runtime.upscale(path, backend=backend)
    assert from_file.shape == (80, 96, 3)

    out = upscale_file(path, tmp_path / "out.tif", backend)
    assert read_image(out)[0].shape == (80, 96, 3)
    np.testing.assert_allclose(read_image(out)[0], from_file, atol=1 / 255)


def test_nan_from_the_api_names_the_file(tmp_path, diverged_checkpoint):
    import guidesr

    model = guidesr.load_model(checkpoint=diverged_checkpoint)
    path = write_image(tmp_path / "in.png", RNG.random((20, 24, 3), dtype=np.float32))
    with pytest.raises(NonFiniteOutputError, match="in.png"):
        upscale_file(path, tmp_path / "out.png", TorchBackend(model))
    assert not (tmp_path / "out.png").exists()


def test_command_line_entry_point():
    """`python -m runtime.upscale` itself: help text, and no runpy warning about the module."""
    result = subprocess.run([sys.executable, "-m", "runtime.upscale", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    assert "--tile-batch" in result.stdout and "--max-megapixels" in result.stdout
    assert "RuntimeWarning" not in result.stderr


def test_bad_options_are_refused(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["x.png", "-o", "y.png", "--tile", "64", "--overlap", "64"])
    assert caught.value.code == 2 and "--overlap 64 must be smaller than --tile 64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["x.png", "-o", "y.png", "--backend", "no-such-backend"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main(["x.png", "-o", "y.png", "--tile", "16", "--overlap", "15"])
    assert caught.value.code == 2 and "every output pixel about 256 times" in capsys.readouterr().err


def test_host_out_of_memory_fails_that_image_only(tmp_path, checkpoint, capsys, monkeypatch):
    expected = make_inputs(tmp_path / "in")
    real_read = upscale_module.read_image

    def read_or_run_out(path, *args, **kwargs):
        if Path(path).name == "photo.jpg":
            raise MemoryError
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(upscale_module, "read_image", read_or_run_out)
    code = main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--checkpoint", str(checkpoint)])
    captured = capsys.readouterr()
    assert code == 1
    assert "photo.jpg: out of host memory" in captured.err
    assert f"{len(expected) - 1} written, 0 skipped (already there), 1 failed" in captured.out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"{name}.png" for name in expected
                                                                         if name != "photo")


def test_commands_that_cannot_run_exit_2_and_say_why(tmp_path, checkpoint, capsys):
    make_inputs(tmp_path / "in")
    source = tmp_path / "in" / "rgb.png"
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(source), "-o", str(tmp_path / "out.gif")], ".gif is not an output format"),
        ([str(tmp_path / "in"), "-o", str(tmp_path / "result.txt")], ".txt is not an output format"),
        ([str(tmp_path / "empty"), "-o", str(tmp_path / "out")], "no images in"),
        ([str(tmp_path / "in"), "-o", str(tmp_path / "in")], "files inside -o are never inputs"),
        ([str(source), "-o", str(source), "--overwrite"], "is the input itself"),
        ([str(source), "-o", str(tmp_path / "x.png"), "--device", "foo"], "--device 'foo' is not a device"),
    ]
    before = source.read_bytes()
    for argv, message in cases:
        assert main(argv + ["--checkpoint", str(checkpoint)]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "out.gif").exists() and not (tmp_path / "result.txt").exists()
    assert not (tmp_path / "x.png").exists() and source.read_bytes() == before


_RSS_CHILD = """
import resource, sys
from runtime.upscale import main
code = main(sys.argv[1:])
print("MAXRSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(code)
"""


@pytest.mark.slow
def test_a_4096_output_stays_under_4_gb(tmp_path, checkpoint):
    """Acceptance 2: 1024x1024 in, 4096x4096 out (tiny preset, torch, CPU), peak RSS < 4 GB.

    81 tiles of 512x512: about 8 minutes on 2 idle cores, 20+ when they are shared.
    """
    from skimage import data

    source = tmp_path / "big.png"
    Image.fromarray(data.astronaut()).resize((1024, 1024), Image.Resampling.BICUBIC).save(source)
    destination = tmp_path / "big_x4.png"
    result = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(source), "-o", str(destination), "--checkpoint", str(checkpoint),
         "--device", "cpu", "--tile", "512", "--overlap", "64"],
        cwd=REPO, capture_output=True, text=True, timeout=3600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    peak_kib = int(result.stdout.split("MAXRSS_KIB")[1].split()[0])
    print(f"peak RSS {peak_kib / 2**20:.2f} GiB")
    assert peak_kib * 1024 < 4 * 10**9
    with Image.open(destination) as image:
        assert image.size == (4096, 4096)


# ------------------------------------------------------- a stand-in model, no weights

GAIN, OFFSET = (0.5, 0.8, 0.3), (0.2, -0.1, 0.0)  # per channel, so channel order and grey conversion show


class ChannelAffineBackend(Backend):
    """A stand-in model on any tile shape: a * x + b per channel, in the model's [-1, 1] (stays inside it)."""

    name, precision, device = "channel-affine", "fp32", torch.device("cpu")

    def __init__(self, scale: int = 4, size_multiple: int = 1):
        self.descriptor = types.SimpleNamespace(scale=scale, size_multiple=size_multiple)

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        return tiles * torch.tensor(GAIN).view(1, 3, 1, 1) + torch.tensor(OFFSET).view(1, 3, 1, 1)


def reference_upscale(image: np.ndarray, scale: int) -> np.ndarray:
    """What upscale_array must return with ChannelAffineBackend, in float64: bicubic of the colour in [-1, 1]
    (clamped), the model, back to [0, 1], BT.601 luma for grey, alpha bicubic-upsampled and clamped."""
    channels = image.shape[2]
    has_alpha = channels in (2, 4)
    color = torch.from_numpy(image[..., : channels - 1] if has_alpha else image).permute(2, 0, 1)[None].double()
    color = color.expand(1, 3, -1, -1)
    up = F.interpolate(color * 2 - 1, scale_factor=scale, mode="bicubic", align_corners=False).clamp(-1, 1)
    out = (up * torch.tensor(GAIN, dtype=torch.float64).view(1, 3, 1, 1)
           + torch.tensor(OFFSET, dtype=torch.float64).view(1, 3, 1, 1))
    out = ((out + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    if color.shape[1] == 3 and channels in (1, 2):
        out = (out @ np.array([0.299, 0.587, 0.114]))[..., None]
    if not has_alpha:
        return out
    alpha = torch.from_numpy(image[..., -1]).double()[None, None]
    alpha = F.interpolate(alpha, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)[0, 0].numpy()
    return np.concatenate([out, alpha[..., None]], axis=-1)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("tile,overlap", [(None, 0), (16, 6)])
def test_upscale_array_matches_a_float64_reference(channels, tile, overlap):
    rng = np.random.default_rng(channels)
    image = rng.random((13, 10, channels))
    image[..., -1] = np.linspace(0, 1, 10)[None, :] ** 2  # a smooth alpha (or colour) ramp plus noise elsewhere
    result = upscale_array(image.astype(np.float32), ChannelAffineBackend(), scale=3, tile=tile, overlap=overlap)
    assert result.shape == (39, 30, channels) and result.dtype == np.float32
    np.testing.assert_allclose(result, reference_upscale(image.astype(np.float32).astype(np.float64), 3), atol=2e-6)


@pytest.mark.parametrize("values, message", [
    ("nan", "the image has 1 NaN/Inf values; a float image holds finite values in [0, 1]"),
    ("inf", "the image has 1 NaN/Inf values; a float image holds finite values in [0, 1]"),
    ("0..255", "a float image holds values in [0, 1]; this one ranges over 0..255 (values in 0..255? divide by 255, "
               "or pass uint8)"),
    ("-0.5..1", "a float image holds values in [0, 1]; this one ranges over -0.5..1"),
    ("empty", "the image is empty (shape (0, 6, 3))"),
])
def test_bad_pixel_values_are_named_not_blamed_on_the_model(values, message):
    image = np.linspace(0, 1, 5 * 6 * 3, dtype=np.float32).reshape(5, 6, 3)
    if values in ("nan", "inf"):
        image[2, 3, 1] = float(values)
    elif values == "0..255":
        image *= 255
    elif values == "-0.5..1":
        image[0, 0, 0] = -0.5
    else:
        image = image[:0]
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        upscale_array(image, ChannelAffineBackend(), scale=2)


def test_values_within_one_8bit_step_of_the_unit_range_are_clipped():
    image = np.linspace(-0.003, 1.003, 5 * 6 * 3, dtype=np.float32).reshape(5, 6, 3)
    result = upscale_array(image, ChannelAffineBackend(), scale=2)
    assert result.shape == (10, 12, 3) and 0 <= result.min() and result.max() <= 1


def test_effective_tile_is_rounded_down_to_the_size_multiple():
    backend = ChannelAffineBackend(size_multiple=16)
    assert ([effective_tile(backend, tile) for tile in (100, 96, 17, 8, 0, None)]
            == [(96, 96), (96, 96), (16, 16), (16, 16), None, None])


def test_upscale_file_keeps_the_inputs_icc_profile(tmp_path):
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(RNG.integers(0, 256, (9, 11, 3), dtype=np.uint8)).save(tmp_path / "in.png", icc_profile=profile)
    out = upscale_file(tmp_path / "in.png", tmp_path / "out.png", ChannelAffineBackend(), scale=2)
    array, info = read_image(out)
    assert array.shape == (18, 22, 3) and info.icc_profile == profile


@pytest.mark.filterwarnings("error")  # a read-only array (a mode F image's) made torch warn
def test_pil_images_and_arrays_of_every_integer_layout_are_read_as_from_a_file():
    backend = ChannelAffineBackend(scale=2)
    grey16 = RNG.integers(0, 65536, (6, 7), dtype=np.uint16)
    grey8 = RNG.integers(0, 256, (6, 7), dtype=np.uint8)
    expected_grey16 = upscale_array(grey16 / 65535, backend)
    expected_grey8 = upscale_array(grey8 / 255, backend)
    same_as_grey16 = {
        "mode I": Image.fromarray(grey16.astype(np.int32)),
        "mode I;16B": Image.fromarray(grey16).convert("I").convert("I;16B"),
        "mode F": Image.fromarray((grey16 / 65535).astype(np.float32)),
        "big-endian uint16": grey16.astype(">u2"),
    }
    for name, image in same_as_grey16.items():
        np.testing.assert_allclose(runtime.upscale(image, backend=backend), expected_grey16, atol=1e-6, err_msg=name)
    bilevel = Image.fromarray(grey8 > 127)
    np.testing.assert_allclose(runtime.upscale(bilevel, backend=backend),
                               upscale_array(np.asarray(bilevel, np.float32), backend), atol=1e-6)
    grey_alpha = np.dstack([grey8, RNG.integers(1, 256, (6, 7), dtype=np.uint8)])
    premultiplied = Image.fromarray(grey_alpha, "LA").convert("La")
    np.testing.assert_allclose(runtime.upscale(premultiplied, backend=backend),
                               upscale_array(np.asarray(premultiplied.convert("LA")) / 255, backend), atol=1e-6)
    np.testing.assert_allclose(runtime.upscale(Image.fromarray(grey8), backend=backend), expected_grey8, atol=1e-6)


@pytest.fixture
def stand_in_model(monkeypatch):
    """main() with ChannelAffineBackend instead of loading a model."""
    monkeypatch.setattr(upscale_module, "_make_backend", lambda args, shard: (ChannelAffineBackend(), None))


def test_jpeg_quality_reaches_the_encoder(tmp_path, stand_in_model):
    source = write_image(tmp_path / "in.png", RNG.random((10, 12, 3), dtype=np.float32))
    tables = {}
    for quality in ("15", "95"):
        assert main([str(source), "-o", str(tmp_path / f"q{quality}.jpg"), "--jpeg-quality", quality]) == 0
        with Image.open(tmp_path / f"q{quality}.jpg") as image:
            tables[quality] = image.quantization[0][0]  # the luma table's DC step
    assert tables["15"] > 3 * tables["95"], tables


def test_max_megapixels_zero_means_no_limit(tmp_path, stand_in_model, capsys):
    source = write_image(tmp_path / "in.png", RNG.random((10, 12, 3), dtype=np.float32))
    assert main([str(source), "-o", str(tmp_path / "out.png"), "--max-megapixels", "0"]) == 0, capsys.readouterr()
    assert read_image(tmp_path / "out.png")[0].shape == (40, 48, 3)


def test_ctrl_c_leaves_whole_outputs_and_says_the_same_command_finishes(tmp_path, monkeypatch, capsys):
    calls = []

    class InterruptedOnTheSecondImage(ChannelAffineBackend):
        def __call__(self, tiles):
            calls.append(len(tiles))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return super().__call__(tiles)

    monkeypatch.setattr(upscale_module, "_make_backend", lambda args, shard: (InterruptedOnTheSecondImage(), None))
    (tmp_path / "in").mkdir()
    for name in ("a", "b", "c"):
        write_image(tmp_path / "in" / f"{name}.png", RNG.random((5, 6, 3), dtype=np.float32))
    args = [str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--tile", "0"]
    assert status_after_ctrl_c(main, args) == EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["a.png"]
    assert read_image(tmp_path / "out" / "a.png")[0].shape == (20, 24, 3)
    monkeypatch.setattr(upscale_module, "_make_backend", lambda args, shard: (ChannelAffineBackend(), None))
    assert main(args) == 0
    assert "1 skipped" in capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "c.png"]


def test_an_out_with_a_trailing_slash_is_a_folder(tmp_path):
    source = write_image(tmp_path / "in.png", RNG.random((5, 6, 3), dtype=np.float32))
    jobs = collect_jobs([source], str(tmp_path / "x4.png") + "/").jobs
    assert jobs == [upscale_module.Job(source, tmp_path / "x4.png" / "in.png")]


def test_a_cmyk_jpeg_with_a_broken_profile_fails_that_image_only(tmp_path, stand_in_model, capsys):
    (tmp_path / "in").mkdir()
    Image.new("CMYK", (6, 5), (0, 255, 255, 0)).save(tmp_path / "in" / "broken.jpg", icc_profile=b"not a profile" * 9)
    write_image(tmp_path / "in" / "good.png", RNG.random((5, 6, 3), dtype=np.float32))
    assert main([str(tmp_path / "in"), "-o", str(tmp_path / "out")]) == EXIT_FAILED_IMAGES
    errors = capsys.readouterr().err
    assert "broken.jpg: its embedded ICC profile cannot convert its colours to RGB" in errors
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["good.png"]


def test_a_rank_does_and_reports_only_its_share(tmp_path, stand_in_model, capsys, monkeypatch):
    """Under torchrun (rank 1 of 2) jobs and input problems are split alike: each reported by one rank."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    names = ["a", "b", "c", "d", "e"]
    for name in names:
        write_image(tmp_path / f"{name}.png", RNG.random((6, 7, 3), dtype=np.float32))
    inputs = ([str(tmp_path / f"{name}.png") for name in names]
              + [str(tmp_path / "gone1.png"), str(tmp_path / "gone2.png")])
    assert main([*inputs, "-o", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.png", "d.png"]
    assert "gone2.png: no such file" in captured.err and "gone1.png" not in captured.err
    assert "[rank 1/2] 2 written, 0 skipped (already there), 1 failed" in captured.out


def test_the_overlap_is_checked_against_the_tile_actually_used(tmp_path, capsys):
    """--tile 90 passes the command-line check, but the tiny model's size multiple (16) makes it 80: an overlap of 64
    would compute every output pixel 25 times."""
    path = write_image(tmp_path / "in.png", RNG.random((40, 40, 3), dtype=np.float32))
    assert main([str(path), "-o", str(tmp_path / "out.png"), "--tile", "90", "--overlap", "64"]) == EXIT_CANNOT_RUN
    assert ("--overlap 64 with the tile actually used, 80x80 computes every output pixel about 25 times"
            in capsys.readouterr().err)
    assert not (tmp_path / "out.png").exists()


def test_an_output_folder_that_cannot_be_made_fails_its_images_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def no_backend(args, shard):
        raise AssertionError("the backend was made although no image could be written")

    monkeypatch.setattr("runtime.upscale._make_backend", no_backend)
    (tmp_path / "in").mkdir()
    for name in ("a", "b"):
        write_image(tmp_path / "in" / f"{name}.png", RNG.random((8, 8, 3), dtype=np.float32))
    (tmp_path / "blocker").write_text("")
    assert main([str(tmp_path / "in"), "-o", str(tmp_path / "blocker" / "out")]) == EXIT_FAILED_IMAGES
    err = capsys.readouterr().err
    for name in ("a", "b"):
        assert (f"error: {tmp_path / 'in' / name}.png: cannot write {tmp_path / 'blocker' / 'out' / name}.png: "
                f"{tmp_path / 'blocker'} is not a folder") in err


@pytest.mark.parametrize("orientation", range(2, 9))  # 1 is upright
def test_a_pil_images_exif_orientation_is_applied_as_for_its_file(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "oriented.jpg"
    Image.fromarray(RNG.integers(0, 256, (6, 9, 3), dtype=np.uint8)).save(path, exif=exif, quality=95)
    backend = ChannelAffineBackend(scale=2)
    from_file = runtime.upscale(path, backend=backend)
    with Image.open(path) as image:
        np.testing.assert_array_equal(runtime.upscale(image, backend=backend), from_file)
        np.testing.assert_array_equal(runtime.upscale(ImageOps.exif_transpose(image), backend=backend), from_file)


def test_a_float_pil_images_exif_orientation_is_applied():
    values = RNG.random((6, 9), dtype=np.float32)
    image = Image.fromarray(values)
    image.getexif()[0x0112] = 8  # rotate 90 degrees counter-clockwise to display
    backend = ChannelAffineBackend(scale=2)
    np.testing.assert_array_equal(runtime.upscale(image, backend=backend),
                                  upscale_array(np.rot90(values)[..., None].copy(), backend))


def test_upscale_file_keeps_the_print_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # a quarter turn: the output's x is the stored y
    source = tmp_path / "scan.png"
    Image.fromarray(RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)).save(source, exif=exif, dpi=(72, 150))
    for name in ("out.png", "out.jpg", "out.tif"):
        out = upscale_file(source, tmp_path / name, ChannelAffineBackend(), scale=2)
        array, info = read_image(out)
        assert array.shape[:2] == (14, 10)
        np.testing.assert_allclose(info.dpi, (300, 144), rtol=1e-3, err_msg=name)
    plain = write_image(tmp_path / "plain.png", RNG.random((5, 7, 3), dtype=np.float32))
    assert read_image(upscale_file(plain, tmp_path / "plain_x2.png", ChannelAffineBackend(), scale=2))[1].dpi is None


def test_one_file_given_twice_is_one_job(tmp_path, stand_in_model, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    source = write_image(folder / "a.png", RNG.random((5, 6, 3), dtype=np.float32))
    (tmp_path / "linked").symlink_to(folder)
    spellings = [folder, source.resolve(), tmp_path / "in" / ".." / "in" / "a.png", tmp_path / "linked"]
    jobs = collect_jobs(spellings, tmp_path / "out")
    assert (len(jobs.jobs), jobs.failures) == (1, [])
    assert main([*map(str, spellings), "-o", str(tmp_path / "out")]) == 0
    assert "1 written, 0 skipped (already there), 0 failed" in capsys.readouterr().out


def test_an_output_that_is_an_input_under_another_name_is_refused(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    source = write_image(folder / "a.png", RNG.random((5, 6, 3), dtype=np.float32))
    (tmp_path / "out").mkdir()
    os.link(source, tmp_path / "out" / "a.png")  # a hard link: the same file, whose path resolves elsewhere
    with pytest.raises(ValueError, match="is the input itself; the input is never replaced, even with --overwrite"):
        collect_jobs([source], tmp_path / "out" / "a.png")
    jobs = collect_jobs([folder], tmp_path / "out")
    assert jobs.jobs == []
    assert jobs.failures == [f"{source}: its output {tmp_path / 'out' / 'a.png'} is an input; the input is never "
                             f"replaced, even with --overwrite (give another -o or --format)"]


def test_upscale_file_never_replaces_its_source(tmp_path):
    (tmp_path / "sub").mkdir()
    source = write_image(tmp_path / "in.png", RNG.random((5, 6, 3), dtype=np.float32))
    before = source.read_bytes()
    other_spelling = tmp_path / "sub" / ".." / "in.png"
    with pytest.raises(ImageWriteError, match=re.escape(f"cannot write image {other_spelling}: it is the input "
                                                        f"{source} itself; the input is never replaced")):
        upscale_file(source, other_spelling, ChannelAffineBackend(), scale=2, overwrite=True)
    assert source.read_bytes() == before


@pytest.mark.parametrize("tile,overlap,message", [
    (90, 64, "--overlap 64 with the tile actually used, 80x80 computes every output pixel about 25 times; keep the "
             "overlap under 3/4 of the tile"),
    (96, 96, "--overlap 96 must be smaller than the tile actually used, 96x96"),
])
def test_the_api_refuses_the_tiles_the_command_line_refuses(tile, overlap, message):
    """The message of test_the_overlap_is_checked_against_the_tile_actually_used, from the array API; the image is
    small enough that the old tiler would have run it (in one tile, or doing 25 times the work)."""
    image = RNG.random((10, 10, 3), dtype=np.float32)
    backend = ChannelAffineBackend(size_multiple=16)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        upscale_array(image, backend, tile=tile, overlap=overlap)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        runtime.upscale(image, backend=backend, tile=tile, overlap=overlap)
