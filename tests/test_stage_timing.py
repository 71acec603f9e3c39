"""runtime.stage_timing on the CPU: the stages cover the whole forward, and the CLI writes its table."""

import json

import pytest
import torch

from export.merge import inference_copy
from guidesr import model_for_preset
from runtime import stage_timing


def test_stages_add_up_to_the_whole_forward():
    model = inference_copy(model_for_preset("tiny"), torch.device("cpu"), torch.float32)
    rows = stage_timing.measure(model, torch.device("cpu"), "fp32", 64, 96, batch=2, repeats=1)
    by_stage = {row["stage"]: row for row in rows}
    assert list(by_stage) == ["guidance branch", "prompt", "VAE encoder", "UNet + long skip",
                              "VAE decoder + skips", "whole forward"]
    staged_flops = sum(row["flops"] for name, row in by_stage.items() if name != "whole forward")
    assert staged_flops == by_stage["whole forward"]["flops"] > 0
    assert all(row["ms"] > 0 for row in rows)
    assert abs(sum(row["share"] for row in rows if "share" in row) - 1) < 1e-9


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "stages.json"
    code = stage_timing.main(["--preset", "tiny", "--random-weights", "--device", "cpu", "--size", "64x48",
                              "--repeats", "1", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert [row["stage"] for row in data["rows"]][-1] == "whole forward"
    assert "| VAE decoder + skips |" in capsys.readouterr().out


def test_cli_rejects_a_size_off_the_multiple(capsys):
    with pytest.raises(SystemExit) as stop:
        stage_timing.main(["--preset", "tiny", "--random-weights", "--device", "cpu", "--size", "72x56"])
    assert stop.value.code == 2
    assert "size multiple" in capsys.readouterr().err
