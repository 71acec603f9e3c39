"""--validate (runtime/validate.py): metrics by bands, and acceptance 3 through the command line.

Acceptance 3: `--validate` passes for the torch backend in fp32 and for onnxruntime with fp32 and
fp16 graphs, and fails (exit status 2, nothing written) when the backend's output is perturbed:
an ONNX graph with an offset added to its output, and a torch backend subclass whose output is
offset. The model is the real tiny GuideSR (embedded tiny-base, random trainable parts, saved as a
checkpoint); the image is 20x24 -> 80x96, in tiles of 64 (48 for the batched graph).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from PIL import Image

from export.graphs import OUTPUT_NAME, guidesr_graph
from export.onnx_export import export_graphs
from guidesr import metrics
from runtime.backends import TorchBackend
from runtime.imageio import read_image
from runtime.upscale import main, upscale_file
from runtime.validate import ReferenceBackend, ValidationError, ValidationReport, Validator, compare_images
from helpers import save_randomized_tiny


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_randomized_tiny(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def model(checkpoint):
    import guidesr

    return guidesr.load_model(checkpoint=checkpoint)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A 24x20 crop of scikit-image's astronaut (real image content, not noise)."""
    from skimage import data

    path = tmp_path_factory.mktemp("in") / "astronaut.png"
    Image.fromarray(data.astronaut()[120:220:5, 180:300:5]).save(path)
    return path


@pytest.fixture(scope="module")
def graphs(model, tmp_path_factory) -> dict[str, Path]:
    """Static 64x64 graphs, fp32 and fp16, exported by export's own function."""
    spec = guidesr_graph(model.config.size_multiple, (64, 64), "static")
    exported = export_graphs(model, tmp_path_factory.mktemp("onnx"), [spec], ["fp32", "fp16"], weights="test")
    return {graph.precision: graph.path for graph in exported}


# -------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("height,width", [(300, 40), (64, 64), (75, 11), (11, 30), (42, 40)])
def test_band_metrics_equal_guidesr_metrics_on_the_whole_image(height, width):
    rng = np.random.default_rng(height * width)
    reference = rng.random((height, width, 3), dtype=np.float32)
    output = np.clip(reference + rng.normal(0, 0.01, reference.shape).astype(np.float32), 0, 1)
    whole = [torch.from_numpy(a).permute(2, 0, 1)[None] for a in (output, reference)]
    psnr, ssim, max_abs = compare_images(output, reference, band_rows=32)
    assert psnr == pytest.approx(metrics.psnr(*whole), abs=1e-9)
    assert ssim == pytest.approx(metrics.ssim(*whole), abs=1e-9)
    assert max_abs == metrics.max_abs(*whole)


def test_band_metrics_of_identical_and_of_small_images():
    image = np.random.default_rng(0).random((20, 16, 3), dtype=np.float32)
    assert compare_images(image, image.copy()) == (float("inf"), pytest.approx(1.0), 0.0)
    assert compare_images(image[:8, :8], image[:8, :8] * 0.5)[1] is None  # smaller than the SSIM window


def test_a_psnr_equal_to_the_threshold_passes():
    """--min-psnr is the least PSNR that passes ("at least N dB")."""
    assert ValidationReport(psnr=60.0, ssim=None, max_abs=0.0, min_psnr=60.0).passed


@pytest.mark.parametrize("nan_row", [0, 40])
def test_band_metrics_of_an_output_with_nan_fail_and_say_nan(nan_row):
    """A NaN in any band makes PSNR and max-abs NaN (a failed validation), not a max-abs of the other bands."""
    reference = np.random.default_rng(1).random((64, 16, 3), dtype=np.float32)
    output = reference.copy()
    output[nan_row, 3, 1] = np.nan
    psnr, _, max_abs = compare_images(output, reference, band_rows=32)
    assert np.isnan(psnr) and np.isnan(max_abs)
    with pytest.raises(ValidationError, match="max-abs nan"):
        Validator(None, 40.0).check(output, reference)


# ----------------------------------------------------------------------------- acceptance 3 (the CLI)


def run_cli(photo: Path, output: Path, checkpoint: Path, *options: str) -> int:
    return main([str(photo), "-o", str(output), "--checkpoint", str(checkpoint), "--device", "cpu",
                 "--tile", "64", "--overlap", "16", "--validate", *options])


@pytest.mark.parametrize("options,threshold", [
    (["--backend", "torch", "--precision", "fp32"], 60),
    (["--backend", "onnxruntime", "--precision", "fp32", "--tile", "48", "--tile-batch", "2"], 60),
])
def test_validate_passes_for_torch_and_an_onnxruntime_export(photo, checkpoint, tmp_path, capsys, options, threshold):
    output = tmp_path / "out.png"
    code = run_cli(photo, output, checkpoint, "--onnx-cache", str(tmp_path / "cache"), *options)
    captured = capsys.readouterr()
    assert code == 0, captured
    assert f"PSNR at least {threshold} dB" in captured.out
    assert "validation PSNR" in captured.out and ": passed" in captured.out
    assert read_image(output)[0].shape == (80, 96, 3)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_validate_passes_for_exported_fp32_and_fp16_graphs(photo, checkpoint, graphs, tmp_path, capsys, precision):
    output = tmp_path / "out.png"
    code = run_cli(photo, output, checkpoint, "--backend", "onnxruntime", "--onnx", str(graphs[precision]))
    captured = capsys.readouterr()
    assert code == 0, captured
    assert f"using onnxruntime ({precision} on cpu" in captured.out
    psnr = float(captured.out.split("validation PSNR ")[1].split(" dB")[0])
    assert psnr >= {"fp32": 60, "fp16": 40}[precision]
    assert output.exists()


