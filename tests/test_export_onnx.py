"""Issue 4: exported ONNX graphs against PyTorch (fp32 and fp16), their structure, Polygraphy, the CLI.

One module-scoped export of a random-weight tiny model (trainable tensors randomised, so the
injections and zero-convs are exercised) writes fp32 and fp16 graphs: a static graph for each of
three tile sizes and one dynamic graph.
"""

import argparse
import collections
import copy
import importlib.util
import math
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from export import onnx_export
from export.__main__ import (EXIT_INTERRUPTED, EXIT_MISSING_PACKAGE, EXIT_USAGE, build_parser, largest_tensor,
                             load_from_args, main)
from export.engine_metadata import EngineMismatchError, graph_sha256
from export.fp16 import FP32_ISLANDS
from export.graphs import GraphSpec, guidesr_graph
from export.onnx_export import OPSET, export_graphs, read_metadata
from export.trt_supported_ops import tensorrt_problems
from export.verify import compare
from guidesr.checkpoint import CheckpointError, weights_sha256
from guidesr.loading import DEFAULT_CHECKPOINT
from helpers import randomized_tiny, status_after_ctrl_c

REPO = Path(__file__).resolve().parents[1]
SIZES = [(64, 64), (48, 80), (96, 64)]  # multiples of the tiny preset's 16, one non-square each way
FP32_MAX_ABS = 1e-4
FP16_MIN_PSNR = 40.0


@pytest.fixture(scope="module")
def model():
    return randomized_tiny(0)


@pytest.fixture(scope="module")
def graphs(model, tmp_path_factory):
    """{(precision, variant, (H, W)): ExportedGraph}; the dynamic graph is keyed by every size."""
    specs = [guidesr_graph(16, size, "static") for size in SIZES] + [guidesr_graph(16, SIZES[0], "dynamic")]
    exported = export_graphs(model, tmp_path_factory.mktemp("onnx"), specs, weights="test: random tiny")
    table = {}
    for graph in exported:
        sizes = SIZES if graph.spec.variant == "dynamic" else [graph.spec.tile]
        table.update({(graph.precision, graph.spec.variant, size): graph for size in sizes})
    return table


@pytest.fixture(scope="module")
def references(model):
    """{(H, W): (image, R1 of the PyTorch fp32 model)}, the unmerged, unrewritten model."""
    generator = torch.Generator().manual_seed(7)
    table = {}
    for height, width in SIZES:
        image = torch.rand(1, 3, height, width, generator=generator) * 2 - 1
        with torch.no_grad():
            table[(height, width)] = image, model(image).r1.numpy()
    return table


def run_onnx(path: Path, image: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["r1"], {"image": image.numpy()})[0]


def psnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    """dB, with R1 mapped from [-1, 1] to [0, 1]."""
    mse = np.mean(np.square((candidate.astype(np.float64) - reference) / 2))
    return float(10 * np.log10(1 / mse))


@pytest.mark.parametrize("variant", ["static", "dynamic"])
@pytest.mark.parametrize("size", SIZES)
def test_fp32_graph_matches_pytorch(graphs, references, variant, size):
    """Acceptance 2: ONNX fp32 on ONNX Runtime vs PyTorch fp32, max-abs <= 1e-4 on R1."""
    image, expected = references[size]
    got = run_onnx(graphs[("fp32", variant, size)].path, image)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= FP32_MAX_ABS


@pytest.mark.parametrize("variant", ["static", "dynamic"])
@pytest.mark.parametrize("size", SIZES)
def test_fp16_graph_psnr_against_pytorch_fp32(graphs, references, variant, size):
    """Acceptance 3: ONNX fp16 (ONNX Runtime CPU) vs PyTorch fp32, PSNR >= 40 dB on R1 in [0, 1], finite."""
    image, expected = references[size]
    got = run_onnx(graphs[("fp16", variant, size)].path, image)
    assert np.isfinite(got).all()
    assert psnr(expected, got) >= FP16_MIN_PSNR
    assert np.abs(got - expected).max() > 1e-4, "the fp16 graph really computes in half precision"


def test_a_graph_of_another_model_fails_the_comparison(graphs, references):
    """The fp32 bound is tight enough to catch a model that is only slightly different."""
    other = randomized_tiny(5)
    image, _ = references[SIZES[0]]
    with torch.no_grad():
        expected = other(image).r1.numpy()
    assert np.abs(run_onnx(graphs[("fp32", "static", SIZES[0])].path, image) - expected).max() > FP32_MAX_ABS


def unique_graphs(graphs):
    return list({graph.path: graph for graph in graphs.values()}.values())


def test_every_graph_passes_the_checker_and_tensorrt_op_check(graphs):
    """Acceptance 4 (op set): every exported graph parses in TensorRT's ONNX parser, by the documented list."""
    exported = unique_graphs(graphs)
    assert len(exported) == 8
    for graph in exported:
        onnx.checker.check_model(str(graph.path), full_check=True)
        assert tensorrt_problems(graph.path) == [], graph.path.name


def test_graph_io_and_metadata_follow_the_spec(graphs, model):
    for graph in unique_graphs(graphs):
        proto = onnx.load(str(graph.path))
        assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
        for values, tensors in ((proto.graph.input, graph.spec.inputs), (proto.graph.output, graph.spec.outputs)):
            assert [v.name for v in values] == [t.name for t in tensors]
            for value, tensor in zip(values, tensors):
                assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
                dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
                assert dims == list(tensor.dims)
        metadata = read_metadata(graph.path)
        assert metadata["preset"] == "tiny" and metadata["scale"] == "4" and metadata["size_multiple"] == "16"
        assert metadata["precision"] == graph.precision
        assert metadata["checkpoint_sha256"] == "none" and metadata["weights"] == "test: random tiny"
        assert metadata["guidesr_version"] == "0.1.0"
        assert GraphSpec.from_json(metadata["graph_spec"]) == graph.spec



