"""runtime.imageio: formats, bit depths, alpha, orientation, errors, bomb limit, atomic writes."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from runtime import imageio
from runtime.imageio import (ImageReadError, ImageTooLargeError, OutputExistsError, OutputFormatWarning,
                             check_image_header, read_image, write_image)

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(1234)


def random_pixels(height, width, channels, bits):
    top = 255 if bits == 8 else 65535
    return RNG.integers(0, top + 1, (height, width, channels)).astype(np.uint8 if bits == 8 else np.uint16)


def as_integers(array, bits):
    return np.rint(array * (255 if bits == 8 else 65535)).astype(np.uint8 if bits == 8 else np.uint16)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("channels,mode", [(1, "L"), (2, "LA"), (3, "RGB"), (4, "RGBA")])
def test_lossless_round_trip_keeps_mode_and_bit_depth(tmp_path, suffix, bits, channels, mode):
    pixels = random_pixels(13, 17, channels, bits)
    path = tmp_path / f"image{suffix}"
    write_image(path, pixels / (255 if bits == 8 else 65535), bit_depth=bits)
    array, info = read_image(path)
    assert array.dtype == np.float32 and array.shape == (13, 17, channels)
    assert (info.mode, info.bit_depth, info.has_alpha) == (mode, bits, channels in (2, 4))
    assert (info.width, info.height, info.path) == (17, 13, str(path))
    np.testing.assert_array_equal(as_integers(array, bits), pixels)


def test_sixteen_bit_png_is_readable_by_pillow_as_a_valid_png(tmp_path):
    # Our own 16-bit colour PNG encoder must produce a file other decoders accept (Pillow gives 8-bit).
    pixels = random_pixels(9, 11, 3, 16)
    path = write_image(tmp_path / "deep.png", pixels / 65535, bit_depth=16)
    with Image.open(path) as image:
        image.load()
        assert image.size == (11, 9)
        np.testing.assert_array_equal(np.asarray(image), (pixels >> 8).astype(np.uint8))


def test_sixteen_bit_input_to_eight_bit_formats(tmp_path):
    pixels = random_pixels(8, 8, 3, 16)
    for name in ("out.jpg", "out.webp", "out.bmp"):
        with pytest.warns(OutputFormatWarning, match="the 16-bit image is written with 8") as caught:
            path = write_image(tmp_path / name, pixels / 65535, bit_depth=16)
        assert len(caught) == 1 and name in str(caught[0].message)
        array, info = read_image(path)
        assert info.bit_depth == 8 and info.mode == "RGB" and array.shape == (8, 8, 3)


def test_alpha_kept_where_the_format_allows(tmp_path):
    pixels = random_pixels(16, 16, 4, 8)
    pixels[..., 3] = np.linspace(0, 255, 16, dtype=np.uint8)[None, :]
    for name, expected_mode in (("a.png", "RGBA"), ("a.webp", "RGBA"), ("a.tif", "RGBA"), ("a.jpg", "RGB"),
                                ("a.bmp", "RGB")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            array, info = read_image(write_image(tmp_path / name, pixels / 255))
        assert info.mode == expected_mode, name
        dropped = [w for w in caught if issubclass(w.category, OutputFormatWarning)]
        if expected_mode == "RGBA":
            assert dropped == [], name
        else:
            assert len(dropped) == 1 and "the alpha channel is dropped" in str(dropped[0].message), name
        if expected_mode == "RGBA":
            np.testing.assert_allclose(array[..., 3], pixels[..., 3] / 255, atol=2 / 255, err_msg=name)


def test_lossy_formats_are_close(tmp_path):
    x = np.linspace(0, 1, 32, dtype=np.float32)
    smooth = np.stack([x[None, :].repeat(32, 0), x[:, None].repeat(32, 1), np.full((32, 32), 0.5, np.float32)], -1)
    for name in ("s.jpg", "s.webp"):
        array, info = read_image(write_image(tmp_path / name, smooth, quality=95))
        assert info.format in ("jpeg", "webp")
        assert np.abs(array - smooth).mean() < 0.02, name


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pillow(tmp_path, orientation):
    pixels = random_pixels(6, 10, 3, 8)
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "oriented.png"
    image.save(path, exif=exif)
    array, info = read_image(path)
    with Image.open(path) as reference:
        expected = np.asarray(ImageOps.exif_transpose(reference).convert("RGB"))
    np.testing.assert_array_equal(as_integers(array, 8), expected)
    assert (info.height, info.width) == expected.shape[:2]


def test_exif_orientation_of_a_sixteen_bit_tiff(tmp_path):
    pixels = random_pixels(6, 10, 3, 16)
    path = tmp_path / "rotated.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", extratags=[(274, "H", 1, 6, True)])  # 6: rotate 90 CW
    array, info = read_image(path)
    assert info.bit_depth == 16
    np.testing.assert_array_equal(as_integers(array, 16), np.rot90(pixels, k=-1))


def test_a_png_colour_key_becomes_alpha(tmp_path):
    """A tRNS chunk on an RGB or grey PNG marks one colour transparent: read as RGBA / LA, not dropped."""
    rgb = random_pixels(6, 5, 3, 8)
    key = tuple(int(v) for v in rgb[2, 3])
    Image.fromarray(rgb).save(tmp_path / "keyed.png", transparency=key)
    array, info = read_image(tmp_path / "keyed.png")
    expected_alpha = np.where((rgb == key).all(-1), 0, 255)
    assert info.mode == "RGBA"
    np.testing.assert_array_equal(as_integers(array, 8), np.dstack([rgb, expected_alpha]))

    grey = random_pixels(6, 5, 1, 8)[..., 0]
    Image.fromarray(grey).save(tmp_path / "keyed-grey.png", transparency=int(grey[1, 1]))
    array, info = read_image(tmp_path / "keyed-grey.png")
    assert info.mode == "LA"
    np.testing.assert_array_equal(as_integers(array, 8), np.dstack([grey, np.where(grey == grey[1, 1], 0, 255)]))


def _write_png(path, width, height, bits, color_type, rows, extra_chunks=b""):
    """A PNG with unfiltered rows of raw big-endian samples (Pillow writes no 16-bit colour, nor 16-bit tRNS)."""
    raw = b"".join(b"\x00" + row.astype(">u2" if bits == 16 else np.uint8).tobytes() for row in rows)
    header = imageio._png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bits, color_type, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + extra_chunks + imageio._png_chunk(b"IDAT", zlib.compress(raw))
                     + imageio._png_chunk(b"IEND", b""))


def test_a_sixteen_bit_png_colour_key_becomes_alpha(tmp_path):
    rgb = random_pixels(6, 5, 3, 16)
    key = rgb[2, 3]
    _write_png(tmp_path / "keyed.png", 5, 6, 16, 2, rgb, imageio._png_chunk(b"tRNS", key.astype(">u2").tobytes()))
    array, info = read_image(tmp_path / "keyed.png")
    assert (info.mode, info.bit_depth) == ("RGBA", 16)
    np.testing.assert_array_equal(as_integers(array, 16), np.dstack([rgb, np.where((rgb == key).all(-1), 0, 65535)]))

    grey = random_pixels(6, 5, 1, 16)[..., 0]
    _write_png(tmp_path / "keyed-grey.png", 5, 6, 16, 0, grey,
               imageio._png_chunk(b"tRNS", struct.pack(">H", int(grey[1, 1]))))
    array, info = read_image(tmp_path / "keyed-grey.png")
    assert (info.mode, info.bit_depth) == ("LA", 16)
    np.testing.assert_array_equal(as_integers(array, 16), np.dstack([grey, np.where(grey == grey[1, 1], 0, 65535)]))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_an_animation_or_multi_page_file_is_refused_before_decoding(tmp_path, fmt):
    frames = [Image.fromarray(random_pixels(8, 8, 3, 8)) for _ in range(3)]
    path = tmp_path / f"frames.{fmt.lower()}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:])
    for read in (read_image, check_image_header):
        with pytest.raises(ImageReadError, match="3 frames \\(an animation or a multi-page file\\)"):
            read(path)


def test_the_header_check_refuses_float_pixels_and_gives_the_stored_size(tmp_path):
    Image.fromarray(np.full((6, 9), 0.5, np.float32)).save(tmp_path / "float.tiff")
    for read in (read_image, check_image_header):
        with pytest.raises(ImageReadError, match="float.tiff: floating-point pixels \\(Pillow mode F\\)"):
            read(tmp_path / "float.tiff")
    Image.fromarray(random_pixels(6, 9, 3, 8)).save(tmp_path / "rgb.png")
    assert check_image_header(tmp_path / "rgb.png") == (9, 6)


def test_grey_jpeg_palette_png_and_cmyk_jpeg(tmp_path):
    grey = Image.fromarray(random_pixels(8, 8, 1, 8)[..., 0])
    grey.save(tmp_path / "grey.jpg")
    assert read_image(tmp_path / "grey.jpg")[1].mode == "L"

    palette = Image.fromarray(random_pixels(8, 8, 3, 8)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    array, info = read_image(tmp_path / "palette.png")
    assert info.mode == "RGBA" and array.shape == (8, 8, 4)

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    array, info = read_image(tmp_path / "cmyk.jpg")
    assert info.mode == "RGB"
    assert array[..., 0].mean() > 0.9 and array[..., 1].mean() < 0.1


def _cmyk_profile() -> bytes:
    """A minimal ICC v2 CMYK printer profile: A2B0 a 2-point lut8 from CMYK to Lab, (1 - c)(1 - k) ... mixing."""
    def s15fixed16(value):
        return struct.pack(">i", round(value * 65536))

    grid = []
    for c, m, y, k in np.ndindex(2, 2, 2, 2):
        r, g, b = (1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)
        luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
        lightness = 116 * luminance ** (1 / 3) - 16 if luminance > 0.008856 else 903.3 * luminance
        grid += [round(lightness * 2.55), round(128 + 100 * (r - g)), round(128 + 50 * (g - b))]
    identity = bytes(range(256))
    white = s15fixed16(0.9642) + s15fixed16(1.0) + s15fixed16(0.8249)
    tags = [
        (b"desc", b"desc" + bytes(4) + struct.pack(">I", 5) + b"cmyk\x00" + bytes(78)),
        (b"wtpt", b"XYZ " + bytes(4) + white),
        (b"A2B0", b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + b"".join(s15fixed16(v) for v in np.eye(3).ravel())
         + identity * 4 + bytes(np.clip(grid, 0, 255).astype(np.uint8)) + identity * 3),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        body += bytes(-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (struct.pack(">I", offset + len(data)) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"prtr" + b"CMYK" + b"Lab "
              + bytes(12) + b"acsp" + bytes(24) + bytes(4) + white + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + data


def test_a_cmyk_jpegs_profile_converts_it_and_is_not_kept_for_the_rgb_pixels(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", icc_profile=_cmyk_profile())
    array, info = read_image(tmp_path / "cmyk.jpg")
    assert info.mode == "RGB" and info.icc_profile is None
    assert array[..., 0].mean() > 0.9 and array[..., 1].mean() < 0.1

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "broken.jpg", icc_profile=b"not a profile" * 10)
    _expect_read_error(tmp_path / "broken.jpg", "embedded ICC profile")


def test_a_profile_of_another_colour_space_than_the_pixels_is_dropped(tmp_path):
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(random_pixels(5, 4, 1, 8)[..., 0]).save(tmp_path / "grey.png", icc_profile=srgb)
    Image.fromarray(random_pixels(5, 4, 3, 8)).save(tmp_path / "rgb.png", icc_profile=srgb)
    assert read_image(tmp_path / "grey.png")[1].icc_profile is None
    assert read_image(tmp_path / "rgb.png")[1].icc_profile == srgb


def _expect_read_error(path, *reason_words):
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    message = str(caught.value)
    assert str(path) in message
    for word in reason_words:
        assert word in message, message
    return caught.value


def test_unreadable_inputs_raise_a_clear_error(tmp_path):
    good = write_image(tmp_path / "good.png", random_pixels(64, 64, 3, 8) / 255)
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    _expect_read_error(tmp_path / "truncated.png", "truncated")

    jpeg = write_image(tmp_path / "good.jpg", random_pixels(64, 64, 3, 8) / 255)
    (tmp_path / "truncated.jpg").write_bytes(jpeg.read_bytes()[:300])
    _expect_read_error(tmp_path / "truncated.jpg", "truncated")

    (tmp_path / "text.png").write_text("this is not an image\n")
    _expect_read_error(tmp_path / "text.png", "not a recognised image")
    (tmp_path / "empty.png").write_bytes(b"")
    _expect_read_error(tmp_path / "empty.png", "empty file (0 bytes)")
    _expect_read_error(tmp_path / "missing.png", "no such file")
    (tmp_path / "folder.png").mkdir()
    _expect_read_error(tmp_path / "folder.png", "folder")

    corrupt = bytearray(data)
    corrupt[60:80] = b"\x00" * 20  # damage the compressed pixel data
    (tmp_path / "corrupt.png").write_bytes(bytes(corrupt))
    _expect_read_error(tmp_path / "corrupt.png", "corrupt")

    Image.new("RGB", (4, 4)).save(tmp_path / "image.gif")
    _expect_read_error(tmp_path / "image.gif", "unsupported format GIF")


def _png_header_only(width, height):
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(
        b"IEND", b"")


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    pillow_limit = Image.MAX_IMAGE_PIXELS
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))  # 10 gigapixels, no pixel data at all
    with pytest.raises(ImageTooLargeError) as caught:
        read_image(bomb)
    message = str(caught.value)
    # Pillow's own guard fires first for something this large; the message still names size and option.
    assert str(bomb) in message and "10000 megapixels, over the limit of 64 megapixels" in message
    assert "--max-megapixels" in message and "178956970" not in message  # not Pillow's own limit: one limit named

    over_ours = tmp_path / "over.png"
    over_ours.write_bytes(_png_header_only(10_000, 8_000))  # 80 MP: over our 64 MP default, under Pillow's guard
    with pytest.raises(ImageTooLargeError) as caught:
        read_image(over_ours)
    message = str(caught.value)
    assert "10000x8000 = 80.0 megapixels" in message and "limit of 64 megapixels" in message
    assert "--max-megapixels" in message

    small = write_image(tmp_path / "small.png", random_pixels(100, 100, 3, 8) / 255)  # 0.01 MP
    with pytest.raises(ImageTooLargeError, match="limit of 0.005 megapixels"):
        read_image(small, max_megapixels=0.005)
    assert read_image(small, max_megapixels=0.01)[0].shape == (100, 100, 3)
    # With no limit the header passes our check; there is no data, so it fails as corrupt, not as a bomb.
    with pytest.raises(ImageReadError) as caught:
        read_image(bomb, max_megapixels=None)
    assert not isinstance(caught.value, ImageTooLargeError)
    # ... and Pillow's guard is back for everything else in the process
    assert pillow_limit is not None and Image.MAX_IMAGE_PIXELS == pillow_limit
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb)


def test_existing_output_is_not_overwritten(tmp_path):
    path = tmp_path / "out.png"
    path.write_bytes(b"precious")
    with pytest.raises(OutputExistsError) as caught:
        write_image(path, np.zeros((4, 4, 3), np.float32))
    assert str(path) in str(caught.value) and "overwrite" in str(caught.value)
    assert path.read_bytes() == b"precious"
    write_image(path, np.zeros((4, 4, 3), np.float32), overwrite=True)
    assert read_image(path)[0].shape == (4, 4, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_integer_pixels_are_refused_not_written_as_black_and_white(tmp_path):
    for bits in (8, 16):
        with pytest.raises(TypeError, match=f"float array in \\[0, 1\\], got uint{bits}"):
            write_image(tmp_path / "out.png", random_pixels(4, 5, 3, bits), bit_depth=bits)
    assert list(tmp_path.iterdir()) == []


def test_unknown_output_extension_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="unknown output extension"):
        write_image(tmp_path / "out.xyz", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(imageio.ImageWriteError, match="does not exist"):
        write_image(tmp_path / "no" / "out.png", np.zeros((4, 4, 3), np.float32))


@pytest.mark.parametrize("unnamed", [True, False], ids=["o_tmpfile", "named-temporary"])
def test_a_write_that_fails_midway_leaves_nothing(tmp_path, monkeypatch, unnamed):
    if not unnamed:
        monkeypatch.setattr(imageio, "_open_unnamed", lambda folder: None)

    def failing_save(self, fp, format=None, **options):
        fp.write(b"\x89PNG\r\n\x1a\n partial data")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        write_image(tmp_path / "out.png", np.zeros((8, 8, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_named_temporary_fallback_publishes_atomically(tmp_path, monkeypatch):
    monkeypatch.setattr(imageio, "_open_unnamed", lambda folder: None)
    pixels = random_pixels(5, 7, 3, 8)
    path = write_image(tmp_path / "out.png", pixels / 255)
    np.testing.assert_array_equal(as_integers(read_image(path)[0], 8), pixels)
    with pytest.raises(OutputExistsError):
        write_image(path, pixels / 255)
    write_image(path, pixels / 255, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


_KILL_CHILD = """
import sys, numpy as np
from runtime.imageio import write_image
pixels = np.random.default_rng(0).random((3000, 3000, 3), dtype=np.float32)
print("writing", flush=True)
write_image(sys.argv[1], pixels, bit_depth=16)
print("done", flush=True)
"""


def _open_files_in(pid, folder):
    """Paths (as the kernel shows them) of the files `pid` has open inside `folder`."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # the descriptor closed while we looked
            continue
        if target.startswith(str(folder) + "/"):
            found.append(target)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to kill the writer mid-write")
