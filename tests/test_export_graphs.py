"""Issue 4, without a model: graph specs, engine metadata checks, TensorRT's operator list."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from export import engine_metadata, onnx_export
from export.engine_metadata import EngineMetadata, EngineMetadataError, EngineMismatchError, check_compatible
from export.graphs import GraphSpec, guidesr_graph, parse_tile
from export.trt_supported_ops import SUPPORTED_OPS, tensorrt_problems


def test_static_spec_fixes_every_axis():
    spec = guidesr_graph(16, (64, 48), "static", batch=2)
    image = spec.inputs[0]
    assert (spec.input_names, spec.output_names) == (["image"], ["r1"])
    assert image.min == image.opt == image.max == (2, 3, 64, 48)
    assert spec.dynamic_axes == {} and image.dims == (2, 3, 64, 48)
    assert spec.profile == {"image": ((2, 3, 64, 48),) * 3}
    assert spec.tile == (64, 48)


def test_dynamic_spec_declares_axes_and_profile():
    spec = guidesr_graph(64, (512, 384), "dynamic", max_batch=4)
    assert spec.dynamic_axes == {name: {0: "batch", 2: "height", 3: "width"} for name in ("image", "r1")}
    assert spec.profile["image"] == ((1, 3, 64, 64), (1, 3, 512, 384), (4, 3, 1024, 768))
    assert spec.inputs[0].dims == ("batch", 3, "height", "width")
    for good in [(2, 3, 128, 576), (1, 3, 64, 64), (4, 3, 1024, 768)]:
        spec.check_input_shape(good)
    for bad in [(1, 3, 96, 64), (1, 3, 64, 96), (5, 3, 64, 64), (1, 3, 1088, 64), (1, 3, 64)]:
        with pytest.raises(ValueError, match="multiples of 64"):
            spec.check_input_shape(bad)


@pytest.mark.parametrize("trt_plugins", [False, True])
@pytest.mark.parametrize("variant", ["static", "dynamic"])
def test_spec_json_round_trip(variant, trt_plugins):
    spec = guidesr_graph(16, (48, 80), variant, trt_plugins=trt_plugins)
    assert GraphSpec.from_json(spec.to_json()) == spec
    assert ("trt_plugins" in json.loads(spec.to_json())) == trt_plugins


def test_spec_rejects_tiles_off_the_size_multiple():
    with pytest.raises(ValueError, match="multiples of the model's size multiple 64"):
        guidesr_graph(64, (512, 500), "static")
    with pytest.raises(ValueError, match="variant"):
        guidesr_graph(16, (64, 64), "ragged")
    with pytest.raises(ValueError, match="batch must be >= 1, got 0"):
        guidesr_graph(16, (64, 64), "static", batch=0)
    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        guidesr_graph(16, (64, 64), "dynamic", max_batch=0)
    for tile in [(0, 64), (64, 0), (-16, 64)]:
        with pytest.raises(ValueError, match="positive multiples"):
            guidesr_graph(16, tile, "dynamic")


def test_parse_tile():
    assert parse_tile("512") == (512, 512)
    assert parse_tile("384x512") == (384, 512)
    for bad in ("", "ax3", "1x2x3"):
        with pytest.raises(ValueError, match="tile must look like"):
            parse_tile(bad)
    for bad in ("0", "-16", "32x0"):
        with pytest.raises(ValueError, match=f"size '{bad}' must have a positive height and width"):
            parse_tile(bad, "size")


# ------------------------------------------------------------------------------------ engine metadata


H100 = "NVIDIA H100 80GB HBM3"
WEIGHTS = "12" * 32  # the weights_sha256 of the model the engines of `_metadata` hold


def _metadata(**changes) -> EngineMetadata:
    spec = guidesr_graph(16, (64, 64), "static")
    fields = dict(
        tensorrt_version="10.15.1.29", gpu_name=H100, compute_capability="9.0",
        precision="fp16", checkpoint_sha256="ab" * 32, weights_sha256=WEIGHTS, preset="tiny", scale=4,
        size_multiple=16, input_names=("image",), output_names=("r1",), profiles=(), graph_spec=spec.to_json(),
        onnx_file="tiny-static-b1-64x64-fp16.onnx", graph_sha256="cd" * 32, builder_optimization_level=3,
        guidesr_version="0.1.0",
    )
    fields.update(changes)
    return EngineMetadata(**fields)


def test_engine_metadata_round_trip(tmp_path):
    engine = tmp_path / "model.engine"
    metadata = _metadata()
    assert engine_metadata.write(metadata, engine) == tmp_path / "model.engine.json"
    assert engine_metadata.read(engine) == metadata
    assert metadata.spec == guidesr_graph(16, (64, 64), "static")


def test_engine_metadata_read_refuses_bad_files(tmp_path):
    engine = tmp_path / "model.engine"
    with pytest.raises(EngineMetadataError, match="does not exist"):
        engine_metadata.read(engine)
    path = engine_metadata.metadata_path(engine)
    path.write_text("{not json")
    with pytest.raises(EngineMetadataError, match="not valid JSON"):
        engine_metadata.read(engine)
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(EngineMetadataError, match="not a GuideSR engine"):
        engine_metadata.read(engine)
    data = json.loads(_metadata().to_json())
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(EngineMetadataError, match="format version 99"):
        engine_metadata.read(engine)
    data = json.loads(_metadata().to_json())
    del data["gpu_name"]
    path.write_text(json.dumps(data))
    with pytest.raises(EngineMetadataError, match=r"missing fields \['gpu_name'\]"):
        engine_metadata.read(engine)


def test_check_compatible_accepts_the_build_environment():
    metadata = _metadata()
    check_compatible(metadata, H100, (9, 0), "10.15.1.29", "ab" * 32, WEIGHTS)
    untrained = _metadata(checkpoint_sha256=engine_metadata.NO_CHECKPOINT)
    check_compatible(untrained, H100, "9.0", "10.15.1.29", None, WEIGHTS)


@pytest.mark.parametrize("gpu, capability, version, checkpoint, message", [
    ("NVIDIA A100-SXM4-80GB", (8, 0), "10.15.1.29", "ab" * 32, f"built on a {H100} .* this GPU is a NVIDIA A100"),
    (H100, (9, 0), "10.8.0.43", "ab" * 32, "built with TensorRT 10.15.1.29, this is TensorRT 10.8.0.43"),
    (H100, (9, 0), "10.15.1.29", "ef" * 32, "checkpoint sha256 abababababab…, the model asked for is sha256 efefef"),
    (H100, (9, 0), "10.15.1.29", None, "the model asked for is none"),
])
def test_check_compatible_names_each_mismatch(gpu, capability, version, checkpoint, message):
    with pytest.raises(EngineMismatchError, match=message) as info:
        check_compatible(_metadata(), gpu, capability, version, checkpoint, WEIGHTS)
    assert "Rebuild it here with `make engine`" in str(info.value)


def test_check_compatible_refuses_plugin_ptx_newer_than_the_driver(tmp_path):
    plugins = _metadata(plugin_ptx_isa=94)
    engine_metadata.write(plugins, tmp_path / "model.engine")
    assert engine_metadata.read(tmp_path / "model.engine").plugin_ptx_isa == 94
    with pytest.raises(EngineMismatchError, match="its plugin kernels are PTX ISA 9.4, and this machine's CUDA driver "
                                                  r"compiles PTX up to ISA 9.0 \(a newer driver loads it too\)"):
        check_compatible(plugins, H100, (9, 0), "10.15.1.29", "ab" * 32, WEIGHTS, driver_ptx_isa=90)
    check_compatible(plugins, H100, (9, 0), "10.15.1.29", "ab" * 32, WEIGHTS, driver_ptx_isa=94)
    check_compatible(plugins, H100, (9, 0), "10.15.1.29", "ab" * 32, WEIGHTS, driver_ptx_isa=None)  # unknown: unchecked
    check_compatible(_metadata(), H100, (9, 0), "10.15.1.29", "ab" * 32, WEIGHTS, driver_ptx_isa=80)  # no plugins


def test_check_compatible_lists_all_mismatches_at_once():
    with pytest.raises(EngineMismatchError) as info:
        check_compatible(_metadata(), "NVIDIA L4", (8, 9), "11.0.0", "ef" * 32, WEIGHTS)
    assert str(info.value).count(";") == 2


# ------------------------------------------------------------------------------- TensorRT op list


def _graph(nodes, inputs, outputs, initializers=(), opset=18) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ir.from_proto(onnx.shape_inference.infer_shapes(model))


def test_supported_ops_list_matches_the_document():
    # spot checks against onnx-tensorrt docs/operators.md (TensorRT 10.15)
    assert SUPPORTED_OPS["Conv"] == ("FP32", "FP16", "BF16")
    assert "INT64" in SUPPORTED_OPS["Reshape"] and "BOOL" in SUPPORTED_OPS["Where"]
    for unsupported in ("Unique", "StringNormalizer", "SequenceAt", "ConvInteger", "BitShift", "Col2Im"):
        assert unsupported not in SUPPORTED_OPS


def test_tensorrt_check_passes_a_plain_graph():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Softmax", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)]
    model = _graph(nodes, [x], [y])
    assert tensorrt_problems(model) == []


def test_tensorrt_check_finds_unsupported_ops_types_domains_and_modes():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)
    u = helper.make_tensor_value_info("u", TensorProto.FLOAT, None)
    r = helper.make_tensor_value_info("r", TensorProto.FLOAT, None)
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, None)
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], np.array([1, 1, 2, 2], np.float32))
    nodes = [
        helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE),
        helper.make_node("Unique", ["x"], ["u"]),
        helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="cubic"),
        helper.make_node("FusedConv", ["x"], ["c"], domain="com.microsoft"),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y, u, r, c], [scales])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    problems = tensorrt_problems(ir.from_proto(model))
    text = "\n".join(problems)
    assert "of type DOUBLE" in text
    assert "Unique is not supported" in text
    assert "mode='cubic' is not supported" in text
    assert "domain 'com.microsoft'" in text
    assert len(problems) == 4


def test_tensorrt_check_refuses_opsets_outside_the_range():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = _graph([helper.make_node("Relu", ["x"], ["y"])], [x], [y], opset=8)
    assert tensorrt_problems(model) == ["default-domain opset 8 is outside TensorRT's range (9, 24)"]


def test_check_model_names_another_preset_or_checkpoint():
    engine_metadata.check_model(_metadata(), "tiny", "ab" * 32, WEIGHTS)
    engine_metadata.check_model(_metadata(checkpoint_sha256=engine_metadata.NO_CHECKPOINT), "tiny", None, WEIGHTS)
    with pytest.raises(EngineMismatchError, match="it is preset 'tiny', the model is preset 'sd-turbo'"):
        engine_metadata.check_model(_metadata(), "sd-turbo", "ab" * 32, WEIGHTS)
    with pytest.raises(EngineMismatchError,
                       match="holds another model: it holds the weights of checkpoint sha256 abab"):
        engine_metadata.check_model(_metadata(), "tiny", "ef" * 32, WEIGHTS)


OTHER_WEIGHTS = ("it holds other weights than the model (weights sha256 121212121212…, the model's are sha256 "
                 "343434343434…): the same checkpoint on another --base-model, or untrained weights of another seed; "
                 "pass the --base-model (or --seed) it was built from")


@pytest.mark.parametrize("checkpoint", ["ab" * 32, None])
def test_an_engine_of_the_same_checkpoint_with_other_weights_is_refused(checkpoint):
    """A checkpoint's sha256 covers its trained parts only, and an untrained model has none: the same checkpoint on
    another --base-model, or another seed's untrained weights, are told apart by the weights' sha256."""
    built = _metadata(checkpoint_sha256=checkpoint or engine_metadata.NO_CHECKPOINT)
    with pytest.raises(EngineMismatchError) as info:
        check_compatible(built, H100, (9, 0), "10.15.1.29", checkpoint, "34" * 32)
    assert str(info.value) == (f"the TensorRT engine for {built.onnx_file} cannot be used: {OTHER_WEIGHTS}. Rebuild it "
                               f"here with `make engine` (or `python -m export engine`) for this model.")
    with pytest.raises(EngineMismatchError) as info:
        engine_metadata.check_model(built, "tiny", checkpoint, "34" * 32)
    assert str(info.value) == (f"the TensorRT engine for {built.onnx_file} holds another model: {OTHER_WEIGHTS}. Pass "
                               f"the model it was built from, or rebuild it with `make engine` (or "
                               f"`python -m export engine`).")


def test_engine_metadata_with_unknown_fields_is_refused_clearly(tmp_path):
    engine = tmp_path / "model.engine"
    data = json.loads(_metadata().to_json())
    data["written_by_a_newer_guidesr"] = 1
    engine_metadata.metadata_path(engine).write_text(json.dumps(data))
    with pytest.raises(EngineMetadataError,
                       match=r"missing fields \[\], unknown fields \['written_by_a_newer_guidesr'\]"):
        engine_metadata.read(engine)


def _weighted_graph(weight: float = 0.0) -> onnx.ModelProto:
    """r1 = image + w0 + w1, w0 and w1 filled with `weight` and `weight` + 1."""
    shape = [1, 3, 4, 4]
    weights = [numpy_helper.from_array(np.full(shape, weight + i, np.float32), f"w{i}") for i in range(2)]
    nodes = [helper.make_node("Add", ["image", "w0"], ["t"]), helper.make_node("Add", ["t", "w1"], ["r1"])]
    image, r1 = (helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in ("image", "r1"))
    return helper.make_model(helper.make_graph(nodes, "weighted", [image], [r1], initializer=weights))


def _save_with_external_data(folder: Path, one_file: bool = True) -> Path:
    """graph.onnx with its weights in graph.onnx.data (one_file) or in one file per tensor (w0, w1)."""
    path = folder / "graph.onnx"
    onnx.save_model(_weighted_graph(), path, save_as_external_data=True, all_tensors_to_one_file=one_file,
                    location="graph.onnx.data", size_threshold=0)
    return path


def _change_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_check_built_from_compares_the_graphs_sha256(tmp_path):
    graph, other = tmp_path / "tiny-static-b1-64x64-fp16.onnx", tmp_path / "re-exported.onnx"
    onnx.save_model(_weighted_graph(0.0), graph)
    onnx.save_model(_weighted_graph(1.0), other)
    built_from, found = engine_metadata.graph_sha256(graph), engine_metadata.graph_sha256(other)
    engine = tmp_path / "tiny.engine"
    built = _metadata(graph_sha256=built_from)
    engine_metadata.check_built_from(built, engine, graph)
    with pytest.raises(EngineMismatchError) as err:
        engine_metadata.check_built_from(built, engine, other)
    assert str(err.value).startswith(
        f"the TensorRT engine {engine} was built from tiny-static-b1-64x64-fp16.onnx (sha256 {built_from[:12]}…), "
        f"not from the graph {other} (sha256 {found[:12]}…); the sha256 covers the .onnx file and its external data")


@pytest.mark.parametrize("one_file", [True, False], ids=["one-data-file", "a-data-file-per-tensor"])
def test_graph_sha256_covers_every_external_data_file(tmp_path, one_file):
    graph = _save_with_external_data(tmp_path, one_file)
    data_files = sorted(set(tmp_path.iterdir()) - {graph})
    assert [path.name for path in data_files] == (["graph.onnx.data"] if one_file else ["w0", "w1"])
    unchanged, onnx_bytes = engine_metadata.graph_sha256(graph), graph.read_bytes()
    assert engine_metadata.graph_sha256(graph) == unchanged
    for data in data_files:
        original = data.read_bytes()
        _change_last_byte(data)
        assert engine_metadata.graph_sha256(graph) != unchanged, data.name
        data.write_bytes(original)
    assert graph.read_bytes() == onnx_bytes and engine_metadata.graph_sha256(graph) == unchanged


def test_check_built_from_refuses_a_graph_whose_external_data_changed(tmp_path):
    graph = _save_with_external_data(tmp_path)
    engine = tmp_path / "graph.engine"
    built = _metadata(onnx_file=graph.name, graph_sha256=engine_metadata.graph_sha256(graph))
    engine_metadata.check_built_from(built, engine, graph)
    _change_last_byte(tmp_path / "graph.onnx.data")
    with pytest.raises(EngineMismatchError) as err:
        engine_metadata.check_built_from(built, engine, graph)
    assert str(err.value).startswith(
        f"the TensorRT engine {engine} was built from graph.onnx (sha256 {built.graph_sha256[:12]}…), "
        f"not from the graph {graph} (sha256 {engine_metadata.graph_sha256(graph)[:12]}…); "
        f"the sha256 covers the .onnx file and its external data")


def test_graph_sha256_names_a_missing_external_data_file(tmp_path):
    graph = _save_with_external_data(tmp_path, one_file=False)
    (tmp_path / "w1").unlink()
    with pytest.raises(ValueError) as err:
        engine_metadata.graph_sha256(graph)
    assert str(err.value) == (f"{tmp_path / 'w1'} does not exist: the graph {graph} keeps its tensor 'w1' there "
                              f"(ONNX external data); export the graph again")


def _graph_with_external_data_at(folder: Path, location: str) -> Path:
    """graph.onnx in `folder`, its tensors' external data location rewritten to `location`."""
    graph = _save_with_external_data(folder)
    model = onnx.load(str(graph), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, graph)
    return graph


