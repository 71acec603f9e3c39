"""python -m guidesr.evaluate: its command line."""

import re

import numpy as np
import pytest
from PIL import Image

from guidesr.evaluate import evaluate, main
from guidesr.loading import load_model

from helpers import status_after_ctrl_c


def test_help_names_the_module_and_states_every_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m guidesr.evaluate ")
    options = re.split(r"\n  (?=--)", text.split("\noptions:\n", 1)[1])[1:]
    assert [o.split()[0] for o in options] == ["--checkpoint", "--preset", "--base-model", "--data", "--crop-size",
                                               "--seed", "--draws", "--json", "--overwrite"]
    for option in options:
        assert "default" in option, option
    assert any(o.startswith("--data") and "(default sample)" in o for o in options)
    assert any(o.startswith("--crop-size") and "(default 256)" in o for o in options)
    assert any(o.startswith("--seed") and "(default 0)" in o for o in options)


@pytest.mark.parametrize("crop", ["30", "16", "0"])
def test_a_crop_size_the_evaluation_cannot_use_is_an_argparse_error(crop, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--crop-size", crop])
    assert exit_info.value.code == 2
    assert ("--crop-size: the crop size must be a multiple of 4 (the degradation scale) and at least 20"
            in capsys.readouterr().err)


def test_draws_below_one_are_refused_before_the_model_loads(capsys, monkeypatch):
    import guidesr.evaluate as evaluate_module

    def no_model(*args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(evaluate_module, "load_model", no_model)
    with pytest.raises(SystemExit) as exit_info:
        main(["--draws", "0"])
    assert exit_info.value.code == 2 and "argument --draws: 0 must be >= 1" in capsys.readouterr().err


def test_unusable_images_are_an_argparse_error_naming_each_file(tmp_path, capsys):
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "fine.png")
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(tmp_path), "--crop-size", "64"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: 2 of 3 images cannot be used for 64x64 crops" in err
    assert "small.png: 24x24" in err and "broken.png: cannot read image" in err
    with pytest.raises(SystemExit):
        main(["--data", str(tmp_path / "fine.png")])
    assert "fine.png is not a folder" in capsys.readouterr().err


def test_evaluate_refuses_a_crop_its_metrics_cannot_use():
    model = load_model(None, None, None)
    with pytest.raises(ValueError, match="multiple of 4 .* got 30"):
        evaluate(model, crop_size=30)


def test_a_checkpoint_that_cannot_load_is_an_error_line_not_a_traceback(tmp_path, capsys):
    import json

    from guidesr.config import preset_config
    from guidesr.loading import DEFAULT_CHECKPOINT

    record = json.loads(DEFAULT_CHECKPOINT.read_text())
    record["config"] = preset_config("sd-turbo").to_dict()
    record["base_model"] = None
    (tmp_path / "other.json").write_text(json.dumps(record))
    for argv, message in [(["--checkpoint", str(tmp_path / "other.json")], "names no base model; pass --base-model"),
                          (["--checkpoint", str(tmp_path / "missing.json")], "does not exist"),
                          (["--preset", "sd-turbo"], "is for preset 'tiny', not 'sd-turbo'")]:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--draws", "1", "--crop-size", "64"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m guidesr.evaluate: error: ") and message in err and "Traceback" not in err