def test_a_writer_killed_midway_leaves_no_file(tmp_path):
    destination = tmp_path / "big.png"
    child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(destination)], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        deadline = time.monotonic() + 60
        while not _open_files_in(child.pid, tmp_path.resolve()):  # wait until the output file is open and being written
            assert child.poll() is None, "the writer finished before it could be killed; make the image larger"
            assert time.monotonic() < deadline, "the writer never opened its output"
            time.sleep(0.01)
        time.sleep(0.2)
        assert child.poll() is None, "the writer finished before it could be killed; make the image larger"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert not destination.exists()
    leftovers = list(tmp_path.iterdir())
    probe = imageio._open_unnamed(tmp_path)
    if probe is not None:  # O_TMPFILE: not even a temporary is left
        os.close(probe)
        assert leftovers == []
    else:  # named-temporary fallback: only the hidden partial, which a rerun removes
        assert all(p.name.startswith(".big.png.") and p.name.endswith(".partial") for p in leftovers)


@pytest.mark.parametrize("bits", [8, 16])
def test_writing_rounds_to_the_nearest_level_and_clips(tmp_path, bits):
    """Quantisation is round-to-nearest (not truncation, which would darken every image by half a level),
    and values outside [0, 1] saturate instead of wrapping around."""
    top = 255 if bits == 8 else 65535
    values = np.array([0.4, 0.6, 1.49, 1.51, top - 0.6, top - 0.4, -0.25 * top, 1.25 * top, 7.0 * top]) / top
    expected = np.array([0, 1, 1, 2, top - 1, top, 0, top, top])
    array = np.stack([values.reshape(3, 3), values[::-1].reshape(3, 3), values.reshape(3, 3).T], axis=-1)
    wanted = np.stack([expected.reshape(3, 3), expected[::-1].reshape(3, 3), expected.reshape(3, 3).T], axis=-1)
    for dtype in (np.float64, np.float32):
        np.testing.assert_array_equal(imageio.to_integer(array.astype(dtype), bits), wanted, err_msg=str(dtype))
    path = write_image(tmp_path / "levels.png", array.astype(np.float32), bit_depth=bits)
    np.testing.assert_array_equal(as_integers(read_image(path)[0], bits), wanted)


