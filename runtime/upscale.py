"""Upscale images with GuideSR: the Python API and the command line.

    python -m runtime.upscale photo.jpg -o photo_x4.png
    python -m runtime.upscale photos/ --recursive -o out/ --format webp --tile 512 --overlap 64
    python -m runtime.upscale photo.jpg -o out.png --backend onnxruntime --validate   # checked against PyTorch fp32
    torchrun --nproc_per_node 4 -m runtime.upscale photos/ -o out/        # files split between ranks

Python:

    import runtime
    sr = runtime.upscale("photo.jpg")                 # float32 [H*4, W*4, C] in [0, 1]
    sr = runtime.upscale(array, backend=my_backend, tile=256, overlap=32)

(`runtime.upscale` is this module, made callable: calling it calls `upscale()` below, while
`python -m runtime.upscale` stays the command line.)

Per image: the colour channels go through the model in overlapping tiles at output resolution
(see runtime/tiling.py), each tile bicubic-upsampled from the LR image; grey images are run as
RGB and turned back to grey (BT.601 luma); alpha is upsampled separately by bicubic and put back.

Batch rules: an output that exists is skipped unless --overwrite (so rerunning a crashed or
sharded job finishes only what is missing); an unreadable input, a failed write, a model output
with NaN/Inf or (with --validate) an output further from the PyTorch fp32 reference than
--min-psnr allows is reported with the file's name, nothing is written for it, and the rest go
on. Exit status: 0 when every image was written or skipped, 1 when any failed, 2 when the command
could not run (bad options, no input images, no model, no backend), 130 when Ctrl-C stopped it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .cli import EXIT_INTERRUPTED, bounded_float, bounded_int, output_folder_problem, plural
from .backends import Backend, BackendError, available_backends, create_backend, resolve_device
from .imageio import (
    DEFAULT_MAX_MEGAPIXELS,
    FORMAT_EXTENSION,
    IMAGE_EXTENSIONS,
    WRITE_FORMATS,
    ImageReadError,
    ImageWriteError,
    OutputFormatWarning,
    check_image_header,
    pillow_pixels,
    read_image,
    stale_partial_files,
    upright,
    write_image,
)
from .sharding import Shard, ShardingError, device_for_shard, shard_from_env, shard_items
from .tiling import BicubicSource, NonFiniteOutputError, TileBatch, fit_to_shape, plan_tiles, run_tiled
from .validate import DEFAULT_MIN_PSNR, ReferenceBackend, ValidationError, Validator

DEFAULT_TILE = 512  # output pixels
DEFAULT_OVERLAP = 64  # output pixels
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # BT.601, as Pillow's convert("L")


# ----------------------------------------------------------------------------------------- the API


def load_model(checkpoint: str | None = None, preset: str | None = None, base_model: str | None = None):
    """`guidesr.load_model` (the embedded demo model when no checkpoint is named), imported when first needed:
    guidesr imports diffusers and peft, which take seconds."""
    import guidesr

    return guidesr.load_model(checkpoint=checkpoint, preset=preset, base_model=base_model)


def effective_tile(backend: Backend, tile: int | None) -> tuple[int, int] | None:
    """The tile (h, w) the plan uses: a static backend's own shape, else `tile` rounded down to the model's size
    multiple (a tile the model would pad internally wastes work); None/0: whole image."""
    if backend.tile_shape is not None:
        return tuple(backend.tile_shape)
    if not tile:
        return None
    multiple = getattr(backend.descriptor, "size_multiple", 1) or 1
    return (max(multiple, tile // multiple * multiple),) * 2


def checked_tile(backend: Backend, tile: int | None, overlap: int) -> tuple[int, int] | None:
    """`effective_tile`, refused (ValueError) when `overlap` does not suit it (`overlap_problem`): for runs that ask
    for tiles, checked once before any image."""
    shape = effective_tile(backend, tile)
    problem = overlap_problem(overlap, shape, f"the tile actually used, {shape[0]}x{shape[1]}") if shape else None
    if problem is not None:
        raise ValueError(problem)
    return shape


def upscale_array(
    image: np.ndarray,
    backend: Backend,
    scale: int | None = None,
    tile: int | None = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    tile_batch: int = 1,
    on_batch: Callable[[TileBatch], None] | None = None,
    validator: Validator | None = None,
) -> np.ndarray:
    """[h, w, C] float32 in [0, 1] (C: 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA) -> [h*s, w*s, C].

    An overlap that does not suit the tile actually used is refused with the command line's ValueError
    (`checked_tile`). With a `validator`, its reference runs on the same tiles and the colour result is checked
    against it (ValidationError below its threshold).
    """
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an [H, W, C] image with C in 1..4, got shape {image.shape}")
    problem = _value_problem(image)
    if problem is not None:
        raise ValueError(problem)
    if scale is None:
        scale = getattr(backend.descriptor, "scale", None)
        if scale is None:
            raise ValueError("scale not given and the backend's model does not say its scale")
    channels = image.shape[2]
    has_alpha = channels in (2, 4)
    color = image[..., : channels - 1] if has_alpha else image
    grey = color.shape[2] == 1

    low_res = torch.from_numpy(np.array(color.transpose(2, 0, 1), np.float32, order="C"))  # copied: may be read-only
    if grey:
        low_res = low_res.expand(3, -1, -1)
    low_res = low_res * 2 - 1  # the model's [-1, 1]
    source = BicubicSource(low_res, scale)
    plan = plan_tiles(source.height, source.width, checked_tile(backend, tile, overlap), overlap)
    functions = [backend] if validator is None else [backend, validator.reference]
    if backend.tile_shape is not None:  # the reference gets the very tiles the backend gets, padded alike
        functions = [fit_to_shape(function, backend.tile_shape) for function in functions]
    batch = min(tile_batch, backend.max_batch) if backend.max_batch else tile_batch
    outputs = run_tiled(source, plan, functions, tile_batch=batch, on_batch=on_batch)
    result = _to_unit_range(outputs[0])
    if validator is not None:
        validator.check(result, _to_unit_range(outputs[1]))
    del outputs  # the reference's image, when there is one, is not needed any more
    if grey:
        result = (result @ LUMA)[..., None]
    if not has_alpha:
        return result
    out = np.empty(result.shape[:2] + (channels,), np.float32)
    out[..., :-1] = result
    del result
    out[..., -1] = _upsample_alpha(image[..., -1], scale)
    return out


def _value_problem(image: np.ndarray) -> str | None:
    """Why the pixels of a float image in [0, 1] cannot be upscaled, or None. Values up to one 8-bit step outside
    [0, 1] (rounding in the caller's processing) are clipped; further out, the caller's scale is wrong."""
    if image.size == 0:
        return f"the image is empty (shape {image.shape})"
    bad = int(np.count_nonzero(~np.isfinite(image)))
    if bad:
        return f"the image has {bad} NaN/Inf values; a float image holds finite values in [0, 1]"
    low, high = float(image.min()), float(image.max())
    if low < -1 / 255 or high > 1 + 1 / 255:
        hint = " (values in 0..255? divide by 255, or pass uint8)" if high > 2 else ""
        return f"a float image holds values in [0, 1]; this one ranges over {low:g}..{high:g}{hint}"
    return None


def _to_unit_range(image: np.ndarray) -> np.ndarray:
    """In place: the model's [-1, 1] -> [0, 1], clipped."""
    image += 1
    image *= 0.5
    return np.clip(image, 0.0, 1.0, out=image)


def _upsample_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(alpha, dtype=np.float32))[None, None]
    up = F.interpolate(tensor, scale_factor=scale, mode="bicubic", align_corners=False)
    return up[0, 0].clamp_(0.0, 1.0).numpy()


