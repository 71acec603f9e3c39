"""The prepared GPU session of issues 5 and 7: one `run` call, under 10 minutes, compilation included.

    python3 -m runtime.gpu_session --out "$OUT"                 # on the lent GPU machine
    python -m runtime.gpu_session --cpu-smoke --out /tmp/smoke  # the same plumbing here, tiny preset, CPU

Steps, each a subprocess (argument lists, no shell) whose output goes to OUT/session.log, each
stopped at its own cap or at what is left of --budget-s, whichever comes first:

1. wheels: the wheels carried in .whl/ (made here by ../shared/tools/device-wheels.sh: the GPU
   image lacks diffusers) are installed into /tmp/site, which the later steps get on PYTHONPATH;
2. pytest-gpu: `pytest -m gpu` (the kernels' and the compiled backend's GPU tests), first: in the
   second, third and fourth sessions it came after the report and was cut by the budget, so the
   final code of the fourth was never tested on a GPU. One pytest process per test file, up to
   --test-jobs at once (the tests check values, not times, so they may share the GPU): most of a
   GPU test's time is Dynamo tracing and Inductor compilation on the CPU, one core each, and the
   machine has 16 (the fourth session's single process got through 3 tests in 116 s). Each
   process's Inductor gets the cores divided among the jobs (TORCHINDUCTOR_COMPILE_THREADS). Verbose
   (a test's name as it passes, so a cut run still says which passed), with each file's 5 slowest
   tests' times; summary.json lists every file's outcome;
3. kernels-benchmark: `python -m kernels.benchmark --json OUT/kernels.json` (issue 5's acceptance
   shapes and the sd-turbo guidance branch first; it writes what it measured when stopped);
4. report: `python -m runtime.report --preset sd-turbo --random-weights` on CUDA, fp16: `torch`
   (eager) and `compiled` (and `tensorrt` when TensorRT is installed and --engine names an engine
   built on this GPU model) at 512x512 and 1024x1024, and a 2160x3840 (4K UHD) output tiled through
   `compiled` in 512 px tiles, into OUT/report/, with cudnn.benchmark on for every backend (so the
   eager baseline gets tuned cuDNN algorithms too). A step stopped at its limit gets SIGTERM, and
   the report then writes what it measured (512 and the 4K frame share the first build);
5. stage-timing: `python -m runtime.stage_timing --profile-compiled 5` on sd-turbo at 512x512 (first
   the compiled backend's GPU time by kernel category, from torch.profiler, after a build of its own;
   then each stage of the eager fp16 forward as CUDA-graph replays, with FLOPs and TFLOP/s), into
   OUT/stages.json, with what is left. The budget rarely leaves it enough: docs/benchmarks.md
   ("Running the GPU session") gives a second call for it.

Triton kernels in the report (--triton-kernels auto, the default): on, unless step 3 measured the
sd-turbo guidance branch compiled *with* them slower (CUDA-graph replays) than compiled without
them, in which case the report runs with them off and summary.json says why. (The first H200 run
measured 3.09 ms with against 1.39 ms without, from a channels_last pass-1 grid of 64 programs since
widened; the rule keeps the report on the faster path either way.)

Compilation (--autotune): "none" (the default) compiles with Inductor's default mode. The first
H200 run (2026-11-26) spent over 200 s in one 512x512 build with mode "max-autotune-no-cudagraphs"
even with convolutions and matmuls restricted to ATen, which leaves no room for the 1024 build
inside 8 minutes. "aten" uses that mode with TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS=ATEN and
TORCHINDUCTOR_MAX_AUTOTUNE_CONV_BACKENDS=ATEN (cuBLAS/cuDNN only, Inductor tunes its own kernels);
"full" leaves Inductor's max-autotune defaults (Triton templates too). Give those a longer
--budget-s and larger --cap report=SECONDS. The choice is recorded in summary.json and the report.

Last, it prints the targets table (compiled median at 512, speed-up over eager fp16 in the same
run, PSNR against the fp32 reference, the 4K tiled time, the gap to the arithmetic floor) and
writes it to OUT/summary.json. Files under OUT: session.log, summary.json, kernels.json, stages.json
and report/{report.json, report.md, latency.png, accuracy.png}: 8 files, 1 folder deep (the device
machine returns at most 8 files, 2 folders deep). Where any of them exists already (an earlier session
in OUT), it stops before the first step (status 2) unless --overwrite is given, which removes them
first, so that no step and no summary reads a file of the earlier session.

SIGTERM (e.g. a timeout around the command) or Ctrl-C stops the running step's processes (each step runs in a session of
its own, which a terminal's Ctrl-C does not reach), runs no later step, and still writes summary.json and prints the
targets table from what was measured (the report writes its files when stopped); status 130.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .cli import EXIT_INTERRUPTED, bounded_float, bounded_int, check_output_files, plural

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
SITE = Path("/tmp/site")
BUDGET_S = 585  # under the device's 10-minute call: the report (issue 7), the GPU tests, the stage timing
GUIDANCE_CASE = "guidance_branch 1x512"  # the kernels benchmark's case that decides --triton-kernels auto
MIN_STEP_S = 30  # a step is not started with less time left than this
TOO_LITTLE_TIME = f"under {MIN_STEP_S} s of the session's budget left"
COLLECT_TIMEOUT_S = 120  # pytest's collection of the gpu tests (~10 s: it imports every test module)
PROFILED_REPLAYS = 5  # stage-timing's --profile-compiled on CUDA
SESSION_FILES = ("session.log", "summary.json", "kernels.json", "stages.json", "report/report.json", "report/report.md",
                 "report/latency.png", "report/accuracy.png")  # what a session writes into OUT
ATEN_ONLY = {"TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS": "ATEN", "TORCHINDUCTOR_MAX_AUTOTUNE_CONV_BACKENDS": "ATEN"}

# issue 7's targets (fp16, batch 1, H100/H200)
TARGET_COMPILED_512_MS = 15.0
TARGET_SPEEDUP = 3.0
TARGET_PSNR_DB = 40.0
TARGET_4K_TILED_S = 1.5


@dataclass(frozen=True)
class Settings:
    """What the report step measures, and each step's cap in seconds."""

    preset: str
    device: str
    precision: str
    backends: tuple[str, ...]  # whole sizes
    tiled_backends: tuple[str, ...]
    sizes: tuple[int, ...]
    frame: tuple[int, int]  # the tiled output (H, W)
    tile: int
    overlap: int
    repeats: int
    tiled_repeats: int
    warmup: int
    warmup_s: float
    caps: dict[str, float]