def test_a_json_target_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import guidesr.evaluate as evaluate_module

    def no_model(*args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(evaluate_module, "load_model", no_model)
    (tmp_path / "file").write_text("")
    for target, message in [(tmp_path, "is a folder"),
                            (tmp_path / "file" / "out.json", f"{tmp_path / 'file'} is not a folder")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--json", str(target)])
        assert exit_info.value.code == 2 and f"--json {target}: {message}" in capsys.readouterr().err


def test_an_existing_json_is_refused_before_the_model_loads_unless_overwrite(tmp_path, capsys, monkeypatch):
    import guidesr.evaluate as evaluate_module

    def model_loads(*args):
        raise RuntimeError("the model loads")

    monkeypatch.setattr(evaluate_module, "load_model", model_loads)
    earlier = tmp_path / "eval.json"
    earlier.write_text('{"earlier": "results"}')
    with pytest.raises(SystemExit) as exit_info:
        main(["--json", str(earlier)])
    assert exit_info.value.code == 2
    assert f"--json {earlier}: exists (use --overwrite to replace it)" in capsys.readouterr().err
    assert earlier.read_text() == '{"earlier": "results"}'
    with pytest.raises(RuntimeError, match="the model loads"):
        main(["--json", str(earlier), "--overwrite"])


def test_scores_are_per_image_means_over_their_own_draws_with_a_scale_border():
    """Every number of the table recomputed from the evaluation set (image-major,
    `draws` per image), with the metrics' border of `scale` pixels; also the smallest allowed crop."""
    import torch

    from guidesr.evaluate import evaluation_set
    from guidesr.metrics import psnr, ssim

    model = load_model(None, None, None)
    results = evaluate(model, crop_size=20, draws=2, seed=3)
    names, lq, hr = evaluation_set("sample", 20, seed=3, draws=2)
    assert [row["image"] for row in results["images"]] == names and lq.shape[0] == 2 * len(names)
    with torch.no_grad():
        restored = model(lq).r1
    for i, row in enumerate(results["images"]):
        for method, output in (("bicubic", lq.clamp(-1, 1)), ("model", restored)):
            a, b = (output[2 * i : 2 * i + 2] + 1) / 2, (hr[2 * i : 2 * i + 2] + 1) / 2
            assert row[method]["psnr_rgb"] == pytest.approx(psnr(a, b, crop=4), abs=1e-4), (row["image"], method)
            assert row[method]["ssim_y"] == pytest.approx(ssim(a, b, crop=4, y_channel=True), abs=1e-5)
    for method in ("bicubic", "model"):
        mean = sum(row[method]["psnr_y"] for row in results["images"]) / len(names)
        assert results["mean"][method]["psnr_y"] == pytest.approx(mean, rel=1e-12)


def test_a_model_output_with_nan_is_an_error_and_no_json_is_written(tmp_path, capsys, monkeypatch):
    import torch

    import guidesr.evaluate as evaluate_module

    model = load_model(None, None, None)
    with torch.no_grad():
        model.prompt.embedding.fill_(float("nan"))  # a diverged training run
    monkeypatch.setattr(evaluate_module, "load_model", lambda *args: model)
    with pytest.raises(SystemExit) as exit_info:
        main(["--crop-size", "20", "--draws", "1", "--json", str(tmp_path / "results.json")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "error: the model's output for coffee (draw 1 of 1) has NaN/Inf; no results written" in err
    assert not (tmp_path / "results.json").exists()


def test_results_record_the_environment_and_fingerprints_that_split_input_from_model_changes(tmp_path, monkeypatch):
    """The JSON names what the numbers were measured on; its input digests are those of the evaluation set and move
    with the degradation seed only, and the weights' digest with the model only."""
    import json
    import platform

    import numpy
    import PIL
    import skimage
    import torch

    import guidesr.evaluate as evaluate_module
    from guidesr.evaluate import evaluation_set

    model = load_model(None, None, None)
    monkeypatch.setattr(evaluate_module, "load_model", lambda *args: model)
    main(["--crop-size", "20", "--draws", "2", "--seed", "3", "--json", str(tmp_path / "a.json")])
    first = json.loads((tmp_path / "a.json").read_text())
    env = first["environment"]
    assert env["python"] == platform.python_version() and env["torch_threads"] == torch.get_num_threads()
    assert env["versions"] == {"torch": torch.__version__, "numpy": numpy.__version__, "PIL": PIL.__version__,
                               "skimage": skimage.__version__}
    assert env["cpu"] and env["platform"] == platform.platform()
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()

    from guidesr.checkpoint import tensors_sha256

    _, lq, hr = evaluation_set("sample", 20, seed=3, draws=2)
    fingerprints = first["fingerprints"]
    assert fingerprints["lq_sha256"] == tensors_sha256({"lq": lq})
    assert fingerprints["hr_sha256"] == tensors_sha256({"hr": hr})
    assert [draw["lq_sha256"] for row in first["images"] for draw in row["draws"]] == [
        tensors_sha256({"lq": lq[i : i + 1]}) for i in range(len(lq))]

    again = evaluate(model, crop_size=20, draws=2, seed=3)
    assert again["fingerprints"] == fingerprints
    other_seed = evaluate(model, crop_size=20, draws=2, seed=4)["fingerprints"]
    assert other_seed["lq_sha256"] != fingerprints["lq_sha256"]
    assert (other_seed["hr_sha256"], other_seed["weights_sha256"]) == (fingerprints["hr_sha256"],
                                                                        fingerprints["weights_sha256"])
    with torch.no_grad():
        model.prompt.embedding.mul_(1.5)
    other_model = evaluate(model, crop_size=20, draws=2, seed=3)
    assert other_model["fingerprints"]["weights_sha256"] != fingerprints["weights_sha256"]
    assert {k: other_model["fingerprints"][k] for k in ("lq_sha256", "hr_sha256")} == {
        k: fingerprints[k] for k in ("lq_sha256", "hr_sha256")}
    assert other_model["images"][0]["draws"][0]["model"] != first["images"][0]["draws"][0]["model"]


def test_ctrl_c_during_the_evaluation_is_one_line_and_130_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import guidesr.evaluate as evaluate_module

    model = load_model(None, None, None)

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "forward", ctrl_c)
    monkeypatch.setattr(evaluate_module, "load_model", lambda *args: model)
    argv = ["--crop-size", "20", "--draws", "1", "--json", str(tmp_path / "results.json")]
    assert status_after_ctrl_c(main, argv) == 130
    assert capsys.readouterr().err == "interrupted (SIGINT): no results written\n"
    assert not (tmp_path / "results.json").exists()


def test_an_output_identical_to_its_hr_crop_is_inf_in_the_table_and_null_in_the_json(tmp_path, capsys):
    """A black crop that seed 3's degradation leaves black: bicubic equals the HR crop, its PSNR is infinite."""
    import json

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "black.png")
    assert main(["--data", str(tmp_path), "--crop-size", "64", "--seed", "3", "--draws", "1",
                 "--json", str(tmp_path / "results.json")]) == 0
    out = capsys.readouterr().out
    assert "| black.png | bicubic | inf | 1.0000 | inf | 1.0000 |" in out
    assert "model - bicubic: -inf dB PSNR (RGB)" in out
    results = json.loads((tmp_path / "results.json").read_text())
    for scores in (results["images"][0]["draws"][0]["bicubic"], results["images"][0]["bicubic"],
                   results["mean"]["bicubic"]):
        assert scores == {"psnr_rgb": None, "ssim_rgb": 1.0, "psnr_y": None, "ssim_y": 1.0}
    assert results["mean"]["model"]["psnr_rgb"] > 0


def test_the_gain_line_of_two_infinite_means_says_it_is_undefined():
    from guidesr.evaluate import format_table

    identical = {"psnr_rgb": float("inf"), "ssim_rgb": 1.0, "psnr_y": float("inf"), "ssim_y": 1.0}
    results = {"images": [{"image": "flat.png", "model": identical, "bicubic": identical}],
               "mean": {"model": identical, "bicubic": identical}, "draws": 1, "degradation_seed": 0}
    table = format_table(results)
    assert "| flat.png | model | inf | 1.0000 | inf | 1.0000 |" in table
    assert "model - bicubic: undefined (both mean PSNRs are infinite) (RGB); 1 degradation draw per image" in table