def _as_float_image(image) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)[0]
    if isinstance(image, Image.Image):
        image = upright(np.asarray(image)[..., None], image) if image.mode == "F" else pillow_pixels(image)
    array = np.asarray(image)
    if array.dtype.kind == "u" and array.dtype.itemsize == 1:
        return array.astype(np.float32) / 255
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:
        return array.astype(np.float32) / 65535
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    raise TypeError(f"unsupported image dtype {array.dtype}: use uint8, uint16 or float in [0, 1]")


def upscale(
    image,
    model=None,
    backend: str | Backend = "auto",
    scale: int | None = None,
    tile: int | None = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    tile_batch: int = 1,
    device: str | None = None,
    precision: str | None = None,
) -> np.ndarray:
    """Upscale one image: a path, a PIL image or an [H, W] / [H, W, C] array (uint8, uint16 or float in [0, 1]).

    A file's EXIF orientation is applied, and so is a PIL image's: `upscale(Image.open(path))` gives what
    `upscale(path)` gives (an image from `ImageOps.exif_transpose` has no orientation tag left, so it is not
    turned twice).

    Returns float32 [H*scale, W*scale, C] in [0, 1]. `backend` is a `Backend` or a name
    ('auto', 'torch', ...) built around `model` (default: `guidesr.load_default_model()`) for
    this call only; on a GPU 'auto' means compiling the model, so for several images build the
    backend once (`runtime.backends.create_backend`) and pass it.
    """
    array = _as_float_image(image)
    if not isinstance(backend, Backend):
        backend, _ = create_backend(backend, model if model is not None else load_model(), device, precision,
                                    tile=tile, tile_batch=tile_batch)
    return upscale_array(array, backend, scale=scale, tile=tile, overlap=overlap, tile_batch=tile_batch)