def test_rewrites_show_in_the_graph(graphs):
    """Strided convs instead of PixelUnshuffle + concat, and the time embedding folded away."""
    for graph in unique_graphs(graphs):
        proto = onnx.load(str(graph.path))
        op_types = [node.op_type for node in proto.graph.node]
        assert not {"SpaceToDepth", "DepthToSpace", "Sin", "Cos", "Constant", "Identity"} & set(op_types)
        assert op_types.count("Gemm") == 4  # FCA's gates; the time embedding's Gemms are folded
        strides = sorted(tuple(a.ints) for node in proto.graph.node if node.op_type == "Conv"
                         for a in node.attribute if a.name == "strides" and a.ints[0] > 2)
        assert strides == [(8, 8), (16, 16)]
        if graph.spec.variant == "static":
            assert "Shape" not in op_types


def test_fp16_graph_is_half_with_explicit_fp32_islands(graphs):
    for graph in unique_graphs(graphs):
        if graph.precision != "fp16":
            continue
        model = onnx.shape_inference.infer_shapes(onnx.load(str(graph.path)))
        types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input,
                                                                   *model.graph.output)}
        types.update({t.name: t.data_type for t in model.graph.initializer})
        producers = {out: node for node in model.graph.node for out in node.output}
        consumers = {}
        for node in model.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        conv_weights = [types[node.input[1]] for node in model.graph.node if node.op_type == "Conv"]
        assert set(conv_weights) == {onnx.TensorProto.FLOAT16}
        islands = [node for node in model.graph.node if node.op_type in FP32_ISLANDS]
        assert len(islands) == 57 + 12 + 10 + 4  # GroupNorms, LayerNorms, softmaxes, FCA pools
        for node in islands:
            assert types[node.input[0]] == onnx.TensorProto.FLOAT and types[node.output[0]] == onnx.TensorProto.FLOAT
            cast_in = producers[node.input[0]]
            assert cast_in.op_type == "Cast" and types[cast_in.input[0]] == onnx.TensorProto.FLOAT16
            assert {c.op_type for c in consumers[node.output[0]]} == {"Cast"}
            assert all(types[c.output[0]] == onnx.TensorProto.FLOAT16 for c in consumers[node.output[0]])


