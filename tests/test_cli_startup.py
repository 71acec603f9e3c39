"""Start-up cost of the command lines: what importing them pulls in before any work is done.

`--help`, a usage error and (for runtime.upscale) a rerun whose outputs all exist (which only prints "skip")
should not wait for diffusers (seconds: it imports torch._dynamo), peft, onnx, ONNX Runtime or Polygraphy; they
are imported where a model or a graph is built, read or run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("diffusers", "peft", "onnx", "onnxruntime", "polygraphy", "torch._dynamo")
COMMANDS = ("runtime.upscale", "runtime.report", "runtime.stage_timing", "export", "guidesr.train",
            "guidesr.evaluate")


def _heavy_modules_after(probe: str) -> list[str]:
    """The modules of HEAVY that running `probe` in a fresh interpreter imported."""
    script = f"import json, sys\n{probe}\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _command_run(command: str, *arguments: str) -> str:
    """A probe that runs `python -m command arguments...` in its interpreter and checks it exited with status 0
    (`--help`) or 2 (a usage error)."""
    return (f"import contextlib, io, runpy\n"
            f"sys.argv = [{command!r}, *{list(arguments)!r}]\n"
            f"with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            f"    try:\n"
            f"        runpy.run_module({command!r}, run_name='__main__', alter_sys=True)\n"
            f"    except SystemExit as exit:\n"
            f"        status = exit.code\n"
            f"assert status in (0, 2), status")


def test_importing_the_upscale_command_does_not_import_diffusers():
    assert not {"diffusers", "peft"} & set(_heavy_modules_after("import runtime.upscale"))


@pytest.mark.parametrize("command", COMMANDS)
def test_help_imports_no_heavy_module(command):
    assert _heavy_modules_after(_command_run(command, "--help")) == []


@pytest.mark.parametrize("command, arguments", [
    ("runtime.upscale", ["--no-such-option"]),
    ("runtime.report", ["--repeats", "0"]),
    ("runtime.stage_timing", ["--batch", "0"]),
    ("export", ["onnx", "--precision", "fp64"]),
    ("guidesr.train", ["--steps", "0"]),
    ("guidesr.evaluate", ["--draws", "0"]),
])
def test_usage_error_imports_no_heavy_module(command, arguments):
    assert _heavy_modules_after(_command_run(command, *arguments)) == []