def upscale_file(source: str | os.PathLike, destination: str | os.PathLike, backend: Backend, *,
                 scale: int | None = None, tile: int | None = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                 tile_batch: int = 1, overwrite: bool = False, quality: int = 95,
                 max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
                 on_batch: Callable[[TileBatch], None] | None = None,
                 validator: Validator | None = None) -> Path:
    """Read, upscale, write atomically (16 bits and alpha kept where the output format allows; the ICC profile and
    the physical print size too: the output's pixels per inch are the input's times the scale).

    A `destination` that is the source file itself (another spelling, a link) is refused with ImageWriteError, even
    with `overwrite`. With a `validator`, an output that fails validation raises ValidationError and is not written.
    """
    if same_file(source, destination):
        raise ImageWriteError(destination, f"it is the input {source} itself; the input is never replaced, even with "
                                           f"overwrite")
    array, info = read_image(source, max_megapixels=max_megapixels)
    try:
        result = upscale_array(array, backend, scale=scale, tile=tile, overlap=overlap, tile_batch=tile_batch,
                               on_batch=on_batch, validator=validator)
    except NonFiniteOutputError as err:  # name the file
        raise NonFiniteOutputError(err.function_index, err.boxes, path=str(source)) from None
    except ValidationError as err:
        raise ValidationError(err.report, path=str(source)) from None
    dpi = None if info.dpi is None else (info.dpi[0] * result.shape[1] / info.width,
                                         info.dpi[1] * result.shape[0] / info.height)
    return write_image(destination, result, bit_depth=info.bit_depth, overwrite=overwrite, quality=quality,
                       icc_profile=info.icc_profile, dpi=dpi)


# ------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Job:
    source: Path
    output: Path


@dataclass
class JobList:
    jobs: list[Job]
    failures: list[str]  # inputs that cannot become a job, already described
    ignored: list[Path] = field(default_factory=list)  # files in input folders without an image extension


EXIT_FAILED_IMAGES = 1
EXIT_CANNOT_RUN = 2  # argparse's status for usage errors too


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether `a` and `b` name one existing file, however spelled: relative or absolute, through a symbolic link,
    a hard link, or in another case on a case-insensitive filesystem."""
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def _file_identity(path: Path) -> tuple[int, int]:
    """(device, inode): what `same_file` compares, as a key."""
    status = path.stat()
    return status.st_dev, status.st_ino


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _scan_folder(folder: Path, recursive: bool, exclude: Path | None) -> tuple[list[Path], list[Path]]:
    """(images, other files) in `folder`."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    found, ignored = [], []
    for path in candidates:
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue  # hidden files and folders, including our own *.partial temporaries
        if exclude is not None and _is_inside(path, exclude):
            continue  # never pick up our own outputs when OUT is inside IN
        if path.is_file():
            (found if path.suffix.lower() in IMAGE_EXTENSIONS else ignored).append(path)
    return sorted(found), sorted(ignored)