def test_a_sixteen_bit_png_larger_than_one_encoder_step_round_trips(tmp_path):
    """Over 1 MiB of rows: the encoder filters the image in several row bands and writes several IDAT chunks."""
    pixels = random_pixels(197, 2003, 3, 16)  # 2.4 MB of samples: 3 row bands, 3 IDAT chunks
    path = write_image(tmp_path / "large.png", pixels / 65535, bit_depth=16)
    array, info = read_image(path)
    assert (info.mode, info.bit_depth, array.shape) == ("RGB", 16, (197, 2003, 3))
    np.testing.assert_array_equal(as_integers(array, 16), pixels)
    with Image.open(path) as image:  # another decoder accepts it too
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), (pixels >> 8).astype(np.uint8))


def test_the_icc_profile_is_written_where_the_format_holds_one(tmp_path):
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    pixels = random_pixels(7, 5, 3, 16) / 65535
    for name, bits in (("a.png", 8), ("b.png", 16), ("c.tif", 8), ("d.tif", 16), ("e.jpg", 8), ("f.webp", 8)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OutputFormatWarning)
            path = write_image(tmp_path / name, pixels, bit_depth=bits, icc_profile=profile)
        assert read_image(path)[1].icc_profile == profile, name


def test_high_quality_jpeg_keeps_full_resolution_chroma(tmp_path):
    from PIL import JpegImagePlugin

    pixels = random_pixels(12, 20, 3, 8) / 255
    for quality, sampling in ((95, 0), (90, 0), (89, 2), (60, 2)):  # 0: 4:4:4, 2: 4:2:0
        path = write_image(tmp_path / f"q{quality}.jpg", pixels, quality=quality)
        with Image.open(path) as image:
            assert JpegImagePlugin.get_sampling(image) == sampling, quality