@pytest.mark.parametrize("location", ["../outside.bin", "sub/../../outside.bin", "absolute", "link"])
def test_graph_sha256_refuses_external_data_outside_the_graphs_folder(tmp_path, location):
    folder, outside = tmp_path / "graphs", tmp_path / "outside.bin"
    (folder / "sub").mkdir(parents=True)
    outside.write_bytes(bytes(1024))
    if location == "absolute":
        location = str(outside)
    elif location == "link":
        try:
            (folder / "link.bin").symlink_to(outside)
        except OSError as err:
            pytest.skip(f"no symbolic links here: {err}")
        location = "link.bin"
    graph = _graph_with_external_data_at(folder, location)
    with pytest.raises(ValueError) as err:
        engine_metadata.graph_sha256(graph)
    assert str(err.value) == (f"the graph {graph} keeps its tensor 'w0' at {location!r}, outside its folder "
                              f"{folder.resolve()}: ONNX external data is a file in the graph's folder, named by a "
                              f"relative location; export the graph again")


def test_graph_sha256_follows_a_location_that_stays_in_the_graphs_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    graph = _graph_with_external_data_at(tmp_path, "sub/../graph.onnx.data")
    assert engine_metadata.external_data_files(graph) == [tmp_path / "sub/../graph.onnx.data"]
    assert len(engine_metadata.graph_sha256(graph)) == 64