def offset_graph(source: Path, destination: Path, offset: float) -> Path:
    """The exported graph with `offset` added to its output (a real, perturbed ONNX graph)."""
    model = ir.load(source)  # the metadata (checkpoint, precision, graph spec) is kept
    output = model.graph.outputs[0]
    constant = ir.node("Constant", [], {"value": ir.tensor(np.array(offset, np.float32))})
    shifted = ir.node("Add", [output, constant.outputs[0]])
    model.graph.extend([constant, shifted])
    output.name = "r1_before_offset"
    shifted.outputs[0].name = OUTPUT_NAME
    shifted.outputs[0].dtype, shifted.outputs[0].shape = output.dtype, output.shape
    model.graph.outputs[0] = shifted.outputs[0]
    ir.save(model, destination)
    return destination


def test_validate_fails_for_a_perturbed_graph_and_writes_nothing(photo, checkpoint, graphs, tmp_path, capsys):
    perturbed = offset_graph(graphs["fp32"], tmp_path / "perturbed.onnx", 0.05)  # 0.025 in [0, 1]: ~32 dB
    output = tmp_path / "out.png"
    code = run_cli(photo, output, checkpoint, "--backend", "onnxruntime", "--onnx", str(perturbed))
    captured = capsys.readouterr()
    assert code == 1
    psnr = float(captured.err.split("astronaut.png: validation PSNR ")[1].split(" dB")[0])
    assert 25 < psnr < 40 and "FAILED: PSNR below 60 dB" in captured.err
    assert "nothing written" in captured.err and "0 written, 0 skipped (already there), 1 failed" in captured.out
    assert not output.exists()


# ------------------------------------------------------------------------------------------- the API


def test_a_static_graph_and_the_reference_see_the_same_padded_tile(model, graphs):
    """A 12x10 image (48x40 out) is padded up to the 64x64 graph; the reference gets the same padded
    tile, so what is measured is the graph, not the padding (GroupNorm and FCA see the whole tile)."""
    from runtime.backends import ONNXRuntimeBackend
    from runtime.upscale import upscale_array

    backend = ONNXRuntimeBackend(model, "cpu", onnx=graphs["fp32"])
    assert backend.tile_shape == (64, 64)
    validator = Validator(ReferenceBackend(model), min_psnr=60)
    image = np.random.default_rng(3).random((12, 10, 3), dtype=np.float32)
    # overlap 16: the default 64 does not fit the graph's 64x64 tile
    assert upscale_array(image, backend, overlap=16, validator=validator).shape == (48, 40, 3)
    assert validator.reports[-1].psnr > 80 and validator.reports[-1].max_abs < 1e-4


def test_the_reference_runs_with_the_triton_kernels_off_and_switches_them_back(model):
    """On CUDA the FCA blocks and injections run the Triton kernels where `use_kernel` is set; the reference is the
    PyTorch definition, so every switch is off while it runs (else --validate would check the kernels against
    themselves) and as it was afterwards: a switch that was off (report's --triton-kernels off) stays off. Seen
    here from the switches' state during the forward, not from which code ran: on the CPU both settings run the
    PyTorch code."""
    reference = ReferenceBackend(model)
    switches = [m for m in reference.model.modules() if hasattr(m, "use_kernel")]
    before = [m.use_kernel for m in switches]
    seen = []
    handle = reference.model.register_forward_pre_hook(lambda *_: seen.append([m.use_kernel for m in switches]))
    try:
        states = [True, False] * 3
        for m, state in zip(switches, states):
            m.use_kernel = state
        reference(torch.zeros(1, 3, 16, 16))
        assert len(switches) == 6 and seen == [[False] * 6]
        assert [m.use_kernel for m in switches] == states
    finally:
        handle.remove()
        for m, state in zip(switches, before):
            m.use_kernel = state


# ----------------------------------------------------------------------------- a perturbed subclass


class OffsetBackend(TorchBackend):
    """The torch backend with a constant added to its output, as a subtly broken backend would."""

    def __init__(self, model, offset: float):
        super().__init__(model, "cpu", "fp32")
        self.offset = offset

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        return super().__call__(tiles) + self.offset


def test_the_threshold_decides_for_a_slightly_offset_backend(photo, model, tmp_path):
    """An offset of 0.004 (0.002 in [0, 1], ~54 dB) fails the fp32 default of 60 dB and passes 40 dB."""
    backend = OffsetBackend(model, 0.004)
    strict = Validator(ReferenceBackend(model), min_psnr=60)
    with pytest.raises(ValidationError) as caught:
        upscale_file(photo, tmp_path / "strict.png", backend, tile=64, overlap=16, validator=strict)
    assert caught.value.path == str(photo) and 50 < caught.value.report.psnr < 60
    assert not (tmp_path / "strict.png").exists()

    lenient = Validator(ReferenceBackend(model), min_psnr=40)
    upscale_file(photo, tmp_path / "lenient.png", backend, tile=64, overlap=16, validator=lenient)
    assert lenient.reports[-1].passed and lenient.reports[-1].psnr == pytest.approx(strict.reports[-1].psnr)
    assert (tmp_path / "lenient.png").exists()


def test_min_psnr_needs_validate(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["x.png", "-o", "y.png", "--min-psnr", "30"])
    assert caught.value.code == 2 and "--min-psnr is the --validate threshold" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_a_min_psnr_that_is_not_a_finite_non_negative_number_is_refused(value, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["x.png", "-o", "y.png", "--validate", "--min-psnr", value])
    assert caught.value.code == 2 and f"argument --min-psnr: {value} must be >= 0" in capsys.readouterr().err