def collect_jobs(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, recursive: bool = False,
                 fmt: str | None = None) -> JobList:
    """Map inputs (files and folders) to output paths. OUT is a file when there is one input file and
    OUT has an image extension and no trailing slash; otherwise OUT is a folder and outputs get `fmt`'s extension
    (png)."""
    folder_named = str(output).endswith((os.sep, "/"))
    output = Path(output)
    input_paths = [Path(p) for p in inputs]
    single_file_output = output.suffix.lower() in WRITE_FORMATS and not output.is_dir() and not folder_named
    if single_file_output:
        if fmt is not None:
            raise ValueError("--format is for a folder OUT; with a file OUT the format comes from its extension")
        if len(input_paths) != 1 or input_paths[0].is_dir():
            raise ValueError(f"-o {output} is a file name, but the input is not a single file; "
                             f"give a folder to -o for several images")
        if same_file(output, input_paths[0]):
            raise ValueError(f"-o {output} is the input itself; the input is never replaced, even with --overwrite")
        return JobList([Job(input_paths[0], output)], [])
    if output.exists() and not output.is_dir():
        raise ValueError(f"-o {output} exists and is not a folder")
    if output.suffix and not output.exists() and not folder_named:
        raise ValueError(f"-o {output}: {output.suffix} is not an output format ({', '.join(sorted(WRITE_FORMATS))}); "
                         f"for an output folder, give a name without an extension or create the folder first")
    fmt = (fmt or "png").lower()
    if fmt not in FORMAT_EXTENSION:
        raise ValueError(f"--format {fmt!r}: choose one of {sorted(set(FORMAT_EXTENSION))}")
    extension = FORMAT_EXTENSION[fmt]
    jobs: list[Job] = []
    failures: list[str] = []
    ignored: list[Path] = []
    for path in input_paths:
        if path.is_dir():
            images, others = _scan_folder(path, recursive, output)
            ignored.extend(others)
            for found in images:
                jobs.append(Job(found, output / found.relative_to(path).with_suffix(extension)))
        elif path.exists():
            jobs.append(Job(path, output / (path.stem + extension)))
        else:
            failures.append(f"{path}: no such file or folder")
    # One file reached twice (a.png and ./a.png or its absolute path, a folder and a file in it, a linked folder)
    # is one job when both ways lead to the same output.
    distinct: dict[tuple[tuple[int, int], Path], Job] = {}
    for job in sorted(jobs, key=lambda j: str(j.source)):
        distinct.setdefault((_file_identity(job.source), job.output), job)
    sources = {identity for identity, _ in distinct}
    by_output: dict[Path, list[Job]] = {}
    for job in distinct.values():
        if job.output.exists() and _file_identity(job.output) in sources:
            failures.append(f"{job.source}: its output {job.output} is an input; the input is never replaced, "
                            f"even with --overwrite (give another -o or --format)")
            continue
        by_output.setdefault(job.output, []).append(job)
    unique = []
    for destination, group in by_output.items():
        unique.append(group[0])
        for other in group[1:]:
            failures.append(f"{other.source}: its output {destination} is also the output of {group[0].source}; "
                            f"rename one of them")
    return JobList(sorted(unique, key=lambda j: str(j.source)), failures, ignored)


# -------------------------------------------------------------------------------------------- CLI