def test_read_metadata_refuses_external_data_outside_the_graphs_folder(tmp_path):
    from export.onnx_export import REQUIRED_METADATA, read_metadata

    (tmp_path / "graphs").mkdir()
    graph = _graph_with_external_data_at(tmp_path / "graphs", "../outside.bin")
    model = onnx.load(str(graph), load_external_data=False)
    helper.set_model_props(model, {key: "0" for key in REQUIRED_METADATA})
    onnx.save_model(model, graph)
    (tmp_path / "outside.bin").write_bytes(bytes(1024))
    with pytest.raises(ValueError, match=r"keeps its tensor 'w0' at '\.\./outside\.bin', outside its folder"):
        read_metadata(graph)


def _array(name: str, value: float) -> TensorProto:
    return numpy_helper.from_array(np.full([1, 3, 4, 4], value, np.float32), name)


def _branch(name: str, value: float) -> onnx.GraphProto:
    """An If branch: out = image + {name}_w + {name}_c, {name}_w an initializer and {name}_c a Constant node's value."""
    nodes = [helper.make_node("Constant", [], [f"{name}_c"], value=_array(f"{name}_c", value)),
             helper.make_node("Add", ["image", f"{name}_w"], ["sum"]),
             helper.make_node("Add", ["sum", f"{name}_c"], ["out"])]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 4, 4])
    return helper.make_graph(nodes, name, [], [out], initializer=[_array(f"{name}_w", value)])


