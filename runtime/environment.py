"""What a measurement ran on: machine, software versions, commit. Written beside results (runtime.report,
guidesr.evaluate) so that a number that moves between runs can be traced to what changed."""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def environment(device: torch.device, modules: Iterable[str]) -> dict:
    """The machine, Python, torch's CPU kernels and threads, and the versions of `modules` (import names)."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": gpu,
        "gpu_driver": gpu_driver() if gpu else None,
        "cuda": torch.version.cuda,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "versions": {name: module_version(name) for name in modules},
        "compiler_env": {key: value for key, value in sorted(os.environ.items())
                         if key.startswith(("TORCHINDUCTOR_", "TORCH_COMPILE"))},
    }


def git_commit() -> str:
    """GUIDESR_COMMIT when set (a copied tree's .git may be stale), else HEAD (+ '-dirty' with uncommitted changes)."""
    if os.environ.get("GUIDESR_COMMIT"):
        return os.environ["GUIDESR_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout; set GUIDESR_COMMIT)"
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def gpu_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True)
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


def module_version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return str(getattr(importlib.import_module(name), "__version__", "unknown"))
    except ImportError as err:  # installed but broken (e.g. a CUDA-only package on a CPU machine)
        return f"not importable: {err}"