def test_polygraphy_comparison_passes_and_catches_a_wrong_reference(graphs, model):
    sizes = [(64, 64), (32, 48)]
    dynamic = compare(model, graphs[("fp32", "dynamic", SIZES[0])].path, sizes)
    assert [(c.shape, c.passed) for c in dynamic] == [((1, 3, 64, 64), True), ((1, 3, 32, 48), True)]
    assert all(c.max_abs <= FP32_MAX_ABS for c in dynamic)
    # without sizes: the dynamic graph's own opt size and half its height (its spec, not the command's --tile)
    opt_height, opt_width = SIZES[0]
    assert [c.shape for c in compare(model, graphs[("fp32", "dynamic", SIZES[0])].path, None)] == [
        (1, 3, opt_height, opt_width), (1, 3, opt_height // 2 // 16 * 16, opt_width)]
    (half,) = compare(model, graphs[("fp16", "static", SIZES[1])].path, sizes)
    assert half.passed and half.psnr >= FP16_MIN_PSNR and half.shape == (1, 3, 48, 80)
    # Polygraphy logs its own PSNR (its peak: the reference's maximum); the line says which of the two it prints
    assert half.describe().endswith(f"PSNR {half.psnr:.2f} dB at peak 1  (Polygraphy's PSNR, peak the reference's "
                                    f"maximum, >= 40 dB)")
    other, graph = randomized_tiny(5), graphs[("fp32", "static", SIZES[0])].path
    with pytest.raises(ValueError, match="holds other weights than the reference model"):
        compare(other, graph, sizes)
    # given the graph's weights_sha256 as the model's, compare skips past its weights check to the comparison
    (wrong,) = compare(other, graph, sizes, weights_digest=read_metadata(graph)["weights_sha256"])
    assert not wrong.passed and wrong.max_abs > FP32_MAX_ABS


def test_verify_refuses_a_graph_or_engine_of_the_same_checkpoint_on_other_base_weights(graphs, model, tmp_path,
                                                                                       monkeypatch, capsys):
    other_base = copy.deepcopy(model)
    with torch.no_grad():
        other_base.vae.decoder.conv_out.bias.add_(0.25)
    assert other_base.descriptor.checkpoint_sha256 == model.descriptor.checkpoint_sha256
    graph = graphs[("fp32", "static", SIZES[0])].path
    graph_weights, other_weights = weights_sha256(model), weights_sha256(other_base)
    monkeypatch.setattr("export.__main__.load_from_args", lambda args: (other_base, "test: another base"))
    assert main(["verify", "--onnx", str(graph)]) == EXIT_USAGE
    assert (f"error: {graph.name} holds other weights than the reference model (weights {graph_weights[:12]}, the "
            f"model's are {other_weights[:12]}): the same checkpoint on another --base-model, or untrained weights of "
            f"another seed; pass the --base-model (or --seed) it was exported from, or export it again from this "
            f"model") in capsys.readouterr().err
    engine = _engine_next_to(graphs[("fp16", "static", SIZES[0])], tmp_path, checkpoint_sha256="none")
    assert main(["verify", "--tile", "64", "--out-dir", str(tmp_path), "--engine", str(engine)]) == EXIT_USAGE
    assert (f"error: the TensorRT engine for {engine.with_suffix('.onnx').name} holds another model: it holds other "
            f"weights than the model (weights sha256 {graph_weights[:12]}…, the model's are sha256 "
            f"{other_weights[:12]}…)") in capsys.readouterr().err


def test_verify_asks_to_export_again_a_graph_without_weights_sha256(graphs, tmp_path, capsys, no_model_loading):
    proto = onnx.load(str(graphs[("fp32", "static", SIZES[0])].path))
    kept = [prop for prop in proto.metadata_props if prop.key != "weights_sha256"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    assert main(["verify", "--random-weights", "--preset", "tiny", "--onnx", str(old)]) == EXIT_USAGE
    assert ("error: old.onnx was exported by an older guidesr: its metadata lacks weights_sha256 (the sha256 of the "
            "weights it holds), so it cannot be checked against the model; export it again (`python -m export onnx`)"
            ) in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="TensorRT is installed here; this checks what `make engine` does without it")
def test_engine_command_without_tensorrt_writes_onnx_then_fails_clearly(tmp_path):
    """Acceptance 5: `python -m export engine` (what `make engine` runs) on the tiny model."""
    command = [sys.executable, "-m", "export", "engine", "--random-weights", "--preset", "tiny",
               "--tile", "32", "--out-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    written = tmp_path / "tiny-static-b1-32x32-fp16.onnx"
    assert result.returncode == EXIT_MISSING_PACKAGE, result.stderr
    assert f"wrote {written}" in result.stdout
    assert "TensorRT's Python package is not installed" in result.stderr
    assert "pip install tensorrt-cu12" in result.stderr
    assert "make engine" not in result.stderr
    rerun = shlex.join(command[3:])
    assert f"{written} is written; once TensorRT is installed, rerun this command" in result.stderr
    assert f"\n    python -m export {rerun}" in result.stderr
    onnx.checker.check_model(str(written), full_check=True)
    assert read_metadata(written)["precision"] == "fp16"


def test_cli_refuses_a_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    assert main(["onnx", "--checkpoint", str(missing), "--out-dir", str(tmp_path)]) == 2
    assert f"checkpoint description {missing} does not exist" in capsys.readouterr().err
    assert main(["onnx", "--random-weights", "--out-dir", str(tmp_path)]) == 2
    assert "--random-weights needs --preset" in capsys.readouterr().err


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(args):
        raise AssertionError("the model was loaded before the command line was checked")

    monkeypatch.setattr("export.__main__.load_from_args", refuse)


def test_verify_checks_the_files_it_is_given_before_loading_the_model(tmp_path, capsys, no_model_loading):
    model = ["--random-weights", "--preset", "tiny", "--tile", "32", "--out-dir", str(tmp_path)]
    engine = tmp_path / "x.engine"
    assert main(["verify", *model, "--engine", str(engine)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"no such file: {engine}, {tmp_path / 'x.onnx'}, {tmp_path / 'x.engine.json'}" in err
    assert main(["verify", *model, "--onnx", str(tmp_path / "a.onnx")]) == EXIT_USAGE
    assert f"no such file: {tmp_path / 'a.onnx'} (given with --onnx or --engine" in capsys.readouterr().err
    engine.write_bytes(b"")
    (tmp_path / "x.onnx").write_bytes(b"")
    (tmp_path / "x.engine.json").write_text("{")
    assert main(["verify", *model, "--engine", str(engine)]) == EXIT_USAGE
    assert "x.engine.json is not valid JSON" in capsys.readouterr().err
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "foreign",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])), str(foreign))
    assert main(["verify", *model, "--onnx", str(foreign)]) == EXIT_USAGE
    assert ("foreign.onnx is not a GuideSR graph written by `python -m export onnx` (its metadata lacks preset, "
            "size_multiple, precision, checkpoint_sha256, graph_spec, weights_sha256)") in capsys.readouterr().err


@pytest.mark.parametrize("command", ["onnx", "engine"])
def test_an_out_dir_that_cannot_be_a_folder_is_refused_before_loading_the_model(command, tmp_path, capsys,
                                                                                 no_model_loading):
    (tmp_path / "file").write_text("")
    for out_dir in (tmp_path / "file", tmp_path / "file" / "graphs"):
        assert main([command, "--random-weights", "--preset", "tiny", "--out-dir", str(out_dir)]) == EXIT_USAGE
        assert f"error: --out-dir {out_dir}: {tmp_path / 'file'} is not a folder" in capsys.readouterr().err


def test_verify_without_polygraphy_says_what_to_install_before_loading_the_model(tmp_path, capsys, monkeypatch,
                                                                                 no_model_loading):
    for name in ["polygraphy", *(name for name in sys.modules if name.startswith("polygraphy."))]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "export.verify", raising=False)
    argv = ["verify", "--random-weights", "--preset", "tiny", "--tile", "32", "--out-dir", str(tmp_path)]
    assert main(argv) == EXIT_MISSING_PACKAGE
    err = capsys.readouterr().err
    assert err.startswith("error: verify needs Polygraphy and ONNX Runtime (")
    assert err.endswith("; pip install polygraphy onnxruntime\n")


def test_a_timing_cache_that_cannot_be_saved_is_refused_before_loading_the_model(tmp_path, capsys, no_model_loading):
    (tmp_path / "file").write_text("")
    engine = ["engine", "--random-weights", "--preset", "tiny", "--out-dir", str(tmp_path)]
    assert main([*engine, "--timing-cache", str(tmp_path)]) == EXIT_USAGE
    assert (f"error: --timing-cache {tmp_path} is a folder; name the cache file, e.g. "
            f"{tmp_path / 'tensorrt-timing.cache'}") in capsys.readouterr().err
    assert main([*engine, "--timing-cache", str(tmp_path / "file" / "timing.cache")]) == EXIT_USAGE
    assert (f"error: --timing-cache {tmp_path / 'file' / 'timing.cache'}: {tmp_path / 'file'} is not a folder"
            in capsys.readouterr().err)