def _graph_with_subgraph_tensors() -> onnx.ModelProto:
    """r1 = (image + w0 if cond else image + else_w + else_c) + c0; the then branch holds then_w and then_c."""
    nodes = [helper.make_node("Constant", [], ["c0"], value=_array("c0", 1.0)),
             helper.make_node("Greater", ["w0", "c0"], ["greater"]),
             helper.make_node("ReduceMax", ["greater"], ["cond"], keepdims=0),
             helper.make_node("If", ["cond"], ["picked"], then_branch=_branch("then", 2.0),
                              else_branch=_branch("else", 3.0)),
             helper.make_node("Add", ["picked", "c0"], ["r1"])]
    image, r1 = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 3, 4, 4]) for name in ("image", "r1"))
    return helper.make_model(helper.make_graph(nodes, "branches", [image], [r1], initializer=[_array("w0", 0.0)]))


def _save_one_file_per_tensor(model: onnx.ModelProto, folder: Path) -> Path:
    path = folder / "graph.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0,
                    convert_attribute=True)
    return path


def test_external_data_files_reaches_constant_nodes_and_if_branches(tmp_path):
    graph = _save_one_file_per_tensor(_graph_with_subgraph_tensors(), tmp_path)
    names = ["c0", "else_c", "else_w", "then_c", "then_w", "w0"]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([*names, "graph.onnx"])
    assert engine_metadata.external_data_files(graph) == [tmp_path / name for name in names]
    unchanged = engine_metadata.graph_sha256(graph)
    _change_last_byte(tmp_path / "then_c")
    assert engine_metadata.graph_sha256(graph) != unchanged
    (tmp_path / "then_w").unlink()
    with pytest.raises(ValueError, match=r"graph\.onnx keeps its tensor 'then_w' there \(ONNX external data\)"):
        engine_metadata.external_data_files(graph)