GPU = Settings(preset="sd-turbo", device="cuda", precision="fp16", backends=("torch", "compiled"),
               tiled_backends=("compiled",), sizes=(512, 1024), frame=(2160, 3840), tile=512, overlap=64,
               repeats=20, tiled_repeats=3, warmup=3, warmup_s=1.0,
               caps={"wheels": 60, "pytest-gpu": 150, "kernels-benchmark": 60, "report": 400, "stage-timing": 150})
# The same steps on the CPU with the tiny preset: the compiled backend and the kernel benchmark need CUDA.
CPU_SMOKE = Settings(preset="tiny", device="cpu", precision="fp32", backends=("torch",), tiled_backends=("torch",),
                     sizes=(64,), frame=(128, 128), tile=64, overlap=16, repeats=2, tiled_repeats=1, warmup=1,
                     warmup_s=0.0,
                     caps={"wheels": 60, "report": 240, "pytest-gpu": 240, "kernels-benchmark": 60,
                           "stage-timing": 120})
FAST, BASELINE, TARGET_SIZE = "compiled", "torch", 512  # the targets compare these rows


@dataclass
class Step:
    name: str
    status: str  # ok | failed (exit N) | timed out after N s | skipped: why
    seconds: float
    parts: list[dict] = field(default_factory=list)  # a step of parallel processes: each one's name, status, seconds


class SessionInterrupted(Exception):
    """SIGTERM (e.g. a timeout around the command) or Ctrl-C while a step runs: its processes are stopped, the later
    steps do not run, and the summary of what was measured is still written."""


def _interrupt(signum: int, frame) -> None:
    raise SessionInterrupted(signal.Signals(signum).name)