def _say(message: str, error: bool = False) -> None:
    """A line to stdout (stderr for errors) that does not break the progress bars, flushed at once
    (under torchrun stdout is a pipe, and a killed rank must not lose what it already reported)."""
    stream = sys.stderr if error else sys.stdout
    tqdm.write(message, file=stream)
    stream.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.upscale",
        description="Upscale images with GuideSR (one-step diffusion super-resolution).",
        epilog="Exit status: 0 all written or skipped, 1 some images failed (or failed --validate), "
               "2 the command could not run (bad options, no input images, no model or backend), 130 interrupted "
               "(Ctrl-C; what was written is complete, and the same command finishes the rest).",
    )
    parser.add_argument("inputs", nargs="+", metavar="IN", help="image files and/or folders")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output file (one input file, format from the extension) or folder")
    parser.add_argument("--recursive", action="store_true", help="include images in subfolders (kept as subfolders)")
    parser.add_argument("--format", choices=sorted(set(FORMAT_EXTENSION)), default=None,
                        help="output format when OUT is a folder (default png)")
    parser.add_argument("--scale", type=bounded_int(1), default=None, help="upscaling factor (default: the model's, 4)")
    parser.add_argument("--tile", type=bounded_int(0), default=DEFAULT_TILE,
                        help=f"tile size in output pixels, 0 for the whole image (default {DEFAULT_TILE})")
    parser.add_argument("--overlap", type=bounded_int(0), default=DEFAULT_OVERLAP,
                        help=f"tile overlap in output pixels (default {DEFAULT_OVERLAP})")
    parser.add_argument("--tile-batch", type=bounded_int(1), default=1, help="tiles per model call (default 1)")
    parser.add_argument("--backend", default="auto", choices=["auto", *available_backends()],
                        help="inference backend (default auto: the fastest available; it uses onnxruntime / "
                             "tensorrt only when --onnx / --engine is given)")
    parser.add_argument("--onnx", default=None, metavar="GRAPH.onnx",
                        help="onnxruntime: a graph from `python -m export onnx` (default: export one for --tile and "
                             "--tile-batch and cache it)")
    parser.add_argument("--onnx-cache", default=None, metavar="DIR",
                        help="onnxruntime: where graphs it exports are cached (default ~/.cache/guidesr/onnx)")
    parser.add_argument("--autotune", action="store_true",
                        help="compiled: torch.compile mode max-autotune-no-cudagraphs (minutes of autotuning for "
                             "sd-turbo, once per tile shape) instead of the default mode")
    parser.add_argument("--engine", default=None, metavar="NAME.engine",
                        help="tensorrt: an engine from `python -m export engine` (NAME.engine.json next to it)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16"],
                        help="default auto: fp16 on CUDA when the model supports it, else fp32")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    parser.add_argument("--checkpoint", default=None,
                        help="GuideSR checkpoint (NAME.json; default: the embedded demo model, tiny preset)")
    parser.add_argument("--preset", default=None, help="model preset (tiny, sd-turbo)")
    parser.add_argument("--base-model", default=None, help="diffusers-format base model folder")
    parser.add_argument("--jpeg-quality", type=bounded_int(1, 100), default=95,
                        help="JPEG and WebP quality, 1-100 (default 95)")
    parser.add_argument("--validate", action="store_true",
                        help="also run the PyTorch fp32 reference on the same tiles, report PSNR / SSIM / max-abs "
                             "per image, and fail (write nothing) below --min-psnr")
    parser.add_argument("--min-psnr", type=bounded_float(0), default=None, metavar="DB",
                        help=f"--validate threshold (default {DEFAULT_MIN_PSNR['fp16']:g} dB for fp16 backends, "
                             f"{DEFAULT_MIN_PSNR['fp32']:g} dB for fp32 ones)")
    parser.add_argument("--max-megapixels", type=bounded_float(0), default=DEFAULT_MAX_MEGAPIXELS,
                        help=f"refuse inputs larger than this (decompression-bomb guard, default "
                             f"{DEFAULT_MAX_MEGAPIXELS:g}); 0 for no limit")
    return parser


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    problem = overlap_problem(args.overlap, (args.tile, args.tile), f"--tile {args.tile}") if args.tile else None
    if problem is not None:
        parser.error(problem)
    if args.min_psnr is not None and not args.validate:
        parser.error("--min-psnr is the --validate threshold; add --validate")