@pytest.mark.parametrize("tensor_name", ["then_w", "then_c", "c0"])
def test_external_data_files_refuses_a_subgraph_or_constant_tensor_outside_the_graphs_folder(tmp_path, tensor_name):
    folder = tmp_path / "graphs"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(bytes(1024))
    graph = _save_one_file_per_tensor(_graph_with_subgraph_tensors(), folder)
    model = onnx.load(str(graph), load_external_data=False)
    for entry in (entry for tensor in _tensors_named(model, tensor_name) for entry in tensor.external_data):
        if entry.key == "location":
            entry.value = "../outside.bin"
    onnx.save_model(model, graph)
    outside = rf"keeps its tensor '{tensor_name}' at '\.\./outside\.bin', outside its folder"
    with pytest.raises(ValueError, match=outside):
        engine_metadata.external_data_files(graph)


def _tensors_named(model: onnx.ModelProto, name: str) -> list[TensorProto]:
    if_node = next(node for node in model.graph.node if node.op_type == "If")
    then_branch = next(attribute.g for attribute in if_node.attribute if attribute.name == "then_branch")
    initializers = [*model.graph.initializer, *then_branch.initializer]
    constants = [attribute.t for node in [*model.graph.node, *then_branch.node] for attribute in node.attribute
                 if attribute.name == "value"]
    return [tensor for tensor in [*initializers, *constants] if tensor.name == name]


