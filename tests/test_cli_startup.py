"""Start-up cost of the command lines: what importing them pulls in before any work is done.

`python -m runtime.upscale --help`, and a rerun whose outputs all exist (which only prints "skip"),
should not wait for diffusers (seconds: it imports torch._dynamo); it is imported when a model is built.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_importing_the_upscale_command_does_not_import_diffusers():
    probe = "import sys, runtime.upscale; print(sorted(m for m in ('diffusers', 'peft') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