def test_sixteen_bit_tiff_alpha_is_written_as_unassociated(tmp_path):
    """Other programs read associated alpha as premultiplied colour; ours is straight."""
    for channels in (2, 4):
        path = write_image(tmp_path / f"alpha{channels}.tif", random_pixels(5, 6, channels, 16) / 65535, bit_depth=16)
        with tifffile.TiffFile(path) as tif:
            assert tuple(tif.pages.first.extrasamples) == (tifffile.EXTRASAMPLE.UNASSALPHA,), channels


def test_sixteen_bit_tiff_with_associated_alpha_is_unpremultiplied_like_eight_bit(tmp_path):
    straight = random_pixels(5, 7, 4, 16)
    straight[..., 3] = np.linspace(20000, 65535, 7, dtype=np.uint16)[None, :]
    alpha = straight[..., 3:].astype(np.float64) / 65535
    premultiplied = straight.copy()
    premultiplied[..., :3] = np.rint(straight[..., :3] * alpha).astype(np.uint16)
    path = tmp_path / "premultiplied.tif"
    tifffile.imwrite(path, premultiplied, photometric="rgb", extrasamples=["assocalpha"])
    array, info = read_image(path)
    assert (info.mode, info.bit_depth) == ("RGBA", 16)
    np.testing.assert_allclose(array[..., :3], straight[..., :3] / 65535, atol=1 / 20000)