@pytest.mark.parametrize("argv, message", [
    (["onnx", "--batch", "0", "--variant", "static", "--precision", "fp32"], "argument --batch: 0 must be >= 1"),
    (["engine", "--batch", "0"], "argument --batch: 0 must be >= 1"),
    (["engine", "--batch", "two"], "argument --batch: 'two' is not an integer"),
    (["onnx", "--max-batch", "-1"], "argument --max-batch: -1 must be >= 1"),
    (["onnx", "--tile", "0"], "argument --tile: tile '0' must have a positive height and width"),
    (["engine", "--tile", "32x-16"], "argument --tile: tile '32x-16' must have a positive height and width"),
    (["verify", "--sizes", "32", "0x32"], "argument --sizes: size '0x32' must have a positive height and width"),
    (["engine", "--workspace-gib", "0"], "argument --workspace-gib: 0 must be > 0"),
    (["engine", "--workspace-gib", "nan"], "argument --workspace-gib: nan must be > 0"),
])
def test_cli_refuses_sizes_below_one_as_usage_errors(argv, message, capsys, no_model_loading):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--random-weights", "--preset", "tiny"])
    assert exit_info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m export") and f"error: {message}\n" in err


def test_every_option_has_help_that_states_its_default():
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in commands.choices.items():
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help and "default" in action.help, f"{name} {action.option_strings}: {action.help!r}"


def test_cli_loads_the_embedded_checkpoint_by_default():
    if not DEFAULT_CHECKPOINT.exists():
        pytest.skip(f"the embedded demo checkpoint {DEFAULT_CHECKPOINT} is not there (yet)")
    model, weights = load_from_args(build_parser().parse_args(["onnx"]))
    assert weights == f"checkpoint {DEFAULT_CHECKPOINT.name}"
    assert model.config.preset == "tiny" and model.checkpoint_sha256 is not None


def test_cli_without_the_embedded_checkpoint_says_what_to_pass():
    if DEFAULT_CHECKPOINT.exists():
        pytest.skip(f"the embedded demo checkpoint {DEFAULT_CHECKPOINT} exists")
    with pytest.raises(CheckpointError, match="--random-weights --preset tiny"):
        load_from_args(build_parser().parse_args(["onnx"]))


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_engine_matches_pytorch_and_onnx(graphs, model, tmp_path):
    import tensorrt as trt

    from export import engine_metadata
    from export.tensorrt_build import build_engine, current_gpu

    for variant in ("static", "dynamic"):
        graph = graphs[("fp16", variant, SIZES[1])]
        engine = tmp_path / graph.path.with_suffix(".engine").name
        metadata = build_engine(graph.path, engine, timing_cache=tmp_path / "timing.cache")
        assert engine_metadata.read(engine) == metadata
        engine_metadata.check_compatible(metadata, *current_gpu(), trt.__version__, None, weights_sha256(model))
        assert (metadata.input_names, metadata.output_names) == (("image",), ("r1",))
        assert bool(metadata.profiles) == (variant == "dynamic")
        comparisons = compare(model, graph.path, SIZES, engine)
        assert comparisons and all(c.passed for c in comparisons), [c.describe() for c in comparisons]
    assert (tmp_path / "timing.cache").stat().st_size > 0