def overlap_problem(overlap: int, shape: tuple[int, int], tile_name: str) -> str | None:
    """Why tiles of `shape` (named `tile_name` in the message) cannot overlap by `overlap`, or None: the overlap must
    be smaller than the tile and compute no output pixel more than 16 times."""
    if overlap >= min(shape):
        return f"--overlap {overlap} must be smaller than {tile_name}"
    recomputed = math.prod(side / (side - overlap) for side in shape)
    if recomputed > 16:
        return (f"--overlap {overlap} with {tile_name} computes every output pixel about {recomputed:.0f} times; "
                f"keep the overlap under 3/4 of the tile")
    return None


def _remove_stale_partials(output: Path) -> None:
    """Where O_TMPFILE is unavailable a killed writer leaves .NAME.*.partial; this rank owns NAME."""
    for stale in stale_partial_files(output):
        stale.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_options(parser, args)
    try:
        shard = shard_from_env()
        job_list = collect_jobs(args.inputs, args.output, args.recursive, args.format)
    except (ValueError, ShardingError) as err:
        _say(f"error: {err}", error=True)
        return EXIT_CANNOT_RUN
    if not job_list.jobs and not job_list.failures:
        _say(f"error: no images in {', '.join(args.inputs)} (image files: {', '.join(sorted(IMAGE_EXTENSIONS))}"
             f"{'; subfolders need --recursive' if not args.recursive else ''}; files inside -o are never inputs)",
             error=True)
        return EXIT_CANNOT_RUN
    prefix = shard.label
    if job_list.ignored and shard.rank == 0:
        examples = ", ".join(path.name for path in job_list.ignored[:3])
        more = f" and {len(job_list.ignored) - 3} more" if len(job_list.ignored) > 3 else ""
        _say(f"note: {plural(len(job_list.ignored), 'file')} without an image extension left alone: {examples}{more}")
    # Failures and jobs are split the same way, so each problem is reported by exactly one rank.
    failures = shard_items(job_list.failures, shard)
    for failure in failures:
        _say(f"{prefix}error: {failure}", error=True)
    jobs = shard_items(job_list.jobs, shard)

    todo = []
    skipped = 0
    folder_problems: dict[Path, str | None] = {}
    for job in jobs:
        _remove_stale_partials(job.output)
        if job.output.exists() and not args.overwrite:
            _say(f"{prefix}skip: {job.output} exists (use --overwrite to replace it)")
            skipped += 1
            continue
        # before the model loads (minutes for sd-turbo), so a bad file or output folder is reported at once
        if job.output.parent not in folder_problems:
            folder_problems[job.output.parent] = output_folder_problem(job.output.parent)
        if folder_problems[job.output.parent] is not None:
            failures.append(f"{job.source}: cannot write {job.output}: {folder_problems[job.output.parent]}")
            _say(f"{prefix}error: {failures[-1]}", error=True)
            continue
        try:
            check_image_header(job.source, args.max_megapixels or None)
        except ImageReadError as err:
            failures.append(str(err))
            _say(f"{prefix}error: {err}", error=True)
        else:
            todo.append(job)

    written = 0
    if todo:
        try:
            try:
                backend, validator = _make_backend(args, shard)
            except (BackendError, ShardingError, ValueError, OSError) as err:
                _say(f"{prefix}error: {err}", error=True)
                return EXIT_CANNOT_RUN
            written, failed = _run_jobs(todo, backend, validator, args, shard)
        except KeyboardInterrupt:
            _say(f"{prefix}interrupted: the outputs written so far are complete; the same command again skips them "
                 f"and does the rest", error=True)
            return EXIT_INTERRUPTED
        failures.extend(failed)
    _say(f"{prefix}{written} written, {skipped} skipped (already there), {len(failures)} failed")
    return EXIT_FAILED_IMAGES if failures else 0


