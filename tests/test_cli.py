"""runtime.cli: the argparse types for bounded numbers, the model arguments and the output-folder check of the command
lines."""

import argparse
import json
import os
import re
import stat
import tempfile
from pathlib import Path

import pytest

from runtime.cli import (add_model_arguments, bounded_float, bounded_int, check_model_arguments,
                         nearest_existing_folder, output_file_problem, output_folder_problem, plural, write_whole)


@pytest.mark.parametrize("parse, text, value", [
    (bounded_int(1), "1", 1),
    (bounded_int(0), "0", 0),
    (bounded_int(1, 100), "100", 100),
    (bounded_float(0), "0", 0.0),
    (bounded_float(0, exclusive_minimum=True), "1e-3", 1e-3),
    (bounded_float(0, 1), "1", 1.0),
])
def test_numbers_within_the_bounds_are_accepted(parse, text, value):
    assert parse(text) == value and type(parse(text)) is type(value)


@pytest.mark.parametrize("parse, text, message", [
    (bounded_int(1), "0", "0 must be >= 1"),
    (bounded_int(0), "-1", "-1 must be >= 0"),
    (bounded_int(1, 100), "101", "101 must be >= 1 and <= 100"),
    (bounded_int(1), "1.5", "'1.5' is not an integer"),
    (bounded_int(1), "two", "'two' is not an integer"),
    (bounded_float(0, exclusive_minimum=True), "0", "0 must be > 0"),
    (bounded_float(0), "-0.5", "-0.5 must be >= 0"),
    (bounded_float(0, 1), "1.5", "1.5 must be >= 0 and <= 1"),
    (bounded_float(0.5, 2.5), "3", "3 must be >= 0.5 and <= 2.5"),
    (bounded_float(0), "nan", "nan must be >= 0"),
    (bounded_float(0), "inf", "inf must be >= 0"),
    (bounded_float(0), "x", "'x' is not a number"),
])
def test_numbers_outside_the_bounds_are_argparse_errors_naming_the_bound(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        parse(text)
    assert str(caught.value) == message


def test_an_argparse_error_names_the_option_the_value_and_the_bound(capsys):
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--repeats", type=bounded_int(1))
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--repeats", "0"])
    assert exit_info.value.code == 2 and "tool: error: argument --repeats: 0 must be >= 1" in capsys.readouterr().err


def test_plural_agrees_with_the_count():
    assert [plural(n, "warm-up call") for n in (0, 1, 2)] == ["0 warm-up calls", "1 warm-up call", "2 warm-up calls"]
    assert plural(1, "micro-batch", "micro-batches") == "1 micro-batch"
    assert plural(3, "micro-batch", "micro-batches") == "3 micro-batches"


def test_nearest_existing_folder_is_where_mkdir_would_start(tmp_path):
    assert nearest_existing_folder(tmp_path) == tmp_path
    assert nearest_existing_folder(tmp_path / "a" / "b") == tmp_path
    (tmp_path / "file").write_text("")
    for below_a_file in (tmp_path / "file", tmp_path / "file" / "out"):
        with pytest.raises(NotADirectoryError, match=f"^{re.escape(str(tmp_path / 'file'))} is not a folder$"):
            nearest_existing_folder(below_a_file)


@pytest.mark.parametrize("argv, error", [
    (["--preset", "tiny", "--random-weights"], None),
    (["--checkpoint", "m.json"], None),
    (["--random-weights"], "--random-weights needs --preset"),
    (["--preset", "tiny", "--random-weights", "--checkpoint", "m.json"], "--random-weights needs --preset"),
    (["--preset", "tiny", "--random-weights", "--base-model", "base"], "--random-weights needs --preset"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
])
def test_model_arguments_refuse_random_weights_without_a_preset_or_with_weights(argv, error, capsys):
    parser = argparse.ArgumentParser(prog="measure")
    add_model_arguments(parser, ("tiny", "sd-turbo"))
    if error is None:
        check_model_arguments(parser, parser.parse_args(argv))
        return
    with pytest.raises(SystemExit):
        check_model_arguments(parser, parser.parse_args(argv))
    assert f"measure: error: {error}" in capsys.readouterr().err


def test_output_folder_problem_names_a_file_in_the_way_and_accepts_a_folder_to_make(tmp_path):
    (tmp_path / "file").write_text("")
    assert output_folder_problem(tmp_path) is None
    assert output_folder_problem(tmp_path / "new" / "deeper") is None
    assert output_folder_problem(tmp_path / "file" / "out") == f"{tmp_path / 'file'} is not a folder"


def test_output_file_problem_refuses_an_existing_file_unless_overwrite(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    assert output_file_problem(tmp_path / "results.json", overwrite=False) == "exists (use --overwrite to replace it)"
    assert output_file_problem(tmp_path / "results.json", overwrite=True) is None
    assert output_file_problem(tmp_path / "new.json", overwrite=False) is None
    assert output_file_problem(tmp_path, overwrite=True) == "is a folder"


def _as_a_user_without_root(check):
    """`check()` (JSON-able) run by this process, or, when that is root (which os.access lets write anywhere), by a
    forked child that became the user nobody."""
    if os.name == "nt":
        pytest.skip("POSIX permissions: Windows keeps folders writable whatever their mode")
    if os.geteuid() != 0:
        return check()
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("running as root, and there is no user nobody to check the permission as")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            try:
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                result = check()
            except BaseException as err:
                result = f"the child running as nobody failed: {err!r}"
            os.write(write, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        result = json.loads(pipe.read())
    os.waitpid(pid, 0)
    return result


def test_output_folder_problem_names_a_folder_without_write_permission():
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        scratch.chmod(0o755)
        readonly, writable = scratch / "readonly", scratch / "writable"
        readonly.mkdir()
        readonly.chmod(0o555)
        writable.mkdir()
        writable.chmod(0o777)
        problems = _as_a_user_without_root(lambda: [output_folder_problem(path) for path in (
            readonly, readonly / "new" / "deeper", writable / "new")])
    assert problems == [f"{readonly} is not writable"] * 2 + [None]


def test_write_whole_never_writes_through_a_link_at_its_temporary_name(tmp_path):
    """A link left at the old fixed temporary name (PATH.partial) in a shared folder made the write land in the
    link's target and then published the link itself as PATH."""
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    out = tmp_path / "results.json"
    (tmp_path / "results.json.partial").symlink_to(victim)
    write_whole(out, b"{}\n")
    assert victim.read_text() == "not yours"
    assert not out.is_symlink() and out.read_bytes() == b"{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.json.partial", "victim.txt"]


@pytest.mark.parametrize("umask", [0o077, 0o022, 0o002], ids=["umask-077", "umask-022", "umask-002"])
def test_write_whole_gives_the_mode_the_umask_gives_a_new_file(tmp_path, umask):
    """A fixed 0644 made results readable by everyone under umask 077 and took the group's write under 002; a
    replaced file gets the new file's mode too, as a rename does."""
    previous = os.umask(umask)
    try:
        (tmp_path / "plain.json").write_bytes(b"{}\n")
        write_whole(tmp_path / "results.json", b"{}\n")
        replaced = tmp_path / "replaced.json"
        replaced.write_bytes(b"old")
        replaced.chmod(0o600)
        write_whole(replaced, b"{}\n")
    finally:
        os.umask(previous)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["plain.json", "results.json", "replaced.json"], 0o666 & ~umask)


def test_write_whole_leaves_the_previous_file_and_no_temporary_when_the_write_fails(tmp_path):
    out = tmp_path / "engine.plan"
    out.write_bytes(b"previous")
    with pytest.raises(TypeError):
        write_whole(out, "text, not bytes")
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["engine.plan"]
