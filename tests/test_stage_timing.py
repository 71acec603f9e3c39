"""runtime.stage_timing on the CPU: the stages cover the whole forward, and the CLI writes its table."""

import json
import re

import pytest
import torch

from export.merge import inference_copy
from guidesr import model_for_preset
from runtime import stage_timing

from helpers import refuse_report_model_loading, status_after_ctrl_c


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
    assert data["title"].endswith(", CPU, no Triton kernels (the fused ops run as plain PyTorch on the CPU)")
    assert "| VAE decoder + skips |" in capsys.readouterr().out


def test_cli_rejects_a_size_off_the_multiple(capsys):
    with pytest.raises(SystemExit) as stop:
        stage_timing.main(["--preset", "tiny", "--random-weights", "--device", "cpu", "--size", "72x56"])
    assert stop.value.code == 2
    assert "size multiple" in capsys.readouterr().err


@pytest.mark.parametrize("name,category", [
    # kernel names from the H200 profile of the compiled sd-turbo forward (docs/results/2026-11-26-h200-session2)
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64", "attention"),
    ("fmha_cutlassF_f16_aligned_32x128_gmem_sm80(PyTorchMemEffAttention::AttentionKernel", "attention"),
    ("nvjet_sm90_hsh_168x128_64x5_1x2_h_bz_coopA_bias_TNN", "matmul"),
    ("triton_per_fused_clone_convolution_native_group_norm_silu_7", "normalisation"),
    ("triton_red_fused__to_copy_var_mean_12", "normalisation"),
    ("triton_poi_fused_convolution_gelu_mul_sigmoid_unsqueeze_54", "other Inductor kernels"),
    ("Memset (Device)", "copies and memsets"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda, c10::convert>",
     "copies and memsets"),
])
def test_kernel_categories(name, category):
    assert stage_timing.kernel_category(name) == category


@pytest.mark.parametrize("target, message", [
    ("{tmp}", "--json {tmp}: is a folder"),
    ("{tmp}/file/stages.json", "--json {tmp}/file/stages.json: {tmp}/file is not a folder"),
])
def test_cli_refuses_a_json_it_cannot_write_before_the_model_loads(target, message, tmp_path, capsys, monkeypatch):
    refuse_report_model_loading(monkeypatch, "--json was checked")
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as stop:
        stage_timing.main(["--preset", "tiny", "--random-weights", "--device", "cpu", "--size", "64",
                           "--json", target.format(tmp=tmp_path)])
    assert stop.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_cli_refuses_an_existing_json_before_the_model_loads_unless_overwrite(tmp_path, capsys, monkeypatch):
    refuse_report_model_loading(monkeypatch, "--json was checked")
    earlier = tmp_path / "stages.json"
    earlier.write_text('{"earlier": "rows"}')
    argv = ["--preset", "tiny", "--random-weights", "--device", "cpu", "--size", "64", "--json", str(earlier)]
    with pytest.raises(SystemExit) as stop:
        stage_timing.main(argv)
    assert stop.value.code == 2
    assert f"--json {earlier}: exists (use --overwrite to replace it)" in capsys.readouterr().err
    assert earlier.read_text() == '{"earlier": "rows"}'
    with pytest.raises(AssertionError, match="the model was loaded before --json was checked"):
        stage_timing.main([*argv, "--overwrite"])  # past the check, to the model


def test_help_says_what_batch_is(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as stop:
        stage_timing.main(["--help"])
    assert stop.value.code == 0
    assert re.search(r"\n  --batch BATCH +images of --size per forward \(default 1;", capsys.readouterr().out)


def test_profile_compiled_needs_cuda(capsys):
    with pytest.raises(SystemExit) as stop:
        stage_timing.main(["--preset", "tiny", "--random-weights", "--device", "cpu", "--size", "64",
                           "--profile-compiled", "2"])
    assert stop.value.code == 2
    assert "--profile-compiled needs a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_profile_compiled_accounts_for_the_forward():
    model = model_for_preset("tiny")
    profile = stage_timing.profile_compiled(model, torch.device("cuda"), "fp16", 64, 96, batch=1, replays=3)
    assert profile["gpu_ms_per_forward"] > 0 and profile["categories_ms"]["convolution"] > 0
    assert sum(profile["categories_ms"].values()) == pytest.approx(profile["gpu_ms_per_forward"])
    assert any(op["op"] == "aten::convolution" or "conv" in op["op"] for op in profile["ops"]), profile["ops"][:5]
    assert all(isinstance(op, str) and count > 0 for op, count in profile["memset_launchers"].items())
    calls = profile["call_ms"]
    assert set(calls) == {"graph replay", "device tensors", "CPU tensors"} and all(ms > 0 for ms in calls.values())
    text = stage_timing.format_profile(profile)
    assert "| convolution |" in text and "whole calls, median ms" in text


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "/nonexistent/model.json", "--device", "cpu"],
     "checkpoint description /nonexistent/model.json does not exist"),
    (["--preset", "bogus", "--random-weights", "--device", "cpu"], "argument --preset: invalid choice: 'bogus'"),
    (["--preset", "tiny", "--random-weights", "--device", "cuda:x"], "is not a device"),
] + ([] if torch.cuda.is_available() else
     [(["--preset", "tiny", "--random-weights", "--device", "cuda"], "--device cuda: CUDA is not available")]))
def test_cli_turns_a_bad_model_or_device_into_an_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        stage_timing.main([*argv, "--size", "64"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "python -m runtime.stage_timing: error: " in err and message in err


def test_table_names_the_precision_of_the_matmul_rate():
    rows = [{"stage": "unet", "ms": 1.0, "flops": 2e9, "tflop_s": 2.0, "share": 1.0}]
    assert stage_timing.format_table(rows, "t", 700.0, "fp32").endswith("measured fp32 matmul rate: 700 TFLOP/s")


def test_ctrl_c_while_timing_the_stages_is_one_line_and_130_and_writes_nothing(tmp_path, capsys, monkeypatch):
    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(stage_timing, "measure", ctrl_c)
    assert status_after_ctrl_c(stage_timing.main, ["--preset", "tiny", "--random-weights", "--device", "cpu", "--size",
                                                   "64", "--json", str(tmp_path / "stages.json")]) == 130
    assert capsys.readouterr().err == "interrupted (SIGINT): nothing written\n"
    assert not (tmp_path / "stages.json").exists()