def _make_backend(args: argparse.Namespace, shard: Shard) -> tuple[Backend, Validator | None]:
    device = device_for_shard(resolve_device(args.device), shard)
    model = load_model(args.checkpoint, args.preset, args.base_model)
    backend, why = create_backend(args.backend, model, str(device), args.precision, tile=args.tile,
                                  tile_batch=args.tile_batch, onnx=args.onnx, engine=args.engine,
                                  onnx_cache=args.onnx_cache, autotune=args.autotune)
    _say(f"{shard.label}{why}")
    model_scale = getattr(backend.descriptor, "scale", None)
    if args.scale is not None and model_scale is not None and args.scale != model_scale:
        _say(f"{shard.label}note: --scale {args.scale} on a model trained for x{model_scale}")
    shape = checked_tile(backend, args.tile, args.overlap)
    if args.tile and shape != (args.tile, args.tile):
        _say(f"{shard.label}note: tile {args.tile} -> {shape[0]}x{shape[1]} (the model's size multiple or the "
             f"backend's shape)")
    if not args.validate:
        return backend, None
    min_psnr = args.min_psnr if args.min_psnr is not None else DEFAULT_MIN_PSNR[backend.precision]
    reference = ReferenceBackend(model, backend.device)
    _say(f"{shard.label}validating every image against {reference.describe()}, on the same tiles: PSNR at "
         f"least {min_psnr:g} dB")
    return backend, Validator(reference, min_psnr)


def _run_jobs(jobs: list[Job], backend: Backend, validator: Validator | None, args: argparse.Namespace,
              shard: Shard) -> tuple[int, list[str]]:
    prefix = shard.label
    failures: list[str] = []
    written = 0
    max_megapixels = args.max_megapixels or None
    with tqdm(total=len(jobs), unit="image", desc=f"{prefix}images", disable=None, position=0) as images_bar:
        for job in jobs:
            started = time.perf_counter()
            with tqdm(unit="tile", desc=job.source.name, leave=False, disable=None, position=1) as tiles_bar, \
                    warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", OutputFormatWarning)
                try:
                    job.output.parent.mkdir(parents=True, exist_ok=True)
                    upscale_file(
                        job.source, job.output, backend, scale=args.scale, tile=args.tile, overlap=args.overlap,
                        tile_batch=args.tile_batch, overwrite=args.overwrite, quality=args.jpeg_quality,
                        max_megapixels=max_megapixels, on_batch=lambda batch: _advance(tiles_bar, batch),
                        validator=validator,
                    )
                except (ImageReadError, ImageWriteError) as err:
                    failures.append(str(err))
                    _say(f"{prefix}error: {err}", error=True)
                except NonFiniteOutputError as err:
                    failures.append(str(err))
                    _say(f"{prefix}error: the model output has NaN/Inf, nothing written: {err}", error=True)
                except ValidationError as err:
                    failures.append(str(err))
                    _say(f"{prefix}error: {err}; nothing written", error=True)
                except torch.OutOfMemoryError as err:
                    failures.append(f"{job.source}: out of memory")
                    _say(f"{prefix}error: {job.source}: out of memory ({err}); try a smaller --tile or --tile-batch",
                         error=True)
                except MemoryError:
                    failures.append(f"{job.source}: out of host memory")
                    _say(f"{prefix}error: {job.source}: out of host memory; the output alone needs ~12 bytes per "
                         f"output pixel (lower --max-megapixels to refuse such inputs up front)", error=True)
                except OSError as err:  # e.g. the disk is full or the folder is not writable
                    failures.append(f"{job.source}: {err}")
                    _say(f"{prefix}error: {job.source}: cannot write {job.output}: {err}", error=True)
                else:
                    written += 1
                    checked = f"; validation {validator.reports[-1].describe()}" if validator is not None else ""
                    _say(f"{prefix}wrote {job.output} ({time.perf_counter() - started:.1f} s){checked}")
                    for warning in caught:
                        if issubclass(warning.category, OutputFormatWarning):
                            _say(f"{prefix}note: {warning.message}")
            for warning in caught:  # the others as Python would have shown them
                if not issubclass(warning.category, OutputFormatWarning):
                    warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
            images_bar.update(1)
    return written, failures


def _advance(bar: tqdm, batch: TileBatch) -> None:
    if bar.total != batch.total_tiles:
        bar.total = batch.total_tiles
        bar.refresh()
    bar.update(len(batch.boxes))


class _CallableModule(types.ModuleType):
    """Makes `runtime.upscale(image, ...)` call `upscale()` while `runtime.upscale` stays this module."""

    def __call__(self, *args, **kwargs):
        return upscale(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