def _store_externally(tensor: TensorProto, folder: Path) -> None:
    (folder / tensor.name).write_bytes(tensor.raw_data)
    onnx.external_data_helper.set_external_data(tensor, tensor.name)
    tensor.ClearField("raw_data")


def test_external_data_files_reaches_sparse_initializers(tmp_path):
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "sparse_values")
    indices = numpy_helper.from_array(np.array([0, 5], np.int64), "sparse_indices")
    sparse = helper.make_sparse_tensor(values, indices, [1, 3, 4, 4])
    sparse.values.name = "sparse"
    for tensor in (sparse.values, sparse.indices):
        _store_externally(tensor, tmp_path)
    model = _weighted_graph()
    model.graph.sparse_initializer.append(sparse)
    graph = tmp_path / "graph.onnx"
    onnx.save_model(model, graph)
    assert engine_metadata.external_data_files(graph) == [tmp_path / "sparse", tmp_path / "sparse_indices"]


def test_external_data_files_reaches_a_branch_inside_a_local_function(tmp_path):
    function = helper.make_function(
        "guidesr.test", "Pick", ["cond", "image"], ["out"],
        [helper.make_node("If", ["cond"], ["out"], then_branch=_branch("then", 2.0), else_branch=_branch("else", 3.0))],
        [helper.make_opsetid("", 17)], attributes=[])
    nodes = [helper.make_node("Pick", ["cond", "image"], ["r1"], domain="guidesr.test")]
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    image, r1 = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 3, 4, 4]) for name in ("image", "r1"))
    model = helper.make_model(helper.make_graph(nodes, "function", [cond, image], [r1]), functions=[function],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("guidesr.test", 1)])
    for branch in (attribute.g for attribute in model.functions[0].node[0].attribute):
        _store_externally(branch.initializer[0], tmp_path)
        _store_externally(branch.node[0].attribute[0].t, tmp_path)
    graph = tmp_path / "graph.onnx"
    onnx.save_model(model, graph)
    assert engine_metadata.external_data_files(graph) == [tmp_path / name for name in
                                                          ("else_c", "else_w", "then_c", "then_w")]


