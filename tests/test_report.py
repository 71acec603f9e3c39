"""runtime.report (latency / memory / accuracy report) and runtime.gpu_session's target checks, on the CPU.

The report runs end to end on the tiny preset with random weights, for the `torch` and
`onnxruntime` backends, at CI sizes (64 and 96 whole, 128 tiled in 64 px tiles, 2 repeats).
"""

from __future__ import annotations

import json
import warnings
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import runtime.report as report_module
from runtime.gpu_session import GUIDANCE_CASE, check_targets, format_checks, kernels_choice
from runtime.report import format_markdown, main, parse_size, warm_up

from helpers import refuse_report_model_loading, status_after_ctrl_c

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CI_ARGS = ["--preset", "tiny", "--random-weights", "--device", "cpu", "--sizes", "64", "96", "--tiled", "128",
           "--tile", "64", "--overlap", "16", "--repeats", "2", "--tiled-repeats", "1", "--warmup", "1",
           "--warmup-s", "0"]


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    code = main(CI_ARGS + ["--backends", "torch", "onnxruntime", "--quality", "sample", "--quality-crop", "64",
                           "--out", str(out)])
    assert code == 0
    return out


def test_json_has_every_field(report_dir):
    data = json.loads((report_dir / "report.json").read_text())
    assert data["complete"] is True and "interrupted" not in data
    assert data["random_weights"] is True and "random weights" in data["title"] and "random" in data["weights"]
    env = data["environment"]
    for key in ("date_utc", "git_commit", "cpu", "cpu_count", "platform", "python", "gpu", "cuda", "versions"):
        assert key in env
    assert env["versions"]["torch"] and env["versions"]["onnxruntime"] and env["gpu"] is None
    assert data["matmul_rate_flops"]["fp32"] > 0
    rows = data["results"]
    expected = {(backend, mode, height) for backend in ("torch", "onnxruntime")
                for mode, height in (("whole", 64), ("whole", 96), ("tiled", 128))}
    assert {(r["backend"], r["mode"], r["height"]) for r in rows} == expected and len(rows) == len(expected)
    for row in rows:
        assert row["error"] is None and row["precision"] == "fp32"
        latency = row["latency_ms"]
        assert 0 < latency["min"] <= latency["median"] <= latency["p90"]
        assert len(latency["samples"]) == (1 if row["mode"] == "tiled" else 2)
        assert row["device_io_latency_ms"] is None  # measured for CUDA devices only
        assert row["throughput_mp_s"] == pytest.approx(row["megapixels"] / latency["median"] * 1e3)
        assert row["peak_memory_bytes"] > 50 * 2**20  # RSS high-water: the interpreter, torch and the model
        assert row["flops"] > 0 and row["floor_ms"] > 0 and row["gap_to_floor"] == pytest.approx(
            latency["median"] / row["floor_ms"])
        assert row["backend_setup_s"] >= 0 and len(row["warmup_ms"]) == 1
        accuracy = row["accuracy"]
        assert 0 <= accuracy["max_abs"] <= 1 and accuracy["ssim"] <= 1 + 1e-9
        if row["backend"] == "torch":  # the reference itself: same model, same input, same tiles
            assert accuracy["psnr_db"] is None and accuracy["max_abs"] == 0
        else:  # the fp32 ONNX graph agrees to float rounding
            assert accuracy["psnr_db"] > 80 and accuracy["max_abs"] < 1e-4
    tiled = [r for r in rows if r["mode"] == "tiled"]
    assert all(r["tiles"] == 9 and r["tile"] == [64, 64] and r["overlap"] == 16 for r in tiled)
    # FLOPs scale with the work: a 96x96 image is 2.25x a 64x64 one, the tiled pass counts 9 tiles of 64x64
    by_size = {(r["mode"], r["height"]): r["flops"] for r in rows if r["backend"] == "torch"}
    assert by_size[("whole", 96)] == pytest.approx(2.25 * by_size[("whole", 64)], rel=0.05)
    assert by_size[("tiled", 128)] == 9 * by_size[("whole", 64)]
    quality = data["quality"]
    assert quality["data"] == "sample" and len(quality["images"]) == 2
    assert {(q["backend"], q["precision"]) for q in quality["results"]} == {("torch", "fp32"), ("onnxruntime", "fp32")}
    assert 0 < quality["bicubic"]["psnr_rgb"] < 60


