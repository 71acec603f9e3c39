"""kernels.benchmark's command line on the CPU: it refuses to run, with status 2 as the other commands do."""

from __future__ import annotations

import pytest
import torch

from kernels import benchmark


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