class Session:
    """Runs the steps against one deadline and logs their output to OUT/session.log.

    Each step's processes run in a session of their own (so a step is stopped as a whole: `_stop_group`), which a
    terminal's Ctrl-C does not reach: an interruption of this process (SessionInterrupted, KeyboardInterrupt) stops
    the running step's processes itself, records the step as interrupted and passes the interruption on."""

    def __init__(self, out: Path, budget_s: float):
        self.deadline = time.monotonic() + budget_s
        self.log = out / "session.log"
        self.log.write_text("")
        self.steps: list[Step] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")

    def limit(self, cap_s: float) -> float:
        """Seconds a step capped at `cap_s` may run from now."""
        return min(cap_s, self.deadline - time.monotonic())

    def _begin(self, name: str, cap_s: float, what: str) -> tuple[float, int, float]:
        """(the step's limit, where its output starts in session.log, its start time)."""
        limit = self.limit(cap_s)
        print(f"== {name} (limit {limit:.0f} s): {what}", flush=True)
        return limit, self.log.stat().st_size, time.monotonic()

    def skip(self, name: str, why: str) -> Step:
        return self._record(Step(name, f"skipped: {why}", 0.0))

    def run(self, name: str, command: list[str], cap_s: float, extra_env: dict[str, str] | None = None) -> Step:
        """One step: output appended to session.log, its process group stopped at the limit."""
        if self.limit(cap_s) < MIN_STEP_S:
            return self.skip(name, TOO_LITTLE_TIME)
        limit, offset, start = self._begin(name, cap_s, " ".join(command))
        with self.log.open("a") as log:
            log.write(f"\n===== {name}: {' '.join(command)}\n")
            log.flush()
            process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                       env=self.env | (extra_env or {}), start_new_session=True)
            try:
                code = process.wait(timeout=limit)
                status = "ok" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                _stop_group(process)
                status = f"timed out after {limit:.0f} s"
            except (SessionInterrupted, KeyboardInterrupt) as stop:
                _stop_group(process)
                self._record(Step(name, f"interrupted ({interruption_name(stop)})", time.monotonic() - start))
                raise
        print(_tail(self.log, offset, 12), flush=True)
        return self._record(Step(name, status, time.monotonic() - start))

    def fail(self, name: str, why: str, output: str, seconds: float) -> Step:
        """A step that failed before it could run its processes: `output` goes to session.log."""
        with self.log.open("a") as log:
            log.write(f"\n===== {name}\n{output}\n")
        return self._record(Step(name, f"failed ({why})", seconds))

    def run_parallel(self, name: str, commands: dict[str, list[str]], cap_s: float, jobs: int,
                     extra_env: dict[str, str] | None = None) -> Step:
        """One step made of independent processes, at most `jobs` at a time, all stopped at the step's limit.

        Each process writes to its own file; a finished (or stopped) process's output is appended to
        session.log whole, so the log does not interleave them."""
        if self.limit(cap_s) < MIN_STEP_S:
            return self.skip(name, TOO_LITTLE_TIME)
        limit, offset, start = self._begin(name, cap_s,
                                           f"{plural(len(commands), 'process', 'processes')}, {jobs} at a time")
        pending = list(commands.items())
        running: dict[str, tuple[subprocess.Popen, Path, float]] = {}
        parts: list[dict] = []
        with tempfile.TemporaryDirectory(prefix=f"{name}-") as scratch:
            def finish(part: str, status: str) -> None:
                process, output, started = running.pop(part)
                with self.log.open("a") as log:
                    log.write(f"\n===== {name} / {part}: {' '.join(process.args)}\n"
                              f"{output.read_text(errors='replace')}")
                parts.append({"name": part, "status": status, "seconds": round(time.monotonic() - started, 1)})
                print(f"   {part}: {status} ({parts[-1]['seconds']:.0f} s)", flush=True)

            def stop_all(status: str) -> None:
                for part, (process, _, _) in list(running.items()):
                    _stop_group(process)
                    finish(part, status)
                parts.extend({"name": part, "status": "not started", "seconds": 0.0} for part, _ in pending)
                pending.clear()

            try:
                while pending or running:
                    while pending and len(running) < jobs:
                        part, command = pending.pop(0)
                        output = Path(scratch) / f"{len(commands) - len(pending)}.log"
                        with output.open("w") as handle:
                            process = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                                       env=self.env | (extra_env or {}), start_new_session=True)
                        running[part] = (process, output, time.monotonic())
                    for part, (process, _, _) in list(running.items()):
                        if process.poll() is not None:
                            finish(part, "ok" if process.returncode == 0 else f"failed (exit {process.returncode})")
                    if time.monotonic() - start >= limit:
                        stop_all(f"timed out after {limit:.0f} s")
                    time.sleep(0.2)
            except (SessionInterrupted, KeyboardInterrupt) as stop:
                stop_all("interrupted")
                self._record(Step(name, f"interrupted ({interruption_name(stop)})", time.monotonic() - start, parts))
                raise
        print(_tail(self.log, offset, 12), flush=True)
        unfinished = [p["name"] for p in parts if p["status"] != "ok"]
        if not unfinished:
            status = "ok"
        elif any(p["status"].startswith(("timed out", "not started")) for p in parts):
            status = (f"timed out after {limit:.0f} s "
                      f"({len(unfinished)} of {len(parts)} not ok: {', '.join(unfinished)})")
        else:
            status = f"failed ({len(unfinished)} of {len(parts)}: {', '.join(unfinished)})"
        return self._record(Step(name, status, time.monotonic() - start, parts))

    def _record(self, step: Step) -> Step:
        self.steps.append(step)
        print(f"== {step.name}: {step.status} ({step.seconds:.0f} s)", flush=True)
        return step