@pytest.mark.slow
def test_sd_turbo_export_command(tmp_path):
    """Acceptance 6: the documented sd-turbo command (random weights, fp16 static), at a 64x64 tile."""
    command = [sys.executable, "-m", "export", "onnx", "--random-weights", "--preset", "sd-turbo",
               "--tile", "64", "--precision", "fp16", "--variant", "static", "--out-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "sd-turbo-static-b1-64x64-fp16.onnx"
    assert (tmp_path / (path.name + ".data")).stat().st_size > 1.5e9  # ~1 G parameters in fp16
    assert tensorrt_problems(path) == []
    metadata = read_metadata(path)
    assert (metadata["preset"], metadata["size_multiple"], metadata["precision"]) == ("sd-turbo", "64", "fp16")


def test_verify_refuses_a_file_that_is_not_an_exported_graph(tmp_path, capsys, no_model_loading):
    model = ["--random-weights", "--preset", "tiny", "--tile", "32", "--out-dir", str(tmp_path)]
    (tmp_path / "notes.onnx").write_text("not a graph\n")
    assert main(["verify", *model, "--onnx", str(tmp_path / "notes.onnx")]) == EXIT_USAGE
    assert f"{tmp_path / 'notes.onnx'} is not a readable ONNX file" in capsys.readouterr().err


def _external_data(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.name + ".data")


@pytest.fixture(scope="module")
def external_data_graph(model, tmp_path_factory):
    """The fp32 static graph of SIZES[0] with its weights in NAME.onnx.data, as export saves sd-turbo's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("export.onnx_export.EXTERNAL_DATA_BYTES", 0)
        (graph,) = export_graphs(model, tmp_path_factory.mktemp("external"), [guidesr_graph(16, SIZES[0], "static")],
                                 ["fp32"], weights="test: random tiny")
    assert _external_data(graph.path).is_file()
    return graph


def test_a_failed_export_leaves_the_previous_graph_and_a_new_one_replaces_it_whole(
        external_data_graph, model, tmp_path, monkeypatch):
    """Graphs are saved and checked in a scratch folder, then moved into place with their external data."""
    spec = guidesr_graph(16, SIZES[0], "static")
    onnx_path, data = tmp_path / external_data_graph.path.name, _external_data(tmp_path / external_data_graph.path.name)
    shutil.copyfile(external_data_graph.path, onnx_path)
    shutil.copyfile(_external_data(external_data_graph.path), data)
    before = graph_sha256(onnx_path)

    def failing_check(path, full_check):
        raise onnx.checker.ValidationError(f"{path}: test")

    with monkeypatch.context() as patch:
        patch.setattr(onnx.checker, "check_model", failing_check)
        with pytest.raises(onnx.checker.ValidationError):
            export_graphs(model, tmp_path, [spec], ["fp32"], weights="test: random tiny")
    assert graph_sha256(onnx_path) == before and sorted(tmp_path.iterdir()) == [onnx_path, data]
    (graph,) = export_graphs(model, tmp_path, [spec], ["fp32"], weights="test: random tiny")
    assert graph.path == onnx_path and sorted(tmp_path.iterdir()) == [onnx_path]  # inline now: the old data is gone
    onnx.checker.check_model(str(onnx_path), full_check=True)


def _engine_next_to(graph, folder: Path, **changes) -> Path:
    """A stand-in NAME.engine (not a real one) with NAME.onnx (and its NAME.onnx.data, if any) and NAME.engine.json
    next to it, its metadata recording that it was built from that NAME.onnx (and holds its weights)."""
    from dataclasses import replace

    from export import engine_metadata
    from test_export_graphs import _metadata

    onnx_path = folder / graph.path.name
    shutil.copyfile(graph.path, onnx_path)
    if _external_data(graph.path).is_file():
        shutil.copyfile(_external_data(graph.path), _external_data(onnx_path))
    engine = onnx_path.with_suffix(".engine")
    engine.write_bytes(b"not an engine")
    built_from = dict(onnx_file=onnx_path.name, graph_sha256=graph_sha256(onnx_path),
                      weights_sha256=read_metadata(onnx_path)["weights_sha256"])
    engine_metadata.write(replace(_metadata(), **{**built_from, **changes}), engine)
    return engine


@pytest.fixture
def no_tensorrt_import(monkeypatch):
    def refuse():
        raise AssertionError("TensorRT was imported before the engine was checked against its graph")

    monkeypatch.setattr("export.__main__.import_tensorrt", refuse)
    monkeypatch.setattr("export.tensorrt_build.import_tensorrt", refuse)


def _reexport_over(engine: Path, graph) -> Path:
    """NAME.onnx next to the engine replaced by another graph of the same preset, as a later export would."""
    onnx_path = engine.with_suffix(".onnx")
    onnx_path.write_bytes(graph.path.read_bytes())
    return onnx_path


def test_verify_refuses_an_engine_built_from_another_graph_before_importing_tensorrt(graphs, model, tmp_path, capsys,
                                                                                     monkeypatch, no_tensorrt_import):
    built_from = graphs[("fp16", "static", SIZES[0])]
    engine = _engine_next_to(built_from, tmp_path, preset="tiny", checkpoint_sha256="none")
    onnx_path = _reexport_over(engine, graphs[("fp32", "static", SIZES[0])])
    monkeypatch.setattr("export.__main__.load_from_args", lambda args: (model, "test: random tiny"))
    argv = ["verify", "--tile", "64", "--engine", str(engine)]
    assert main(argv) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert (f"error: the TensorRT engine {engine} was built from {built_from.path.name} "
            f"(sha256 {graph_sha256(built_from.path)[:12]}…), not from the graph {onnx_path} "
            f"(sha256 {graph_sha256(onnx_path)[:12]}…)") in err
    assert "Rebuild it with `make engine` (or `python -m export engine`" in err
    assert f"\n{onnx_path.name}\n" in out and f"PASS  {onnx_path.name} vs pytorch" in out  # the graph alone
    assert out.endswith(f"\nall comparisons passed\n{engine} was not checked (the error above says why)\n")


def test_verify_refuses_an_engine_whose_graphs_external_data_changed(external_data_graph, model, tmp_path, capsys,
                                                                      monkeypatch, no_tensorrt_import):
    engine = _engine_next_to(external_data_graph, tmp_path, preset="tiny", checkpoint_sha256="none")
    onnx_path = engine.with_suffix(".onnx")
    from test_export_graphs import _change_last_byte

    built_from = graph_sha256(onnx_path)
    _change_last_byte(_external_data(onnx_path))
    monkeypatch.setattr("export.__main__.load_from_args", lambda args: (model, "test: random tiny"))
    argv = ["verify", "--tile", "64", "--engine", str(engine)]
    assert main(argv) == EXIT_USAGE
    assert (f"error: the TensorRT engine {engine} was built from {onnx_path.name} (sha256 {built_from[:12]}…), "
            f"not from the graph {onnx_path} (sha256 {graph_sha256(onnx_path)[:12]}…); the sha256 covers the .onnx "
            f"file and its external data") in capsys.readouterr().err


def test_verify_names_a_missing_external_data_file(external_data_graph, tmp_path, capsys, no_tensorrt_import):
    engine = _engine_next_to(external_data_graph, tmp_path, preset="tiny", checkpoint_sha256="none")
    onnx_path = engine.with_suffix(".onnx")
    _external_data(onnx_path).unlink()
    argv = ["verify", "--random-weights", "--preset", "tiny", "--tile", "64", "--engine", str(engine)]
    assert main(argv) == EXIT_USAGE
    assert (f"error: {_external_data(onnx_path)} does not exist: the graph {onnx_path} keeps its tensor "
            in capsys.readouterr().err)


def _count_engine_checks(monkeypatch) -> collections.Counter:
    """Counts the calls of engine_metadata.read (the NAME.engine.json reads) and graph_sha256 (the graph hashes)."""
    from export import engine_metadata

    calls = collections.Counter()

    def counted(function):
        def count_and_call(*args):
            calls[function.__name__] += 1
            return function(*args)
        return count_and_call

    for name in ("read", "graph_sha256"):
        monkeypatch.setattr(engine_metadata, name, counted(getattr(engine_metadata, name)))
    return calls


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_verify_of_a_named_engine_reads_its_metadata_once_and_hashes_its_graph_once(graphs, model, tmp_path,
                                                                                     monkeypatch):
    engine = _engine_next_to(graphs[("fp16", "static", SIZES[0])], tmp_path, preset="tiny", checkpoint_sha256="none")
    monkeypatch.setattr("export.__main__.load_from_args", lambda args: (model, "test: random tiny"))
    calls = _count_engine_checks(monkeypatch)
    assert main(["verify", "--tile", "64", "--out-dir", str(tmp_path), "--engine", str(engine)]) == EXIT_MISSING_PACKAGE
    assert calls == {"read": 1, "graph_sha256": 1}


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_verify_with_tensorrt_reads_a_named_engines_metadata_once_and_hashes_its_graph_once(graphs, model, tmp_path,
                                                                                            monkeypatch):
    from export.tensorrt_build import build_engine

    onnx_path = tmp_path / graphs[("fp16", "static", SIZES[0])].path.name
    shutil.copyfile(graphs[("fp16", "static", SIZES[0])].path, onnx_path)
    engine = onnx_path.with_suffix(".engine")
    build_engine(onnx_path, engine, timing_cache=tmp_path / "timing.cache")
    monkeypatch.setattr("export.__main__.load_from_args", lambda args: (model, "test: random tiny"))
    calls = _count_engine_checks(monkeypatch)
    assert main(["verify", "--tile", "64", "--out-dir", str(tmp_path), "--engine", str(engine)]) == 0
    assert calls == {"read": 1, "graph_sha256": 1}


def test_compare_refuses_an_engine_built_from_another_graph_before_importing_tensorrt(graphs, model, tmp_path,
                                                                                      no_tensorrt_import):
    engine = _engine_next_to(graphs[("fp16", "static", SIZES[0])], tmp_path)
    onnx_path = _reexport_over(engine, graphs[("fp32", "static", SIZES[0])])
    with pytest.raises(EngineMismatchError, match=f"the TensorRT engine {engine} was built from"):
        compare(model, onnx_path, None, engine)


def test_verify_reads_each_graphs_metadata_once(graphs, model, tmp_path, monkeypatch, capsys):
    reads = []

    def counted(path):
        reads.append(Path(path).name)
        return read_metadata(path)

    monkeypatch.setattr("export.__main__.read_metadata", counted)
    monkeypatch.setattr("export.verify.read_metadata", counted)
    monkeypatch.setattr("export.__main__.load_from_args", lambda args: (model, "test: random tiny"))
    graph = graphs[("fp32", "static", SIZES[0])].path
    assert main(["verify", "--sizes", "64x64", "--onnx", str(graph)]) == 0
    assert "a static graph runs its own shape only" in capsys.readouterr().out
    assert reads == [graph.name]


def test_verify_finds_the_static_graphs_of_the_batch_it_is_given(model, tmp_path, monkeypatch, capsys):
    export_graphs(model, tmp_path, [guidesr_graph(16, (32, 32), "static", batch=2)], ["fp32"], weights="test")
    monkeypatch.setattr("export.__main__.load_from_args", lambda args: (model, "test: random tiny"))
    assert main(["verify", "--tile", "32", "--out-dir", str(tmp_path)]) == EXIT_USAGE
    assert "no graphs for preset tiny, tile 32x32 and static batch 1" in capsys.readouterr().err
    assert main(["verify", "--tile", "32", "--batch", "2", "--out-dir", str(tmp_path)]) == 0
    assert "tiny-static-b2-32x32-fp32.onnx" in capsys.readouterr().out


def test_verify_refuses_an_engine_of_another_model_without_needing_tensorrt(graphs, tmp_path, capsys):
    graph = graphs[("fp16", "static", SIZES[0])]
    engine = _engine_next_to(graph, tmp_path, preset="sd-turbo", checkpoint_sha256="ab" * 32)
    argv = ["verify", "--random-weights", "--preset", "tiny", "--tile", "64", "--engine", str(engine)]
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "holds another model: it is preset 'sd-turbo', the model is preset 'tiny'" in err
    assert "it holds the weights of checkpoint sha256 abababababab…, the model asked for is none" in err


def test_verify_names_an_engine_of_another_model_and_compares_the_graphs(graphs, model, tmp_path, monkeypatch, capsys,
                                                                         no_tensorrt_import):
    """As a graph of another model is: the engine is named, not checked, the graphs are compared, the status is 2;
    its metadata says so, without TensorRT."""
    engine = _engine_next_to(graphs[("fp32", "static", SIZES[0])], tmp_path, preset="sd-turbo",
                             checkpoint_sha256="ab" * 32)
    other = graphs[("fp32", "static", SIZES[1])].path
    monkeypatch.setattr("export.__main__.load_from_args", lambda args: (model, "test: random tiny"))
    assert main(["verify", "--onnx", str(other), "--engine", str(engine)]) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert (f"error: the TensorRT engine for {engine.with_suffix('.onnx').name} holds another model: it is preset "
            f"'sd-turbo', the model is preset 'tiny'") in err
    assert "TensorRT is not installed" not in out + err
    for graph in (other, engine.with_suffix(".onnx")):
        assert f"\n{graph.name}\n" in out and f"PASS  {graph.name} vs pytorch" in out
    assert out.endswith(f"\nall comparisons passed\n{engine} was not checked (the error above says why)\n")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_verify_of_a_named_engine_without_tensorrt_fails_with_the_install_hint(graphs, model, tmp_path, capsys,
                                                                                 monkeypatch):
    graph = graphs[("fp16", "static", SIZES[0])]
    engine = _engine_next_to(graph, tmp_path, preset="tiny", checkpoint_sha256="none")
    monkeypatch.setattr("export.__main__.load_from_args", lambda args: (model, "test: random tiny"))
    argv = ["verify", "--tile", "64", "--engine", str(engine)]
    assert main(argv) == EXIT_MISSING_PACKAGE
    err = capsys.readouterr().err
    assert f"error: cannot check {engine}" in err and "pip install tensorrt-cu12" in err
    assert "was built from" not in err


def _with_metadata(graph: Path, folder: Path, name: str, **changes: str) -> Path:
    """A copy of the (inline) graph called `name` in `folder`, its metadata_props changed."""
    proto = onnx.load(str(graph))
    for prop in proto.metadata_props:
        prop.value = changes.get(prop.key, prop.value)
    onnx.save(proto, str(folder / name))
    return folder / name


def test_verify_names_every_graph_of_another_model_and_compares_the_others(graphs, model, tmp_path, monkeypatch,
                                                                          capsys):
    good = graphs[("fp32", "static", SIZES[0])].path
    other_seed = _with_metadata(good, tmp_path, "other-seed.onnx", weights_sha256="cd" * 32)
    other_checkpoint = _with_metadata(good, tmp_path, "other-checkpoint.onnx", checkpoint_sha256="ef" * 32)
    monkeypatch.setattr("export.__main__.load_from_args", lambda args: (model, "test: random tiny"))
    assert main(["verify", "--onnx", str(other_seed), str(good), str(other_checkpoint)]) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert (f"error: other-seed.onnx holds other weights than the reference model (weights cdcdcdcdcdcd, the model's "
            f"are {weights_sha256(model)[:12]})") in err
    assert ("error: other-checkpoint.onnx was exported from checkpoint efefefefefef, the reference model is none; "
            "compare a graph with the model it came from") in err
    assert f"PASS  {good.name} vs pytorch" in out
    assert "other-seed.onnx vs" not in out and "other-checkpoint.onnx vs" not in out
    assert out.endswith("\nall comparisons passed\n2 of 3 graphs were not compared (the errors above say why)\n")
    assert main(["verify", "--onnx", str(other_seed), str(good)]) == EXIT_USAGE
    assert capsys.readouterr().out.endswith("\n1 of 2 graphs was not compared (the errors above say why)\n")


def test_verify_names_every_file_it_is_given_that_is_not_an_exported_graph(graphs, tmp_path, capsys, no_model_loading):
    (tmp_path / "notes.onnx").write_text("not a graph\n")
    outdated = _with_metadata(graphs[("fp32", "static", SIZES[0])].path, tmp_path, "outdated.onnx")
    proto = onnx.load(str(outdated))
    kept = [prop for prop in proto.metadata_props if prop.key != "weights_sha256"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, str(outdated))
    argv = ["verify", "--random-weights", "--preset", "tiny", "--onnx", str(tmp_path / "notes.onnx"), str(outdated)]
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'notes.onnx'} is not a readable ONNX file" in err
    assert "error: outdated.onnx was exported by an older guidesr" in err


@pytest.mark.parametrize("command, argv, message", [
    ("onnx", ["--tile", "100000", "--variant", "static"],
     "the static graph takes inputs up to 1x3x100000x100000, where the self-attention scores of the UNet's level-0 "
     "blocks are one tensor of 1x8x156250000x156250000 = 195,312,500,000,000,000 values; TensorRT takes fewer than "
     "2^31 (2,147,483,648) per tensor, so no engine could be built from it: choose a smaller tile or --batch"),
    ("engine", ["--tile", "100000"], "the static graph takes inputs up to 1x3x100000x100000"),
])
def test_a_tile_too_large_for_tensorrt_is_refused_before_the_export(command, argv, message, model, tmp_path,
                                                                    monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("the graphs were exported")

    monkeypatch.setattr("export.__main__.load_from_args", lambda args: (model, "test: random tiny"))
    monkeypatch.setattr("export.__main__.export_graphs", refuse)
    assert main([command, *argv, "--out-dir", str(tmp_path)]) == EXIT_USAGE
    assert f"error: --tile {argv[1]}x{argv[1]}: {message}" in capsys.readouterr().err


STATIC_1024_MESSAGE = (
    "the static graph takes inputs up to 1x3x1024x1024, where the self-attention scores of the UNet's level-0 blocks "
    "are one tensor of 1x8x16384x16384 = 2,147,483,648 values; TensorRT takes fewer than 2^31 (2,147,483,648) per "
    "tensor, so no engine could be built from it: choose a smaller tile or --batch")
DYNAMIC_368_MESSAGE = (
    "the dynamic graph takes inputs up to 4x3x736x736, where the self-attention scores of the UNet's level-0 blocks "
    "are one tensor of 4x8x8464x8464 = 2,292,457,472 values; TensorRT takes fewer than 2^31 (2,147,483,648) per "
    "tensor, so no engine could be built from it: choose a smaller tile or --max-batch")


def test_the_static_tile_ends_where_the_graphs_attention_scores_reach_tensorrts_limit(model, tmp_path, monkeypatch,
                                                                                        capsys):
    """The attention scores [B, heads, N, N] (N = H/8 x W/8 tokens) outgrow every full-resolution tensor: the bound on
    those alone (B x 2C x H x W) took static tiles up to 8176."""
    exported = []
    monkeypatch.setattr("export.__main__.load_from_args", lambda args: (model, "test: random tiny"))
    monkeypatch.setattr("export.__main__.export_graphs", lambda model, out_dir, specs, *args, **kwargs:
                        exported.extend(specs) or [])
    assert main(["onnx", "--tile", "1024", "--variant", "static", "--out-dir", str(tmp_path)]) == EXIT_USAGE
    assert f"error: --tile 1024x1024: {STATIC_1024_MESSAGE}" in capsys.readouterr().err
    assert main(["onnx", "--tile", "1008", "--variant", "static", "--out-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().err == ""
    assert [spec.tile for spec in exported] == [(1008, 1008)]


def test_a_dynamic_graph_past_tensorrts_limit_is_written_for_onnx_runtime_and_refused_for_an_engine(
        model, tmp_path, monkeypatch, capsys):
    """Only the dynamic graph's largest shapes (max batch 4, twice the tile) pass the limit, so `onnx` writes it with
    a note (ONNX Runtime has no such limit) and `engine` refuses it before exporting; the old bound took dynamic tiles
    up to 2032."""
    exported = []

    def export_graphs(model, out_dir, specs, *args, **kwargs):
        if not kwargs.get("on_published"):
            raise AssertionError("the engine's graph was exported")
        exported.extend(specs)
        return []

    monkeypatch.setattr("export.__main__.load_from_args", lambda args: (model, "test: random tiny"))
    monkeypatch.setattr("export.__main__.export_graphs", export_graphs)
    argv = ["--tile", "368", "--variant", "dynamic", "--out-dir", str(tmp_path)]
    assert main(["engine", *argv]) == EXIT_USAGE
    assert f"error: --tile 368x368: {DYNAMIC_368_MESSAGE}" in capsys.readouterr().err
    assert exported == []
    assert main(["onnx", *argv]) == 0
    assert capsys.readouterr().err == (f"note: --tile 368x368: {DYNAMIC_368_MESSAGE}; ONNX Runtime can run it, "
                                       f"`export engine --variant dynamic` refuses it\n")
    assert main(["onnx", "--tile", "352", "--variant", "dynamic", "--out-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().err == ""
    assert [spec.tile for spec in exported] == [(368, 368), (352, 352)]


def graph_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor of the graph, by ONNX shape inference."""
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)), data_prop=True)
    values = [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]
    return {value.name: tuple(dim.dim_value for dim in value.type.tensor_type.shape.dim) for value in values}