def test_publishing_a_rebuild_removes_the_previous_metadata_before_it_writes_the_engine(tmp_path, monkeypatch):
    """A rebuild for checkpoint bb killed between its engine and its metadata leaves no metadata of checkpoint aa's
    build next to bb's engine (the runtime would take it for aa's)."""
    engine = tmp_path / "graph.engine"
    built_for_aa = _metadata(checkpoint_sha256="aa" * 32)
    engine_metadata.publish_engine(engine, b"engine of checkpoint aa", built_for_aa)
    assert engine.read_bytes() == b"engine of checkpoint aa" and engine_metadata.read(engine) == built_for_aa

    def killed(metadata, engine_path):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_metadata, "write", killed)
    with pytest.raises(KeyboardInterrupt):
        engine_metadata.publish_engine(engine, b"engine of checkpoint bb", _metadata(checkpoint_sha256="bb" * 32))
    assert engine.read_bytes() == b"engine of checkpoint bb"
    with pytest.raises(EngineMetadataError, match="does not exist; every GuideSR engine comes with its metadata file"):
        engine_metadata.read(engine)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["graph.engine"]


def test_engine_metadata_of_the_previous_format_asks_for_a_rebuild(tmp_path):
    """Format 2 recorded onnx_sha256, the sha256 of the .onnx file alone: its engines are refused, not re-checked."""
    engine = tmp_path / "model.engine"
    data = json.loads(_metadata().to_json())
    data["format_version"], data["onnx_sha256"] = 2, data.pop("graph_sha256")
    engine_metadata.metadata_path(engine).write_text(json.dumps(data))
    with pytest.raises(EngineMetadataError) as err:
        engine_metadata.read(engine)
    assert str(err.value) == (f"{engine_metadata.metadata_path(engine)} has format version 2, this guidesr reads "
                              f"version 4; rebuild the engine with `make engine` (or `python -m export engine`)")