def test_thirty_two_bit_integer_grey_is_read_as_sixteen_bit_or_refused(tmp_path):
    tifffile.imwrite(tmp_path / "in_range.tif", np.array([[0, 7, 300], [5, 40000, 65535]], np.int32))
    array, info = read_image(tmp_path / "in_range.tif")
    assert (info.mode, info.bit_depth) == ("L", 16)
    np.testing.assert_array_equal(as_integers(array, 16)[..., 0], [[0, 7, 300], [5, 40000, 65535]])
    tifffile.imwrite(tmp_path / "wide.tif", np.array([[0, 70000, 3], [5, 6, 7]], np.int32))
    _expect_read_error(tmp_path / "wide.tif", "outside 0..65535", "range 0..70000")
    tifffile.imwrite(tmp_path / "negative.tif", np.array([[0, -1, 3], [5, 6, 7]], np.int32))
    _expect_read_error(tmp_path / "negative.tif", "outside 0..65535")


@pytest.mark.parametrize("unnamed", [True, False], ids=["o_tmpfile", "named-temporary"])
def test_a_file_that_appears_during_the_write_is_not_replaced(tmp_path, monkeypatch, unnamed):
    """The early exists() check can race with another writer (another job with the same output): the final
    no-clobber link must refuse, keep the other file and leave no temporary."""
    if not unnamed:
        monkeypatch.setattr(imageio, "_open_unnamed", lambda folder: None)
    path = tmp_path / "out.png"
    real_encode = imageio._encode

    def encode_while_another_writer_finishes(stream, *args):
        real_encode(stream, *args)
        path.write_bytes(b"the other writer's image")

    monkeypatch.setattr(imageio, "_encode", encode_while_another_writer_finishes)
    with pytest.raises(OutputExistsError):
        write_image(path, np.zeros((4, 6, 3), np.float32))
    assert path.read_bytes() == b"the other writer's image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


