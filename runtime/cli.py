"""Command-line helpers shared by guidesr, export, kernels and runtime: argparse types for bounded numbers, the model
arguments of the measuring commands, the check that an output folder (or file) can be made where a command line puts
it, the atomic write of a command's JSON results, the Ctrl-C exit status, and `plural` for counts in messages
("1 image", "2 images").
Standard library only: runtime.gpu_session uses it before the wheels it installs (diffusers among them) are there."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path


def bounded_int(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum` (and <= `maximum` when given)."""
    return _bounded(int, "an integer", minimum, maximum, exclusive_minimum=False)


def bounded_float(minimum: float, maximum: float | None = None, *,
                  exclusive_minimum: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number >= `minimum` (> `minimum` with `exclusive_minimum`), and <= `maximum` when
    given."""
    return _bounded(float, "a number", minimum, maximum, exclusive_minimum=exclusive_minimum)


def _bounded(kind: type, noun: str, minimum: float, maximum: float | None, *, exclusive_minimum: bool):
    form = "d" if kind is int else "g"
    bound = f"{'>' if exclusive_minimum else '>='} {minimum:{form}}"
    if maximum is not None:
        bound += f" and <= {maximum:{form}}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        above_minimum = value > minimum if exclusive_minimum else value >= minimum
        if not (math.isfinite(value) and above_minimum and (maximum is None or value <= maximum)):
            raise argparse.ArgumentTypeError(f"{text} must be {bound}")
        return value
    return parse


def add_model_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, presets: Iterable[str]) -> None:
    """--checkpoint, --preset, --base-model and --random-weights, as runtime.report and runtime.stage_timing take them
    (runtime.report.load_model_from_args loads the model they name); check them with `check_model_arguments`."""
    parser.add_argument("--checkpoint", help="checkpoint JSON (default: the embedded demo model)")
    parser.add_argument("--preset", choices=sorted(presets),
                        help="must match the checkpoint's; required with --random-weights (default: the checkpoint's)")
    parser.add_argument("--base-model", help="local diffusers-format base folder")
    parser.add_argument("--random-weights", action="store_true",
                        help="an untrained model of --preset with random base weights (labelled in every output)")


def check_model_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through `parser.error` when --random-weights comes without --preset or with weights to load."""
    if args.random_weights and (args.preset is None or args.checkpoint is not None or args.base_model is not None):
        parser.error("--random-weights needs --preset, and no --checkpoint or --base-model")


def nearest_existing_folder(path: Path) -> Path:
    """The nearest of `path` and the folders above it that exists: where `path.mkdir(parents=True)` would start.
    NotADirectoryError ("X is not a folder") when that is a file; FileNotFoundError when none of them exists."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise NotADirectoryError(f"{candidate} is not a folder")
            return candidate
    raise FileNotFoundError(f"neither {path} nor any folder above it exists")


def output_folder_problem(path: Path) -> str | None:
    """Why `path` cannot be an output folder (made with `mkdir(parents=True)` and written into), or None; checked
    before a command's slow part, so a bad path is an error at once."""
    try:
        parent = nearest_existing_folder(path)
    except OSError as error:
        return str(error)
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable"
    return None


def output_file_problem(path: Path, *, overwrite: bool) -> str | None:
    """Why a command's results cannot be written to the file `path` (its folder made first), or None; checked before
    the command's slow part, as `output_folder_problem` is for folders. A file that exists is a problem unless
    `overwrite` (the command's --overwrite): results that took a GPU session to measure are never replaced unasked."""
    if path.is_dir():
        return "is a folder"
    if path.exists() and not overwrite:
        return "exists (use --overwrite to replace it)"
    return output_folder_problem(path.parent)


def check_out_argument(parser: argparse.ArgumentParser, path: Path, option: str = "--out") -> None:
    """Exit through `parser.error`, naming `option`, when `path` cannot be an output folder
    (`output_folder_problem`)."""
    problem = output_folder_problem(path)
    if problem is not None:
        parser.error(f"{option} {path}: {problem}")


def check_output_file_argument(parser: argparse.ArgumentParser, option: str, path: Path | None, *,
                               overwrite: bool) -> None:
    """Exit through `parser.error`, naming `option`, when the results cannot go to the file `path`
    (`output_file_problem`); nothing to check when `path` is None (the option was not given)."""
    if path is not None and (problem := output_file_problem(path, overwrite=overwrite)) is not None:
        parser.error(f"{option} {path}: {problem}")


def check_output_files(parser: argparse.ArgumentParser, folder: Path, names: Iterable[str], *, overwrite: bool,
                       option: str = "--out") -> None:
    """`check_out_argument` of `folder`, then exit through `parser.error` when one of the files `names` a command
    writes there cannot be written (`output_file_problem`), naming it."""
    check_out_argument(parser, folder, option)
    for name in names:
        check_output_file_argument(parser, f"{option} {folder}:", folder / name, overwrite=overwrite)


EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a process that Ctrl-C stopped; every command's status


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """'1 image', '0 images', '2 images': `count` and `noun` in the number it takes (`nouns` where the plural is not
    `noun` + 's')."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def non_finite_as_null(value):
    """`value` (JSON data: dicts, lists, numbers, strings) with every float that is not finite made None: strict JSON
    has no infinity or NaN."""
    if isinstance(value, dict):
        return {key: non_finite_as_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [non_finite_as_null(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_json(data: dict, path: Path) -> None:
    """`write_whole` of the JSON (no NaN/inf), its folder made first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, (json.dumps(data, indent=2, allow_nan=False) + "\n").encode())


def write_whole(path: Path, data: bytes | memoryview) -> None:
    """Into a new hidden temporary beside `path` (`new_partial_file`), synced, then renamed over `path`: a write that
    fails leaves the previous file or none, never part of one; a killed one also leaves its hidden temporary."""
    write_whole_files({path: data})


def write_whole_files(files: dict[Path, bytes | memoryview]) -> None:
    """`write_whole` of several files at once: every one into its new hidden temporary and synced first, then all
    renamed over their paths, in order. A write that fails or is killed before the renames leaves every previous
    file as it was."""
    temporaries: list[Path] = []
    try:
        for path, data in files.items():
            fd, temporary = new_partial_file(path)
            temporaries.append(temporary)
            with os.fdopen(fd, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
        for temporary, path in zip(temporaries, files):
            os.replace(temporary, path)
    except BaseException:
        for temporary in temporaries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        raise


PARTIAL_SUFFIX = ".partial"


def partial_name(path: Path) -> Path:
    """A new random hidden name beside `path` for its temporary: `.NAME.XXXXXXXX.partial`."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


def new_partial_file(path: Path) -> tuple[int, Path]:
    """(descriptor open for reading and writing, name) of a new hidden temporary of `path` (`partial_name`), made
    with O_EXCL, so a file or link already there is never written through and two writers never share one, and with
    the mode the umask gives any new file (mkstemp's would be 0600, whatever the umask)."""
    while True:
        temporary = partial_name(path)
        try:
            return os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), temporary
        except FileExistsError:
            continue