def test_engine_metadata_without_the_weights_sha256_asks_for_a_rebuild(tmp_path):
    """Format 3 recorded the checkpoint's sha256 alone, which does not tell its engines on two base models apart: they
    are refused, not checked against the checkpoint."""
    engine = tmp_path / "model.engine"
    data = json.loads(_metadata().to_json())
    data["format_version"] = 3
    del data["weights_sha256"]
    engine_metadata.metadata_path(engine).write_text(json.dumps(data))
    with pytest.raises(EngineMetadataError) as err:
        engine_metadata.read(engine)
    assert str(err.value) == (f"{engine_metadata.metadata_path(engine)} has format version 3, this guidesr reads "
                              f"version 4; rebuild the engine with `make engine` (or `python -m export engine`)")


def _saved_with_external_data(folder: Path, weight: float) -> Path:
    """folder/graph.onnx (folder made here) with its weights, `weight` and `weight` + 1, in graph.onnx.data."""
    folder.mkdir()
    path = folder / "graph.onnx"
    onnx.save_model(_weighted_graph(weight), path, save_as_external_data=True, location="graph.onnx.data",
                    size_threshold=0)
    return path


def _weights(graph: Path) -> list[float]:
    return [float(numpy_helper.to_array(tensor, str(graph.parent)).flat[0])
            for tensor in onnx.load(str(graph), load_external_data=False).graph.initializer]


def test_an_export_killed_between_the_data_and_the_graph_leaves_no_graph_reading_its_weights(tmp_path, monkeypatch):
    """publish_graph renames NAME.onnx.data, then NAME.onnx. The two exports' weights have the same layout, so the
    previous graph next to the new data would load them unnoticed, with the metadata of the previous weights."""
    published = tmp_path / "out" / "graph.onnx"
    published.parent.mkdir()
    onnx_export.publish_graph(_saved_with_external_data(tmp_path / "first", 0.0), published)
    assert _weights(published) == [0.0, 1.0]
    staged = _saved_with_external_data(tmp_path / "second", 10.0)
    replace = Path.replace

    def killed_before_the_graph(self, target):
        if self == staged:
            raise KeyboardInterrupt
        return replace(self, target)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "replace", killed_before_the_graph)
        with pytest.raises(KeyboardInterrupt):
            onnx_export.publish_graph(staged, published)
    assert not published.exists()
    onnx_export.publish_graph(_saved_with_external_data(tmp_path / "the-same-export-again", 10.0), published)
    assert _weights(published) == [10.0, 11.0]
    assert sorted(path.name for path in published.parent.iterdir()) == ["graph.onnx", "graph.onnx.data"]


def test_an_export_removes_only_the_scratch_folders_of_killed_exports_on_this_host(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    host = socket.gethostname()
    killed = f".trace-{ended.pid}-{host}-k1ll3d_1"
    kept = [f".trace-{os.getpid()}-{host}-running",  # this process: a running export
            f".trace-{ended.pid}-another-host-shared",  # the folder may be shared; that pid is another host's
            ".trace-3xq7z2lp",  # an older guidesr's, without its owner
            ".trace-notes"]
    for name in (killed, *kept):
        (tmp_path / name).mkdir()
        (tmp_path / name / "traced.onnx").write_bytes(b"part of a trace")
    (tmp_path / f".trace-{ended.pid}-{host}-a_file").write_text("not a scratch folder")
    onnx_export.remove_dead_scratch(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([*kept, f".trace-{ended.pid}-{host}-a_file"])
    assert onnx_export.scratch_owner(onnx_export.scratch_prefix() + "abc_1234") == (os.getpid(), host)