@pytest.mark.parametrize("unnamed", [True, False], ids=["o_tmpfile", "named-temporary"])
@pytest.mark.parametrize("umask", [0o077, 0o002], ids=["umask-077", "umask-002"])
def test_an_image_gets_the_mode_the_umask_gives_a_new_file(tmp_path, monkeypatch, unnamed, umask):
    """The named temporary had a fixed 0644: readable by everyone under umask 077, not group-writable under 002."""
    if not unnamed:
        monkeypatch.setattr(imageio, "_open_unnamed", lambda folder: None)
    previous = os.umask(umask)
    try:
        write_image(tmp_path / "out.png", np.zeros((4, 6, 3), np.float32))
    finally:
        os.umask(previous)
    assert (tmp_path / "out.png").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("name,channels,bits", [
    ("grey.png", 1, 8), ("rgb.png", 3, 8), ("grey16.png", 1, 16), ("rgba16.png", 4, 16), ("rgb.jpg", 3, 8),
    ("rgb.tif", 3, 8), ("grey16.tif", 1, 16), ("rgba16.tif", 4, 16), ("rgb.bmp", 3, 8), ("rgba.webp", 4, 8),
])
def test_the_physical_resolution_is_written_and_read_back_in_every_format(tmp_path, name, channels, bits):
    pixels = random_pixels(5, 6, channels, bits) / (255 if bits == 8 else 65535)
    stated = write_image(tmp_path / name, pixels, bit_depth=bits, dpi=(288.0, 144.0))
    np.testing.assert_allclose(read_image(stated)[1].dpi, (288.0, 144.0), rtol=1e-4)
    unstated = write_image(tmp_path / f"none-{name}", pixels, bit_depth=bits)
    assert read_image(unstated)[1].dpi is None