def test_the_largest_tensor_formula_matches_the_exported_graphs(graphs, model, tmp_path):
    """At the fixture's tiles the full-resolution features are the graph's largest tensors; at 160x160 the UNet's
    level-0 self-attention scores are, materialised between a MatMul and a Softmax."""
    static = [graph for graph in unique_graphs(graphs) if graph.spec.variant == "static" and graph.precision == "fp32"]
    (large,) = export_graphs(model, tmp_path, [guidesr_graph(16, (160, 160), "static")], ["fp32"], "test: random tiny")
    for graph in [*static, large]:
        expected = largest_tensor(model.config, graph.spec.inputs[0].max)
        shapes = graph_tensor_shapes(graph.path)
        assert max(math.prod(shape) for shape in shapes.values()) == expected.values, graph.path.name
    expected = largest_tensor(model.config, large.spec.inputs[0].max)
    assert expected.what == "the self-attention scores of the UNet's level-0 blocks"
    shapes = graph_tensor_shapes(large.path)
    scores = {node.input[0] for node in onnx.load(str(large.path)).graph.node if node.op_type == "Softmax"}
    assert expected.shape == (1, 8, 400, 400) and expected.shape in {shapes[name] for name in scores}


def test_ctrl_c_during_an_export_exits_130_saying_which_graphs_are_written(model, tmp_path, monkeypatch, capsys):
    finish_graph, finished = onnx_export.finish_graph, []

    def interrupted_in_the_second_graph(*args):
        if finished:
            raise KeyboardInterrupt
        finished.append(finish_graph(*args))

    monkeypatch.setattr(onnx_export, "finish_graph", interrupted_in_the_second_graph)
    monkeypatch.setattr("export.__main__.load_from_args", lambda args: (model, "test: random tiny"))
    argv = ["onnx", "--tile", "32", "--variant", "static", "dynamic", "--precision", "fp32", "--out-dir", str(tmp_path)]
    assert status_after_ctrl_c(main, argv) == EXIT_INTERRUPTED
    out, err = capsys.readouterr()
    static = tmp_path / "tiny-static-b1-32x32-fp32.onnx"
    assert out == f"wrote {static}\n"
    assert err == (f"interrupted: wrote {static.name}; the graph being exported was not published, so each graph there "
                   f"is a whole one, new or from before; the same command again exports them all\n")
    assert sorted(tmp_path.iterdir()) == [static]


