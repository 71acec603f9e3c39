"""kernels.benchmark on the CPU: it refuses to run without CUDA, with status 2 as the other commands do, and Ctrl-C
stops it with one line and status 130, keeping what was measured."""

from __future__ import annotations

import json

import pytest
import torch

from kernels import benchmark

from helpers import status_after_ctrl_c


def test_without_cuda_it_stops_with_status_2_and_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        benchmark.main([])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err == ("python -m kernels.benchmark: error: it needs a CUDA GPU and Triton; torch.cuda.is_available() "
                   "is False here\n")


def test_a_json_it_cannot_write_is_refused_before_it_measures(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("it went on past a bad --json"))
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as stop:
        benchmark.main(["--json", str(tmp_path / "file" / "kernels.json")])
    assert stop.value.code == 2
    expected = f"--json {tmp_path / 'file' / 'kernels.json'}: {tmp_path / 'file'} is not a folder"
    assert expected in capsys.readouterr().err


def test_an_existing_json_is_refused_before_it_measures_unless_overwrite(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    earlier = tmp_path / "kernels.json"
    earlier.write_text('{"earlier": "measurements"}')
    with pytest.raises(SystemExit) as stop:
        benchmark.main(["--json", str(earlier)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.endswith(f"--json {earlier}: exists (use --overwrite to replace it)\n")
    assert earlier.read_text() == '{"earlier": "measurements"}'
    with pytest.raises(SystemExit):
        benchmark.main(["--json", str(earlier), "--overwrite"])
    assert "it needs a CUDA GPU" in capsys.readouterr().err  # past the check, to the measuring part


def test_ctrl_c_before_the_first_case_is_one_line_and_130(tmp_path, capsys, monkeypatch):
    def ctrl_c():
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.cuda, "is_available", ctrl_c)
    assert status_after_ctrl_c(benchmark.main, ["--json", str(tmp_path / "kernels.json")]) == 130
    assert capsys.readouterr().err == "interrupted (SIGINT) before the first case was measured: nothing written\n"
    assert not (tmp_path / "kernels.json").exists()


def test_ctrl_c_during_the_cases_keeps_the_measured_rows_in_the_json(tmp_path, capsys):
    def ctrl_c():
        raise KeyboardInterrupt

    cases = [("first 1", lambda: {"section": "first", "ms": {"triton": 0.5}}), ("second 1", ctrl_c),
             ("third 1", lambda: pytest.fail("a case ran after Ctrl-C"))]
    data = {"complete": False, "results": []}
    path = tmp_path / "kernels.json"
    assert benchmark.measure_cases(cases, data, path) == "SIGINT"
    first = {"section": "first", "ms": {"triton": 0.5}, "label": "first 1"}
    assert json.loads(path.read_text()) == {"complete": False, "results": [first]}
    assert "first 1: triton 0.500 ms" in capsys.readouterr().out
    assert benchmark.interrupted_summary(data["results"], path) == (
        f"interrupted (SIGINT) after 1 measured case: written to {path} (complete: false)")