def test_the_resolution_is_what_the_file_states_not_what_pillow_assumes(tmp_path):
    pixels = random_pixels(5, 6, 3, 8)
    exif = Image.Exif()
    exif[0x0112] = 1  # EXIF without a resolution: Pillow reports 72 dpi
    Image.fromarray(pixels).save(tmp_path / "exif.jpg", exif=exif)
    Image.fromarray(pixels).save(tmp_path / "bare.tif")  # no resolution tags: Pillow reports 1 dpi
    Image.fromarray(pixels).save(tmp_path / "ratio.tif", resolution=2, resolution_unit=1)  # 1: an aspect ratio only
    Image.fromarray(pixels).save(tmp_path / "cm.tif", resolution=100, resolution_unit=3)
    exif_cm = Image.Exif()
    exif_cm[0x011A], exif_cm[0x011B], exif_cm[0x0128] = 40, 20, 3
    Image.fromarray(pixels).save(tmp_path / "exif_cm.jpg", exif=exif_cm)
    tifffile.imwrite(tmp_path / "deep.tif", random_pixels(5, 6, 3, 16), photometric="rgb", resolution=(30, 60),
                     resolutionunit="CENTIMETER")
    dpi = {path.name: read_image(path)[1].dpi for path in sorted(tmp_path.iterdir())}
    assert {name: value for name, value in dpi.items() if value is None} == dict.fromkeys(
        ["bare.tif", "exif.jpg", "ratio.tif"])
    np.testing.assert_allclose([dpi["cm.tif"], dpi["exif_cm.jpg"], dpi["deep.tif"]],
                               [(254, 254), (101.6, 50.8), (76.2, 152.4)])