def test_markdown_and_plots_are_written(report_dir):
    markdown = (report_dir / "report.md").read_text()
    assert markdown.startswith("# GuideSR benchmark: tiny, random weights")
    assert "| backend | precision | size (HxW) |" in markdown and "Quality against ground truth" in markdown
    assert markdown.count("| torch | fp32 |") == 3 and markdown.count("| onnxruntime | fp32 |") == 3
    assert ("median and p90 of 2 calls on a prepared input (tiled: of 1 whole run_tiled pass, per-tile upsampling and "
            "blending included) after at least 1 warm-up call and 0.0 s of them") in markdown
    for name in ("latency.png", "accuracy.png"):
        data = (report_dir / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_markdown_says_n_a_for_an_image_smaller_than_the_ssim_window(report_dir):
    data = json.loads((report_dir / "report.json").read_text())
    for row in data["results"]:
        row["accuracy"]["ssim"] = None  # compare_images gives None below its 11 px window
    rows = [line for line in format_markdown(data).splitlines() if line.startswith("| torch | fp32 | 64x64 |")]
    assert len(rows) == 1 and rows[0].split(" | ")[10] == "n/a"


def test_markdown_keeps_a_failed_rows_message_in_its_cell_and_says_when_no_rate_was_measured(report_dir):
    data = json.loads((report_dir / "report.json").read_text())
    data["results"][0]["error"] = "RuntimeError: shapes [1, 3] | [1, 4]\nsecond line"
    data["matmul_rate_flops"] = {}
    lines = format_markdown(data).splitlines()
    [failed] = [line for line in lines if "failed: " in line and line.startswith("| torch")]
    assert "failed: RuntimeError: shapes [1, 3] \\| [1, 4] second line |" in failed
    assert failed.replace("\\|", "").count("|") == lines[lines.index(failed) - 1].count("|")
    assert any(line.endswith("/ measured matmul rate (not measured)") for line in lines)


def test_parse_size():
    assert parse_size("512") == (512, 512)
    assert parse_size("2160x3840") == (2160, 3840)
    for bad in ("0", "12x", "axb", "1x2x3"):
        with pytest.raises(Exception, match="size"):
            parse_size(bad)


@pytest.mark.parametrize("argv, message", [
    (["--quality", "sample", "--quality-crop", "30"], "--quality-crop: the crop size must be a multiple of 4"),
    (["--quality", "sample", "--quality-crop", "0"], "--quality-crop: the crop size must be a multiple of 4"),
    (["--quality", "{tmp}/missing"], "--quality {tmp}/missing: HR image folder {tmp}/missing does not exist"),
    (["--out", "{tmp}/file"], "--out {tmp}/file: {tmp}/file is not a folder"),
    (["--out", "{tmp}/file/report"], "--out {tmp}/file/report: {tmp}/file is not a folder"),
    (["--tile", "64", "--overlap", "56"], "--overlap 56 with --tile 64 computes every output pixel about 64 times"),
    (["--onnx", "{tmp}/missing.onnx"], "--onnx {tmp}/missing.onnx: no such file"),
    (["--onnx", "{tmp}"], "--onnx {tmp}: is a folder"),
    (["--engine", "{tmp}"], "--engine {tmp}: is a folder"),
    (["--engine", "{tmp}/missing.engine"], "--engine {tmp}/missing.engine: no such file"),
    (["--backends", "torch", "--onnx", "{tmp}/file"],
     "--onnx is for the onnxruntime backend, which --backends leaves out"),
    (["--backends", "torch", "--engine", "{tmp}/file"],
     "--engine is for the tensorrt backend, which --backends leaves out"),
])
def test_bad_quality_and_out_are_usage_errors_before_the_model_loads(argv, message, tmp_path, capsys, monkeypatch):
    refuse_report_model_loading(monkeypatch, "the command line was checked")
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(CI_ARGS + [arg.format(tmp=tmp_path) for arg in argv])
    assert exit_info.value.code == 2 and message.format(tmp=tmp_path) in capsys.readouterr().err


@pytest.mark.parametrize("name", ["report.json", "report.md", "latency.png", "accuracy.png"])
def test_a_report_file_already_in_out_is_refused_before_the_model_loads_unless_overwrite(name, tmp_path, capsys,
                                                                                         monkeypatch):
    refuse_report_model_loading(monkeypatch, "--out was checked")
    earlier = tmp_path / name
    earlier.write_text("an earlier run's")
    with pytest.raises(SystemExit) as exit_info:
        main(CI_ARGS + ["--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"--out {tmp_path}: {earlier}: exists (use --overwrite to replace it)" in capsys.readouterr().err
    assert earlier.read_text() == "an earlier run's"
    with pytest.raises(AssertionError, match="the model was loaded before --out was checked"):
        main(CI_ARGS + ["--out", str(tmp_path), "--overwrite"])  # past the check, to the model


def test_overwrite_removes_the_earlier_report_before_the_first_measurement(tmp_path, monkeypatch):
    """A run killed midway (SIGKILL: nothing runs after it) leaves only its own files, never its report.json beside an
    earlier run's Markdown and plots."""
    for name in ("report.json", "report.md", "latency.png", "accuracy.png"):
        (tmp_path / name).write_text("an earlier run's")
    measure, folder_at_each_measurement = report_module.Report.measure, []

    def measure_noting_the_folder(self, backend, geometry):
        folder_at_each_measurement.append(sorted(path.name for path in tmp_path.iterdir()))
        return measure(self, backend, geometry)

    monkeypatch.setattr(report_module.Report, "measure", measure_noting_the_folder)
    assert main(CI_ARGS + ["--backends", "torch", "--tiled", "--sizes", "64", "--out", str(tmp_path),
                           "--overwrite"]) == 0
    assert folder_at_each_measurement == [[]]
    assert json.loads((tmp_path / "report.json").read_text())["complete"] is True
    assert (tmp_path / "latency.png").read_bytes().startswith(PNG_SIGNATURE)


def test_the_overlap_is_checked_against_the_tile_actually_used(tmp_path, capsys):
    """--tile 90 passes the command-line check; the tiny model's size multiple (16) makes it 80, and an overlap of 64
    would compute every output pixel 25 times: the tiled row fails with the reason, the report exits 1."""
    argv = ["--preset", "tiny", "--random-weights", "--device", "cpu", "--sizes", "--tiled", "128", "--tile", "90",
            "--overlap", "64", "--tiled-repeats", "1", "--warmup", "1", "--warmup-s", "0", "--backends", "torch",
            "--out", str(tmp_path)]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="No artists with labels found to put in legend")
        assert main(argv) == 1
    assert (tmp_path / "latency.png").read_bytes().startswith(PNG_SIGNATURE)
    [row] = json.loads((tmp_path / "report.json").read_text())["results"]
    assert row["error"].startswith("ValueError: --overlap 64 with the tile actually used, 80x80 computes every "
                                   "output pixel about 25 times")
    out, err = capsys.readouterr()
    assert "FAILED torch fp32 128x128 tiled: ValueError: --overlap 64" in err and "FAILED" not in out


def test_a_static_backend_measures_a_whole_size_off_the_size_multiple(tmp_path):
    """72x72 is not a multiple of the tiny model's 16: onnxruntime's graph is built for 80x80, the model's own padded
    shape, and the image is padded to it as the model pads (a 64x64 graph, the size rounded down, cannot take it)."""
    argv = ["--preset", "tiny", "--random-weights", "--device", "cpu", "--sizes", "72", "--tiled", "--repeats", "1",
            "--warmup", "1", "--warmup-s", "0", "--backends", "onnxruntime", "--out", str(tmp_path)]
    assert main(argv) == 0
    [row] = json.loads((tmp_path / "report.json").read_text())["results"]
    assert row["error"] is None and "tiles of 80x80" in row["description"]
    assert row["accuracy"]["max_abs"] < 1e-4


def test_sigterm_writes_what_was_measured(tmp_path):
    """A session's time limit (SIGTERM) stops the run; the measured rows, Markdown and plots are still written."""
    out = tmp_path / "partial"
    # the 64x64 row comes quickly, then 50 tiled passes take far longer than the test waits
    command = [sys.executable, "-m", "runtime.report", *CI_ARGS, "--backends", "torch", "--sizes", "64",
               "--tiled-repeats", "50", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    report = out / "report.json"
    deadline = time.monotonic() + 240
    while not (report.is_file() and json.loads(report.read_text())["results"]):  # the first row is in
        assert process.poll() is None and time.monotonic() < deadline, "the report ended before its first row"
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1, output
    data = json.loads(report.read_text())
    assert data["complete"] is False and "SIGTERM" in data["interrupted"]
    assert len(data["results"]) >= 1
    assert "**Incomplete**" in (out / "report.md").read_text()
    assert (out / "latency.png").read_bytes().startswith(PNG_SIGNATURE)


def test_ctrl_c_writes_what_was_measured_and_exits_130(tmp_path, monkeypatch, capsys):
    """Ctrl-C exits 130, as runtime.upscale, guidesr.train and export do; the measured rows are still written."""
    measure = report_module.Report.measure
    calls = []

    def interrupted_on_the_second_row(self, backend, geometry):
        calls.append(geometry)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(self, backend, geometry)

    monkeypatch.setattr(report_module.Report, "measure", interrupted_on_the_second_row)
    assert status_after_ctrl_c(main, CI_ARGS + ["--backends", "torch", "--tiled", "--out", str(tmp_path)]) == 130
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["complete"] is False and "SIGINT" in data["interrupted"] and len(data["results"]) == 1
    assert "**Incomplete**" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "accuracy.png").read_bytes().startswith(PNG_SIGNATURE)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert "interrupted (SIGINT): writing what was measured\n" in err and "interrupted (SIGINT)" not in out


def test_ctrl_c_while_the_model_loads_is_one_line_and_130(tmp_path, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "load_model_from_args", interrupted)
    assert status_after_ctrl_c(main, CI_ARGS + ["--out", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err == "interrupted (SIGINT) before the report files were all written\n"
    assert not (tmp_path / "out" / "report.json").exists()


def _row(backend, mode, size, median_ms, psnr_db, height=None):
    return {"backend": backend, "precision": "fp16", "mode": mode, "height": height or size, "width": size,
            "latency_ms": {"median": median_ms, "p90": median_ms * 1.1}, "device_io_latency_ms": None,
            "accuracy": {"psnr_db": psnr_db},
            "tiles": 45, "tile": [512, 512], "flops": 4.6e12, "floor_ms": 6.0, "gap_to_floor": median_ms / 6.0,
            "error": None}


def test_targets_pass_fail_and_missing_rows():
    rows = [_row("torch", "whole", 512, 60.0, 70.0), _row("compiled", "whole", 512, 12.0, 45.0),
            _row("compiled", "whole", 1024, 50.0, None), _row("compiled", "tiled", 3840, 1200.0, 41.0, height=2160)]
    report = {"results": rows, "matmul_rate_flops": {"fp16": 7.7e14}}
    checks = check_targets(report, "fp16", (2160, 3840))
    assert [c["passed"] for c in checks] == [True, True, True, True, None]
    assert "5.00x" in checks[1]["measured"] and "41.00 dB" in checks[2]["measured"]  # the worst compiled row
    assert "2.00x" in checks[4]["measured"]  # gap: 12 ms over a 6 ms floor

    rows[1] = _row("compiled", "whole", 512, 25.0, 39.0)  # too slow, under 3x, under 40 dB
    rows[3] = _row("compiled", "tiled", 3840, 1600.0, 41.0, height=2160)
    assert [c["passed"] for c in check_targets(report, "fp16", (2160, 3840))] == [False, False, False, False, None]

    for row in rows[1:]:  # a failed row counts as missing, never as a pass
        row["error"] = "RuntimeError: compile failed"
    checks = check_targets(report, "fp16", (2160, 3840))
    assert [c["passed"] for c in checks] == [None] * 5 and all("n/a" in c["measured"] for c in checks)
    assert "| check | measured | target | result |" in format_checks(checks, "title")


def test_targets_add_the_device_io_latency_where_measured():
    fast = _row("compiled", "whole", 512, 16.0, 45.0) | {"device_io_latency_ms": {"median": 14.5, "p90": 14.6}}
    report = {"results": [_row("torch", "whole", 512, 60.0, 70.0), fast], "matmul_rate_flops": {"fp16": 7.7e14}}
    checks = check_targets(report, "fp16", (2160, 3840))
    assert [c["passed"] for c in checks[:3]] == [False, True, True]  # 16 ms with host copies, 14.5 without
    assert "on the GPU" in checks[1]["check"] and checks[1]["measured"] == "14.50 ms (p90 14.60)"
    fast["device_io_latency_ms"]["median"] = 15.5
    assert check_targets(report, "fp16", (2160, 3840))[1]["passed"] is False


def test_kernels_choice_follows_the_guidance_branch_measurement(tmp_path):
    path = tmp_path / "kernels.json"
    assert kernels_choice(path)[0] == "on"  # no benchmark: the model's default

    def write(with_kernels, without):
        row = {"label": GUIDANCE_CASE, "graph_ms": {"compile_triton": with_kernels, "compile": without,
                                                    "triton": 9.0, "eager": 9.0}}
        path.write_text(json.dumps({"results": [{"label": "fca_block (1, 64, 1024)"}, row]}))

    write(3.09, 1.39)
    choice, why = kernels_choice(path)
    assert choice == "off" and "3.090 ms with the kernels, 1.390 ms without" in why
    write(1.2, 1.39)
    assert kernels_choice(path)[0] == "on"
    path.write_text('{"results": [{"label": "guid')  # a benchmark killed while writing (before it wrote atomically)
    choice, why = kernels_choice(path)
    assert choice == "on" and "kernels.json is unreadable: JSONDecodeError" in why


@pytest.mark.slow
def test_gpu_session_cpu_smoke(tmp_path):
    """The GPU session's plumbing (steps, logs, report, summary) on the CPU with the tiny preset."""
    result = subprocess.run([sys.executable, "-m", "runtime.gpu_session", "--cpu-smoke", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {s["name"]: s["status"] for s in summary["steps"]}["report"] == "ok"
    assert summary["report_complete"] is True and len(summary["checks"]) == 5
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "session.log").stat().st_size > 0
    assert "issue 7 targets" in result.stdout
    gpu_tests = next(s for s in summary["steps"] if s["name"] == "pytest-gpu")  # skipped without CUDA, one file each
    assert gpu_tests["status"] == "ok" and "tests/test_backends.py" in {p["name"] for p in gpu_tests["parts"]}
    assert all(p["status"] == "ok" for p in gpu_tests["parts"])


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_parallel_step_keeps_each_outcome_and_each_output_whole(tmp_path, monkeypatch):
    from runtime import gpu_session

    monkeypatch.setattr(gpu_session, "MIN_STEP_S", 0)
    session = gpu_session.Session(tmp_path, budget_s=60)
    commands = {
        "passes": _python("print('a1'); print('a2')"),
        "sleeps": _python("import time; print('b1', flush=True); time.sleep(60)"),
        "fails": _python("import sys; print('c1'); sys.exit(3)"),
        "sleeps too": _python("import time; time.sleep(60)"),
    }
    start = time.monotonic()
    step = session.run_parallel("tests", commands, cap_s=3, jobs=2)
    assert time.monotonic() - start < 20  # stopped at the limit, not after the sleeps
    outcome = {part["name"]: part["status"] for part in step.parts}
    assert outcome == {"passes": "ok", "fails": "failed (exit 3)", "sleeps": "timed out after 3 s",
                       "sleeps too": "timed out after 3 s"}
    assert step.status.startswith("timed out after 3 s (3 of 4 not ok: ")
    log = session.log.read_text()
    assert "a1\na2\n" in log and "b1\n" in log and "c1\n" in log  # each process's output in one piece
    assert log.index("===== tests / passes") < log.index("===== tests / fails")  # in the order they ended


def test_parallel_step_names_what_never_started_and_what_failed(tmp_path, monkeypatch):
    from runtime import gpu_session

    monkeypatch.setattr(gpu_session, "MIN_STEP_S", 0)
    session = gpu_session.Session(tmp_path, budget_s=60)
    step = session.run_parallel("tests", {"sleeps": _python("import time; time.sleep(60)"),
                                          "waits": _python("pass")}, cap_s=2, jobs=1)
    assert [(p["name"], p["status"]) for p in step.parts] == [("sleeps", "timed out after 2 s"),
                                                              ("waits", "not started")]
    step = session.run_parallel("more", {"a": _python("pass"), "b": _python("raise SystemExit(1)")}, cap_s=30, jobs=4)
    assert step.status == "failed (1 of 2: b)"
    step = session.run_parallel("all", {"a": _python("pass"), "b": _python("pass")}, cap_s=30, jobs=4)
    assert step.status == "ok" and [s.name for s in session.steps] == ["tests", "more", "all"]


def test_warm_up_makes_at_least_the_calls_and_continues_until_the_time_is_spent():
    cpu = torch.device("cpu")
    calls = []
    assert len(warm_up(lambda: calls.append(1), cpu, calls=3, seconds=0.0)) == 3 and len(calls) == 3
    assert warm_up(lambda: calls.append(1), cpu, calls=0, seconds=0.0) == []
    times = warm_up(lambda: time.sleep(0.01), cpu, calls=1, seconds=0.05)
    assert sum(times) >= 50.0 and sum(times[:-1]) < 50.0  # ~10 ms calls, stopped once 50 ms are spent


@pytest.mark.parametrize("argv, message", [
    (["--cap", "report=abc"], "--cap report=abc: expected STEP=SECONDS"),
    (["--cap", "report"], "--cap report: expected STEP=SECONDS"),
    (["--cap", "report=0"], "--cap report=0: the seconds must be positive"),
    (["--test-jobs", "0"], "argument --test-jobs: 0 must be >= 1"),
    (["--budget-s", "0"], "argument --budget-s: 0 must be > 0"),
    (["--sizes", "512", "-1"], "argument --sizes: -1 must be >= 1"),
    (["--engine", "missing.engine"], "--engine missing.engine: no such file"),  # the report would refuse it
    (["--engine", "/"], "--engine /: is a folder"),
])
def test_gpu_session_refuses_malformed_arguments_before_any_step(argv, message, tmp_path, capsys):
    from runtime import gpu_session

    with pytest.raises(SystemExit) as exit_info:
        gpu_session.main(["--cpu-smoke", "--out", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_gpu_session_refuses_an_out_that_is_a_file(tmp_path, capsys):
    from runtime import gpu_session

    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        gpu_session.main(["--cpu-smoke", "--out", str(tmp_path / "file")])
    assert exit_info.value.code == 2 and f"{tmp_path / 'file'} is not a folder" in capsys.readouterr().err


def test_gpu_session_refuses_an_earlier_sessions_files_unless_overwrite_which_removes_them(tmp_path, capsys):
    from runtime import gpu_session

    out = tmp_path / "out"
    earlier = out / "report" / "report.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text('{"results": []}')
    argv = ["--cpu-smoke", "--budget-s", "1", "--out", str(out)]  # every step skipped: under 30 s left
    with pytest.raises(SystemExit) as exit_info:
        gpu_session.main(argv)
    assert exit_info.value.code == 2
    assert f"--out {out}: {earlier}: exists (use --overwrite to replace it)" in capsys.readouterr().err
    assert earlier.read_text() == '{"results": []}' and not (out / "session.log").exists()
    (out / "session.log").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        gpu_session.main([*argv, "--overwrite"])
    assert exit_info.value.code == 2 and f"--out {out}: {out / 'session.log'}: is a folder" in capsys.readouterr().err
    (out / "session.log").rmdir()
    assert gpu_session.main([*argv, "--overwrite"]) == 1
    assert not earlier.exists()  # the summary is not made from an earlier session's report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["report_complete"] is False and summary["checks"] == []
    assert f"no report: {earlier} was not written" in capsys.readouterr().out


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_for_pids(folder: Path, count: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pids = [int(p.read_text()) for p in folder.glob("*.pid") if p.read_text()]
        if len(pids) == count:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"{count} processes did not start within {seconds} s")


@pytest.mark.parametrize("parallel", [False, True], ids=["one process", "parallel"])
def test_an_interrupted_step_stops_its_processes_records_itself_and_passes_the_interruption_on(
        parallel, tmp_path, monkeypatch):
    """Steps run in sessions of their own, which a terminal's Ctrl-C does not reach: the session stops them."""
    from runtime import gpu_session

    monkeypatch.setattr(gpu_session, "MIN_STEP_S", 0)
    session = gpu_session.Session(tmp_path, budget_s=60)
    pids = tmp_path / "pids"
    pids.mkdir()
    sleeper = ("import os, sys, time; open(os.path.join(sys.argv[1], str(os.getpid()) + '.pid'), 'w')"
               ".write(str(os.getpid())); time.sleep(60)")
    command = [sys.executable, "-c", sleeper, str(pids)]
    previous = signal.signal(signal.SIGALRM, gpu_session._interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 3.0)
        start = time.monotonic()
        with pytest.raises(gpu_session.SessionInterrupted, match="SIGALRM"):
            if parallel:
                session.run_parallel("tests", {"a": command, "b": command, "c": command}, cap_s=60, jobs=2)
            else:
                session.run("step", command, cap_s=60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - start < 20  # stopped, not waited for
    started = _wait_for_pids(pids, 2 if parallel else 1, seconds=1)
    assert not any(_alive(pid) for pid in started)
    step = session.steps[-1]
    assert step.status == "interrupted (SIGALRM)"
    if parallel:
        assert sorted((p["name"], p["status"]) for p in step.parts) == [
            ("a", "interrupted"), ("b", "interrupted"), ("c", "not started")]


def test_gpu_session_stopped_by_sigterm_stops_its_step_writes_the_summary_and_exits_130(tmp_path):
    """SIGTERM (e.g. a timeout around the command) during the first step: pytest's collection of the gpu tests here."""
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "runtime.gpu_session", "--cpu-smoke", "--out", str(out)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "session.log").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # into the collection's subprocess
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stdout + stderr
    assert "== interrupted (SIGTERM): the running step was stopped" in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] == "SIGTERM" and summary["report_complete"] is False
    assert "report" not in {step["name"] for step in summary["steps"]}
    assert summary["triton_kernels"]["why"] == "not chosen: the session was interrupted first"