def test_ctrl_c_during_engine_and_verify_exits_130_saying_what_is_done(graphs, model, tmp_path, monkeypatch, capsys):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("export.__main__.load_from_args", lambda args: (model, "test: random tiny"))
    monkeypatch.setattr("export.__main__.import_tensorrt", ctrl_c)
    argv = ["engine", "--tile", "32", "--out-dir", str(tmp_path)]
    assert status_after_ctrl_c(main, argv) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == (
        "interrupted: tiny-static-b1-32x32-fp16.onnx is written, its engine is not: nothing half-written was "
        "published (an engine is used only with its NAME.engine.json, written last); the same command again builds "
        "it\n")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny-static-b1-32x32-fp16.onnx"]

    from export import verify

    compare, compared = verify.compare, []

    def interrupted_in_the_second_graph(*args):
        if compared:
            raise KeyboardInterrupt
        compared.append(compare(*args))
        return compared[-1]

    monkeypatch.setattr(verify, "compare", interrupted_in_the_second_graph)
    first, second = (graphs[(precision, "static", SIZES[0])].path for precision in ("fp32", "fp16"))
    assert status_after_ctrl_c(main, ["verify", "--onnx", str(first), str(second)]) == EXIT_INTERRUPTED
    out, err = capsys.readouterr()
    assert f"PASS  {first.name} vs pytorch" in out
    assert err == "interrupted: 1 of 2 graphs compared (results above); verify writes no files\n"


def test_the_scratch_folder_of_a_killed_export_is_removed_by_the_next_export(model, tmp_path):
    command = [sys.executable, "-m", "export", "onnx", "--random-weights", "--preset", "tiny", "--tile", "32",
               "--variant", "static", "--precision", "fp32", "--out-dir", str(tmp_path)]
    export = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".trace-*")):
        assert export.poll() is None and time.monotonic() < deadline, "the export ended before it was killed"
        time.sleep(0.02)
    export.kill()  # SIGKILL: no cleanup runs
    export.wait()
    (scratch,) = tmp_path.glob(".trace-*")
    assert scratch.is_dir()
    (graph,) = export_graphs(model, tmp_path, [guidesr_graph(16, (32, 32), "static")], ["fp32"], weights="test")
    assert sorted(tmp_path.iterdir()) == [graph.path]