def test_a_quarter_turn_orientation_swaps_the_resolution(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(random_pixels(5, 6, 3, 8)).save(tmp_path / "turned.png", exif=exif, dpi=(300, 100))
    array, info = read_image(tmp_path / "turned.png")
    assert array.shape[:2] == (6, 5)
    np.testing.assert_allclose(info.dpi, (100, 300), rtol=1e-4)


def test_a_resolution_jpeg_cannot_hold_is_not_written_and_says_so(tmp_path):
    with pytest.warns(OutputFormatWarning, match="JPEG holds at most 65535 pixels per inch; the resolution "
                                                 "70000x300 dpi is not written"):
        path = write_image(tmp_path / "fine.jpg", random_pixels(5, 6, 3, 8) / 255, dpi=(70000, 300))
    assert read_image(path)[1].dpi is None  # not 70000 modulo 65536


@pytest.mark.parametrize("name,bits,largest", [("scan.png", 8, "109092110"), ("scan16.png", 16, "109092110"),
                                               ("scan.bmp", 8, "109092110"), ("scan16.tif", 16, "4294967295")])
def test_a_resolution_past_the_formats_field_is_not_written_and_says_so(tmp_path, name, bits, largest):
    """PNG pHYs and the BMP header hold 32-bit pixels per metre: a 30-million-dpi PNG (a 0.85 nm pixel, which the
    field holds) upscaled x4 made the encoder raise OverflowError, and the upscale command stop with a traceback."""
    pixels = random_pixels(5, 6, 3, bits) / (255 if bits == 8 else 65535)
    with pytest.warns(OutputFormatWarning, match=f"holds at most {largest} pixels per inch; the resolution "
                                                 "2e\\+10x1.2e\\+08 dpi is not written"):
        path = write_image(tmp_path / name, pixels, bit_depth=bits, dpi=(2e10, 1.2e8))
    assert read_image(path)[1].dpi is None
    near = write_image(tmp_path / f"near-{name}", pixels, bit_depth=bits, dpi=(1.09e8, 1.09e8))
    np.testing.assert_allclose(read_image(near)[1].dpi, (1.09e8, 1.09e8), rtol=1e-6)