def interruption_name(stop: BaseException) -> str:
    return "Ctrl-C" if isinstance(stop, KeyboardInterrupt) else str(stop)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the step's own process group (it was started in a new session), SIGKILL if it lingers."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _tail(log: Path, offset: int, count: int) -> str:
    """The last `count` non-empty lines a step wrote (progress bars' carriage returns split lines)."""
    with log.open("rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-count:])


def default_test_jobs() -> int:
    """Half the cores, at most 8: 8 on the 16-core GPU machine (the GPU tests are in 9 files; the ninth starts when
    the first one ends)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu"]


def gpu_test_files(session: Session) -> dict[str, list[str]]:
    """{test file: its `gpu` test ids}, from pytest's collection (with the session's environment)."""
    collected = subprocess.run([*PYTEST, "--collect-only", "-q"], cwd=REPO, env=session.env, capture_output=True,
                               text=True, timeout=max(1.0, session.limit(COLLECT_TIMEOUT_S)))
    if collected.returncode != 0:
        raise RuntimeError(f"pytest could not collect the gpu tests (exit {collected.returncode}):\n"
                           f"{collected.stdout[-2000:]}{collected.stderr[-2000:]}")
    files: dict[str, list[str]] = {}
    for line in collected.stdout.splitlines():
        if "::" in line:
            files.setdefault(line.partition("::")[0], []).append(line.strip())
    return files


def run_gpu_tests(session: Session, cap_s: float, jobs: int) -> Step:
    """`pytest -m gpu`, one process per test file (most tests first), `jobs` at a time: see the module's step 2."""
    if session.limit(cap_s) < MIN_STEP_S:
        return session.skip("pytest-gpu", TOO_LITTLE_TIME)
    start = time.monotonic()
    try:
        files = gpu_test_files(session)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        return session.fail("pytest-gpu", f"collection: {str(err).splitlines()[0]}", str(err),
                            time.monotonic() - start)
    if not files:
        return session.skip("pytest-gpu", "pytest collected no gpu tests")
    ordered = sorted(files, key=lambda path: -len(files[path]))
    commands = {path: [*PYTEST, "-v", "-rs", "--durations=5", path] for path in ordered}
    threads = {"TORCHINDUCTOR_COMPILE_THREADS": str(max(1, (os.cpu_count() or 1) // min(jobs, len(commands))))}
    print(f"== pytest-gpu: {plural(sum(map(len, files.values())), 'test')} in {plural(len(files), 'file')}, "
          f"collected in {time.monotonic() - start:.0f} s", flush=True)
    return session.run_parallel("pytest-gpu", commands, cap_s - (time.monotonic() - start), jobs, threads)


def kernels_choice(kernels_json: Path) -> tuple[str, str]:
    """("on" | "off", why) from the kernels benchmark's guidance-branch case (CUDA-graph medians)."""
    if not kernels_json.is_file():
        return "on", f"the model's default ({kernels_json.name} was not written)"
    try:
        results = json.loads(kernels_json.read_text())["results"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return "on", f"the model's default ({kernels_json.name} is unreadable: {type(err).__name__}: {err})"
    rows = [r for r in results if r.get("label") == GUIDANCE_CASE and "error" not in r]
    if not rows:
        return "on", f"the model's default (no {GUIDANCE_CASE!r} measurement)"
    graph = rows[0]["graph_ms"]
    with_kernels, without = graph["compile_triton"], graph["compile"]
    measured = f"{GUIDANCE_CASE} compiled: {with_kernels:.3f} ms with the kernels, {without:.3f} ms without"
    return ("on", measured) if with_kernels <= without else ("off", measured)


def report_command(settings: Settings, out: Path, engine: Path | None, autotune: str = "none",
                   triton_kernels: str = "on") -> list[str]:
    backends, artifacts = list(settings.backends), []
    if engine is not None and settings.device == "cuda" and importlib.util.find_spec("tensorrt") is not None:
        backends.append("tensorrt")
        artifacts = ["--engine", str(engine)]
    return [sys.executable, "-m", "runtime.report", "--preset", settings.preset, "--random-weights",
            "--device", settings.device, "--backends", *backends, "--tiled-backends", *settings.tiled_backends,
            "--precisions", settings.precision, "--sizes", *map(str, settings.sizes),
            "--tiled", f"{settings.frame[0]}x{settings.frame[1]}", "--tile", str(settings.tile),
            "--overlap", str(settings.overlap), "--repeats", str(settings.repeats),
            "--tiled-repeats", str(settings.tiled_repeats), "--warmup", str(settings.warmup),
            "--warmup-s", str(settings.warmup_s), "--cudnn-benchmark",
            "--triton-kernels", triton_kernels, *([] if autotune == "none" else ["--autotune"]),
            "--out", str(out), *artifacts]


# ------------------------------------------------------------------------------------------ targets


def _row(report: dict, backend: str, precision: str, mode: str, height: int, width: int) -> dict | None:
    for row in report["results"]:
        if (row["backend"], row["precision"], row["mode"], row["height"], row["width"]) == (
                backend, precision, mode, height, width) and row.get("error") is None:
            return row
    return None


def check_targets(report: dict, precision: str, frame: tuple[int, int]) -> list[dict]:
    """Issue 7's targets from a report: [{check, measured, target, passed (True/False/None: n/a)}]."""
    fast = _row(report, FAST, precision, "whole", TARGET_SIZE, TARGET_SIZE)
    base = _row(report, BASELINE, precision, "whole", TARGET_SIZE, TARGET_SIZE)
    tiled = _row(report, FAST, precision, "tiled", *frame)
    fast_rows = [r for r in report["results"] if r["backend"] == FAST and r["precision"] == precision
                 and r.get("error") is None]
    size, frame_text = f"{TARGET_SIZE}x{TARGET_SIZE}", f"{frame[0]}x{frame[1]}"
    missing = f"n/a (no {FAST} {precision} row)"
    checks = []

    def add(check: str, measured: str, target: str, passed: bool | None) -> None:
        checks.append({"check": check, "measured": measured, "target": target, "passed": passed})

    if fast is None:
        add(f"{FAST} median {size}", missing, f"<= {TARGET_COMPILED_512_MS:g} ms", None)
    else:
        ms = fast["latency_ms"]["median"]
        add(f"{FAST} median {size}", f"{ms:.2f} ms (p90 {fast['latency_ms']['p90']:.2f})",
            f"<= {TARGET_COMPILED_512_MS:g} ms", ms <= TARGET_COMPILED_512_MS)
    if fast is not None and fast["device_io_latency_ms"] is not None:
        ms = fast["device_io_latency_ms"]["median"]
        add(f"{FAST} median {size}, input and output on the GPU (no host copies)",
            f"{ms:.2f} ms (p90 {fast['device_io_latency_ms']['p90']:.2f})", f"<= {TARGET_COMPILED_512_MS:g} ms",
            ms <= TARGET_COMPILED_512_MS)
    if fast is None or base is None:
        add(f"speed-up over {BASELINE} {precision} eager, {size}", missing if fast is None else
            f"n/a (no {BASELINE} {precision} row)", f">= {TARGET_SPEEDUP:g}x", None)
    else:
        speedup = base["latency_ms"]["median"] / fast["latency_ms"]["median"]
        add(f"speed-up over {BASELINE} {precision} eager, {size}",
            f"{speedup:.2f}x (eager {base['latency_ms']['median']:.2f} ms)", f">= {TARGET_SPEEDUP:g}x",
            speedup >= TARGET_SPEEDUP)
    if not fast_rows:
        add("PSNR vs fp32 reference (worst row)", missing, f">= {TARGET_PSNR_DB:g} dB", None)
    else:
        values = [r["accuracy"]["psnr_db"] for r in fast_rows]
        finite = [v for v in values if v is not None]  # None: identical to the reference
        worst = min(finite) if finite else None
        add(f"PSNR vs fp32 reference (worst of {plural(len(values), f'{FAST} row')})",
            "identical" if worst is None else f"{worst:.2f} dB", f">= {TARGET_PSNR_DB:g} dB",
            worst is None or worst >= TARGET_PSNR_DB)
    if tiled is None:
        add(f"{frame_text} tiled through {FAST}", f"n/a (no {FAST} {precision} tiled row)",
            f"<= {TARGET_4K_TILED_S:g} s", None)
    else:
        seconds = tiled["latency_ms"]["median"] / 1e3
        add(f"{frame_text} tiled through {FAST} ({tiled['tiles']} tiles of {tiled['tile'][0]}x{tiled['tile'][1]})",
            f"{seconds:.3f} s", f"<= {TARGET_4K_TILED_S:g} s", seconds <= TARGET_4K_TILED_S)
    if fast is None:
        add(f"gap to the arithmetic floor, {FAST} {size}", missing, "reported", None)
    else:
        rate = report["matmul_rate_flops"][precision]
        add(f"gap to the arithmetic floor, {FAST} {size}",
            f"{fast['gap_to_floor']:.2f}x (floor {fast['floor_ms']:.2f} ms = {fast['flops'] / 1e12:.2f} TFLOP / "
            f"{rate / 1e12:.0f} TFLOP/s {precision} matmul)", "reported", None)
    return checks


def format_checks(checks: list[dict], title: str) -> str:
    verdict = {True: "PASS", False: "FAIL", None: "-"}
    lines = [title, "| check | measured | target | result |", "|---|---|---|---|"]
    lines += [f"| {c['check']} | {c['measured']} | {c['target']} | {verdict[c['passed']]} |" for c in checks]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.gpu_session", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "artifacts/gpu-session")),
                        help="output folder (default $OUT, else artifacts/gpu-session)")
    parser.add_argument("--budget-s", type=bounded_float(0, exclusive_minimum=True), default=BUDGET_S,
                        help=f"the whole session (default {BUDGET_S})")
    parser.add_argument("--autotune", choices=("none", "aten", "full"), default="none",
                        help="the compiled backend's torch.compile autotuning (default none: see above)")
    parser.add_argument("--triton-kernels", choices=("auto", "on", "off"), default="auto",
                        help="the fused Triton kernels in the report (default auto: see above)")
    parser.add_argument("--engine", type=Path,
                        help="a TensorRT engine of sd-turbo built on this GPU model: adds the tensorrt backend")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny preset on the CPU: tests the plumbing")
    parser.add_argument("--sizes", nargs="+", type=bounded_int(1),
                        help="whole sizes of the report (default: the settings')")
    parser.add_argument("--test-jobs", type=bounded_int(1), default=default_test_jobs(),
                        help=f"pytest processes at once in the pytest-gpu step (default {default_test_jobs()} here)")
    parser.add_argument("--cap", action="append", default=[], metavar="STEP=SECONDS",
                        help="override one step's time cap, e.g. --cap report=240 (repeatable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="remove an earlier session's files from --out first (default: refuse them)")
    args = parser.parse_args(argv)
    if args.engine is not None and not args.engine.is_file():
        parser.error(f"--engine {args.engine}: {'is a folder' if args.engine.is_dir() else 'no such file'}")
    settings = CPU_SMOKE if args.cpu_smoke else GPU
    caps = dict(settings.caps)
    for item in args.cap:
        step, _, seconds = item.partition("=")
        if step not in caps:
            parser.error(f"--cap: unknown step {step!r}; steps: {', '.join(caps)}")
        try:
            caps[step] = float(seconds)
        except ValueError:
            parser.error(f"--cap {item}: expected STEP=SECONDS, e.g. --cap report=240")
        if not caps[step] > 0:
            parser.error(f"--cap {item}: the seconds must be positive")
    settings = replace(settings, caps=caps, sizes=tuple(args.sizes) if args.sizes else settings.sizes)
    check_output_files(parser, args.out, SESSION_FILES, overwrite=args.overwrite)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in SESSION_FILES:
        (out / name).unlink(missing_ok=True)
    session = Session(out, args.budget_s)
    if args.triton_kernels == "auto":
        triton_kernels, kernels_why = "auto", "not chosen: the session was interrupted first"
    else:
        triton_kernels, kernels_why = args.triton_kernels, "asked for (--triton-kernels)"
    report_env = ATEN_ONLY if args.autotune == "aten" else {}
    interrupted = None
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    try:
        wheels = sorted(WHEELS.glob("*.whl"))
        if not wheels:
            session.skip("wheels", f"no wheels in {WHEELS}")
        elif session.run("wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                    "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(SITE),
                                    *map(str, wheels)], settings.caps["wheels"]).status == "ok":
            session.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), str(REPO),
                                                                      os.environ.get("PYTHONPATH")]))
        run_gpu_tests(session, settings.caps["pytest-gpu"], args.test_jobs)
        if settings.device != "cuda":
            session.skip("kernels-benchmark", "it needs CUDA")
        else:
            session.run("kernels-benchmark",
                        [sys.executable, "-m", "kernels.benchmark", "--json", str(out / "kernels.json")],
                        settings.caps["kernels-benchmark"])
        if args.triton_kernels == "auto":
            triton_kernels, kernels_why = kernels_choice(out / "kernels.json")
        print(f"== Triton kernels in the report: {triton_kernels} ({kernels_why})", flush=True)
        session.run("report", report_command(settings, out / "report", args.engine, args.autotune, triton_kernels),
                    settings.caps["report"], report_env)
        profile = ["--profile-compiled", str(PROFILED_REPLAYS)] if settings.device == "cuda" else []
        session.run("stage-timing", [sys.executable, "-m", "runtime.stage_timing", "--preset", settings.preset,
                                     "--random-weights", "--device", settings.device, "--size", str(settings.sizes[0]),
                                     "--triton-kernels", triton_kernels, *profile, "--json", str(out / "stages.json")],
                    settings.caps["stage-timing"])
    except (SessionInterrupted, KeyboardInterrupt) as stop:
        interrupted = interruption_name(stop)
        print(f"== interrupted ({interrupted}): the running step was stopped, the later ones did not run",
              file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)

    report_path = out / "report" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    checks = check_targets(report, settings.precision, settings.frame) if report is not None else []
    env = report["environment"] if report is not None else {}
    device = env.get("gpu") or env.get("cpu") or "unknown device"
    summary = {
        "device": device, "date_utc": env.get("date_utc"), "git_commit": env.get("git_commit"),
        "report_complete": bool(report and report["complete"]), "interrupted": interrupted, "autotune": args.autotune,
        "triton_kernels": {"report": triton_kernels, "why": kernels_why},
        "inductor_env": report_env, "settings": settings.__dict__,
        "steps": [step.__dict__ for step in session.steps], "checks": checks,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\nsteps: " + "; ".join(f"{s.name} {s.status} ({s.seconds:.0f} s)" for s in session.steps))
    if report is None:
        print(f"no report: {report_path} was not written (see {session.log})")
        return EXIT_INTERRUPTED if interrupted else 1
    title = (f"issue 7 targets: {device}, {settings.preset} random weights, {settings.precision}, batch 1"
             + ("" if report["complete"] else " (report INCOMPLETE: stopped early)"))
    print(format_checks(checks, title))
    failed_steps = [s for s in session.steps if not (s.status == "ok" or s.status.startswith("skipped"))]
    if interrupted:
        return EXIT_INTERRUPTED
    return 1 if failed_steps or any(c["passed"] is False for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
