"""runtime.backends: the table, `--backend auto`, onnxruntime (export cache, static and dynamic graphs),
TensorRT's engine check (no TensorRT needed), and on a GPU the compiled backend.

The model is the real tiny GuideSR on the embedded tiny-base, with its trainable parts (LoRA,
guidance injections, VAE zero-convs, prompt) set to small random values so that every branch
changes the output, saved as a checkpoint (so it has a sha256, which keys the ONNX cache).
"""

from __future__ import annotations

import copy
import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch

from export import engine_metadata
from export.graphs import guidesr_graph
from export.onnx_export import export_graphs
from guidesr import metrics
from guidesr.checkpoint import weights_sha256
from runtime.backends import (
    BACKENDS,
    BackendError,
    ONNXRuntimeBackend,
    TorchBackend,
    available_backends,
    check_engine,
    create_backend,
)
from runtime.backends.compiled import compiled_unavailable_reason
from runtime.backends.onnx_runtime import onnxruntime_unavailable_reason
from runtime.backends.tensorrt_engine import tensorrt_unavailable_reason
from runtime.validate import ReferenceBackend
from helpers import save_randomized_tiny

FP32_MAX_ABS = 1e-4  # an fp32 graph against eager PyTorch fp32 (export's criterion)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import guidesr

    return guidesr.load_model(checkpoint=save_randomized_tiny(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def model_weights(model) -> str:
    return weights_sha256(model)


@pytest.fixture(scope="module")
def other_base(model):
    """The model's checkpoint on other base weights: the same checkpoint sha256, other weights."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.vae.decoder.conv_out.bias.add_(0.25)
    assert other.descriptor.checkpoint_sha256 == model.descriptor.checkpoint_sha256
    return other


def tiles(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth random tiles in [-1, 1] (a bicubic upsample of noise, like the runtime's inputs)."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, (height + 3) // 4, (width + 3) // 4, generator=generator) * 2 - 1
    up = torch.nn.functional.interpolate(low, scale_factor=4, mode="bicubic", align_corners=False)
    return up[..., :height, :width].clamp(-1, 1).contiguous()


def psnr(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """guidesr.metrics PSNR of model outputs mapped from [-1, 1] to [0, 1]."""
    return metrics.psnr((candidate + 1) / 2, (reference + 1) / 2)


# ------------------------------------------------------------------------------------------ the table


def test_the_table_lists_every_backend_fastest_first():
    assert list(BACKENDS) == ["tensorrt", "compiled", "onnxruntime", "torch"]
    assert available_backends() == ["tensorrt", "compiled", "onnxruntime", "torch"]
    assert all(BACKENDS[name].name == name and BACKENDS[name].summary for name in BACKENDS)


def test_what_cannot_run_here_says_why():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "CUDA" in compiled_unavailable_reason(cpu)
    assert "CUDA" in tensorrt_unavailable_reason(cpu)
    assert onnxruntime_unavailable_reason(cpu) is None and BACKENDS["torch"].unavailable_reason(cpu) is None
    # What a CUDA machine with this environment's packages would be told (only the device type is read).
    if importlib.util.find_spec("tensorrt") is None:
        assert tensorrt_unavailable_reason(cuda) == (
            "TensorRT is not installed (pip install tensorrt-cu12, or tensorrt-cu13 for CUDA 13)")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert "pip install onnxruntime-gpu" in onnxruntime_unavailable_reason(cuda)


def test_auto_on_the_cpu_takes_torch_and_says_what_it_skipped(model):
    backend, why = create_backend("auto", model, "cpu", tile=64)
    assert isinstance(backend, TorchBackend) and backend.precision == "fp32"
    assert why.startswith("--backend auto chose torch (fp32 on cpu")
    for skipped in ("tensorrt: TensorRT runs on CUDA GPUs only", "compiled: torch.compile with CUDA graphs",
                    "onnxruntime: no --onnx graph given"):
        assert skipped in why


def test_torch_backend_runs_a_merged_copy_and_leaves_the_model_as_trained(model):
    from export.merge import lora_layer_names

    backend, _ = create_backend("torch", model, "cpu")
    assert backend.lora_merged_copy and "LoRA merged" in backend.describe()
    assert backend.model is not model and not lora_layer_names(backend.model)
    assert not model.lora_merged and lora_layer_names(model)  # the reference still runs the model as trained
    batch = tiles(2, 48, 64)
    reference = ReferenceBackend(model, "cpu")
    assert "LoRA merged" not in reference.describe()
    assert (backend(batch) - reference(batch)).abs().max().item() <= FP32_MAX_ABS
    plain = TorchBackend(model, "cpu", "fp32")  # direct construction keeps whatever it is given
    assert not plain.lora_merged_copy and plain.model is model


def test_the_compiled_backends_model_computes_what_the_model_computes(model):
    """prepare_model in float64 on the CPU: its rewrites (per-channel GroupNorm, fused UNet q/k/v, wide-head
    attention) leave the merged model's function unchanged, and every UNet attention's projections are fused."""
    from diffusers.models.attention_processor import Attention

    from export.merge import inference_copy
    from runtime.backends.compiled import prepare_model

    merged = inference_copy(model, torch.device("cpu"), torch.float64)
    prepared = prepare_model(model, torch.device("cpu"), torch.float64)
    attentions = [m for m in prepared.unet.modules() if isinstance(m, Attention)]
    assert attentions and all(getattr(m, "to_qkv", None) is not None or getattr(m, "to_kv", None) is not None
                              for m in attentions)
    batch = tiles(2, 48, 64).double().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert (prepared(batch).r1 - merged(batch).r1).abs().max().item() < 1e-10


def test_artifacts_go_to_their_backend(model, tmp_path):
    with pytest.raises(BackendError, match="--onnx is a graph for the onnxruntime backend, not for torch"):
        create_backend("torch", model, "cpu", onnx=tmp_path / "x.onnx")
    with pytest.raises(BackendError, match="--engine is for the tensorrt backend"):
        create_backend("onnxruntime", model, "cpu", engine=tmp_path / "x.engine")
    with pytest.raises(BackendError, match="unknown backend 'fast'"):
        create_backend("fast", model, "cpu")
    with pytest.raises(BackendError, match="backend 'compiled' cannot run on cpu: torch.compile with CUDA graphs"):
        create_backend("compiled", model, "cpu", tile=64)
    with pytest.raises(BackendError,
                       match="backend 'tensorrt' cannot run on cpu: TensorRT runs on CUDA GPUs only") as err:
        create_backend("tensorrt", model, "cpu", engine=tmp_path / "x.engine")
    assert ("TensorRT is not installed" in str(err.value)) == (importlib.util.find_spec("tensorrt") is None)
    with pytest.raises(BackendError, match="exports a static graph for one tile shape: give a tile size"):
        create_backend("onnxruntime", model, "cpu", tile=0)


# ---------------------------------------------------------------------------------------- onnxruntime


def test_onnxruntime_exports_caches_and_reexports_a_static_graph(model, tmp_path):
    """A static graph of 48x48 x batch 2, exported into the cache, then reused; 3 tiles = one padded batch."""
    cache = tmp_path / "cache"
    first = ONNXRuntimeBackend(model, "cpu", "fp32", tile=(48, 48), batch=2, cache_dir=cache)
    assert first.origin.startswith("exported now into the cache")
    assert first.graph_path == (cache / model.descriptor.checkpoint_sha256 / weights_sha256(model)[:16]
                                / "tiny-static-b2-48x48-fp32.onnx")
    assert (first.tile_shape, first.max_batch, first.provider) == ((48, 48), 2, "CPUExecutionProvider")
    assert sorted(p.name for p in first.graph_path.parent.iterdir()) == [first.graph_path.name]  # no leftovers

    batch = tiles(3, 48, 48)
    expected = TorchBackend(model, "cpu", "fp32")(batch)
    result = first(batch)
    assert result.shape == (3, 3, 48, 48) and result.dtype == torch.float32
    assert (result - expected).abs().max().item() <= FP32_MAX_ABS

    again = ONNXRuntimeBackend(model, "cpu", "fp32", tile=(48, 48), batch=2, cache_dir=cache)
    assert again.origin == "from the cache" and again.graph_path == first.graph_path
    torch.testing.assert_close(again(batch), result, rtol=0, atol=0)

    first.graph_path.write_bytes(b"half a graph")  # a damaged cache entry is exported again
    repaired = ONNXRuntimeBackend(model, "cpu", "fp32", tile=(48, 48), batch=2, cache_dir=cache)
    assert repaired.origin == "exported now into the cache (the cached file was unreadable)"
    torch.testing.assert_close(repaired(batch), result, rtol=0, atol=0)


def test_onnxruntime_does_not_take_a_cached_graph_of_the_same_checkpoint_on_other_base_weights(model, other_base,
                                                                                               tmp_path):
    """A checkpoint holds the trained parts only: loaded on another --base-model it has the same sha256, and the
    graph cached for the first base must not run the second."""
    first = ONNXRuntimeBackend(model, "cpu", "fp32", tile=(32, 32), cache_dir=tmp_path)
    second = ONNXRuntimeBackend(other_base, "cpu", "fp32", tile=(32, 32), cache_dir=tmp_path)
    assert second.origin.startswith("exported now into the cache") and second.graph_path != first.graph_path
    batch = tiles(1, 32, 32)
    expected = TorchBackend(other_base, "cpu", "fp32")(batch)
    assert (second(batch) - expected).abs().max().item() <= FP32_MAX_ABS


@pytest.fixture(scope="module")
def dynamic_graph(model, tmp_path_factory) -> Path:
    spec = guidesr_graph(model.config.size_multiple, (64, 64), "dynamic", max_batch=2)
    (graph,) = export_graphs(model, tmp_path_factory.mktemp("dynamic"), [spec], ["fp32"], weights="test")
    return graph.path


def test_onnxruntime_runs_a_given_dynamic_graph_at_other_sizes_and_batches(model, dynamic_graph):
    backend, why = create_backend("auto", model, "cpu", onnx=dynamic_graph)  # auto runs a given graph
    assert isinstance(backend, ONNXRuntimeBackend) and backend.origin == "given"
    assert why.startswith("--backend auto chose onnxruntime (fp32 on cpu")
    assert (backend.tile_shape, backend.max_batch, backend.precision) == (None, 2, "fp32")
    # 40x56 is not a multiple of 16: padded like the model pads; 3 tiles > max batch 2: split
    batch = tiles(3, 40, 56, seed=1)
    expected = TorchBackend(model, "cpu", "fp32")(batch)
    result = backend(batch)
    assert result.shape == batch.shape
    assert (result - expected).abs().max().item() <= FP32_MAX_ABS
    with pytest.raises(ValueError, match=r"accepts image shapes from \(1, 3, 16, 16\) to \(2, 3, 128, 128\)"):
        backend(tiles(1, 144, 64))


def test_onnxruntime_refuses_a_graph_of_another_checkpoint_or_precision(model, dynamic_graph, tmp_path):
    with pytest.raises(BackendError, match="--precision fp16 asked for, but the graph .* is fp32"):
        create_backend("onnxruntime", model, "cpu", "fp16", onnx=dynamic_graph)
    other = onnx.load(str(dynamic_graph))
    for prop in other.metadata_props:
        if prop.key == "checkpoint_sha256":
            prop.value = "0" * 64
    onnx.save(other, str(tmp_path / "other.onnx"))
    with pytest.raises(BackendError, match="exported from checkpoint 000000000000, the model loaded is"):
        create_backend("onnxruntime", model, "cpu", onnx=tmp_path / "other.onnx")
    foreign = onnx.load(str(dynamic_graph))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    with pytest.raises(BackendError, match="foreign.onnx is not a GuideSR graph .* lacks preset, size_multiple"):
        create_backend("onnxruntime", model, "cpu", onnx=tmp_path / "foreign.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not a graph")
    with pytest.raises(BackendError, match="is not a readable ONNX file"):
        create_backend("onnxruntime", model, "cpu", onnx=tmp_path / "broken.onnx")
    with pytest.raises(BackendError, match="does not exist"):
        create_backend("onnxruntime", model, "cpu", onnx=tmp_path / "missing.onnx")


def test_onnxruntime_refuses_a_given_graph_of_the_same_checkpoint_on_other_base_weights(model_weights, other_base,
                                                                                        dynamic_graph):
    with pytest.raises(BackendError) as err:
        create_backend("onnxruntime", other_base, "cpu", onnx=dynamic_graph)
    assert str(err.value) == (
        f"{dynamic_graph.name} holds other weights than the model loaded (weights {model_weights[:12]}, the model's "
        f"are {weights_sha256(other_base)[:12]}): the same checkpoint on another --base-model, or untrained weights of "
        f"another seed; pass the --base-model (or --seed) it was exported from, or leave out --onnx to export the "
        f"loaded model")


def without_weights_sha256(graph: Path, path: Path) -> Path:
    """The graph saved at `path` without the weights_sha256 key, as guidesr exported it before graphs recorded it."""
    proto = onnx.load(str(graph))
    kept = [prop for prop in proto.metadata_props if prop.key != "weights_sha256"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, str(path))
    return path


def test_onnxruntime_asks_to_export_again_a_given_graph_without_weights_sha256(model, dynamic_graph, tmp_path):
    old = without_weights_sha256(dynamic_graph, tmp_path / "old.onnx")
    with pytest.raises(BackendError) as err:
        create_backend("onnxruntime", model, "cpu", onnx=old)
    assert str(err.value) == ("old.onnx was exported by an older guidesr: its metadata lacks weights_sha256 (the sha256 "
                              "of the weights it holds), so it cannot be checked against the model; export it again "
                              "(`python -m export onnx`)")


def test_onnxruntime_exports_again_a_cached_graph_without_weights_sha256(model, model_weights, tmp_path):
    first = ONNXRuntimeBackend(model, "cpu", "fp32", tile=(32, 32), cache_dir=tmp_path)
    without_weights_sha256(first.graph_path, first.graph_path)
    again = ONNXRuntimeBackend(model, "cpu", "fp32", tile=(32, 32), cache_dir=tmp_path)
    assert again.origin == "exported now into the cache (the cached file was exported by an older guidesr)"
    assert again.graph_path == first.graph_path
    assert {prop.key: prop.value for prop in onnx.load(str(again.graph_path)).metadata_props}["weights_sha256"] == (
        model_weights)


def test_onnxruntime_cache_removes_the_scratch_folder_of_a_killed_export(model, tmp_path):
    first = ONNXRuntimeBackend(model, "cpu", "fp32", tile=(32, 32), cache_dir=tmp_path)
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    killed = first.graph_path.parent / f".trace-{ended.pid}-{socket.gethostname()}-k1ll3d_1"
    killed.mkdir()
    (killed / "traced.onnx").write_bytes(b"part of a trace")
    first.graph_path.unlink()  # stale: the next backend exports it again into that folder
    ONNXRuntimeBackend(model, "cpu", "fp32", tile=(32, 32), cache_dir=tmp_path)
    assert not killed.exists()
    assert [path.name for path in first.graph_path.parent.iterdir() if path.name.startswith(".")] == []


# ---------------------------------------------------------------------- TensorRT: the engine check


def write_engine_metadata(engine: Path, model, model_weights: str, **changes) -> Path:
    """NAME.engine.json as export's builder writes it, for a model (of weights_sha256 `model_weights`) and a (made-up)
    build machine."""
    spec = guidesr_graph(model.config.size_multiple, (64, 64), "static")
    fields = dict(
        tensorrt_version="10.13.3.9", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", precision="fp16",
        checkpoint_sha256=model.descriptor.checkpoint_sha256, weights_sha256=model_weights, preset="tiny", scale=4,
        size_multiple=16,
        input_names=("image",), output_names=("r1",), profiles=(), graph_spec=spec.to_json(),
        onnx_file="tiny-static-b1-64x64-fp16.onnx", graph_sha256="0" * 64, builder_optimization_level=3,
        guidesr_version="0.1.0",
    ) | changes
    return engine_metadata.write(engine_metadata.EngineMetadata(**fields), engine)


@pytest.fixture
def engine(tmp_path) -> Path:
    """The engine file's bytes are never read: the check refuses before anything is deserialized."""
    path = tmp_path / "tiny-static-b1-64x64-fp16.engine"
    path.write_bytes(b"stands for a serialized engine")
    return path


H100 = ("NVIDIA H100 80GB HBM3", "9.0", "10.13.3.9")


def test_the_engine_check_accepts_an_engine_built_here_for_this_model(model, model_weights, engine):
    write_engine_metadata(engine, model, model_weights)
    metadata = check_engine(engine, model.descriptor, model_weights, *H100)
    assert metadata.spec.tile == (64, 64) and metadata.precision == "fp16"


@pytest.mark.parametrize("changes,message", [
    ({"gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"},
     "it was built on a NVIDIA A100-SXM4-80GB (compute capability 8.0), this GPU is a NVIDIA H100 80GB HBM3 "
     "(compute capability 9.0)"),
    ({"tensorrt_version": "10.9.0.34"}, "it was built with TensorRT 10.9.0.34, this is TensorRT 10.13.3.9"),
    ({"checkpoint_sha256": "f" * 64}, "it holds the weights of checkpoint sha256 ffffffffffff"),
    ({"weights_sha256": "f" * 64}, "it holds other weights than the model (weights sha256 ffffffffffff…, the model's "
                                   "are sha256 "),
    ({"preset": "sd-turbo", "size_multiple": 64}, "was built for preset sd-turbo"),
    ({"input_names": ("x",)}, "has inputs ['x'] and outputs ['r1']"),
])
def test_the_engine_check_refuses_a_mismatch_with_a_clear_message(model, model_weights, engine, changes, message):
    write_engine_metadata(engine, model, model_weights, **changes)
    with pytest.raises(BackendError) as caught:
        check_engine(engine, model.descriptor, model_weights, *H100)
    assert message in str(caught.value)


def test_the_engine_check_needs_the_metadata_file(model, model_weights, engine):
    with pytest.raises(BackendError, match="every GuideSR engine comes with its metadata file"):
        check_engine(engine, model.descriptor, model_weights, *H100)
    with pytest.raises(BackendError, match="does not exist"):
        check_engine(engine.with_name("missing.engine"), model.descriptor, model_weights, *H100)


# ------------------------------------------------------------------------------------------- on a GPU


@pytest.fixture(scope="module")
def cuda_model(model):
    import copy

    return copy.deepcopy(model).to("cuda")


@pytest.mark.gpu
def test_half_group_norm_keeps_fp32_statistics_on_cuda():
    """The compiled backend runs GroupNorm (as ChannelStatsGroupNorm) in fp16: its statistics must not be
    accumulated in fp16.

    One group here holds 2 * 256 * 256 values of mean 50: their sum of squares (3e8) is far past
    fp16's 65504, so an fp16 accumulation would give inf/NaN or garbage.
    """
    from runtime.backends.group_norm import ChannelStatsGroupNorm

    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 64, 256, 256, device="cuda", generator=generator) * 10 + 50
    expected = torch.nn.functional.group_norm(x, 32)
    eager = torch.nn.functional.group_norm(x.half(), 32)
    compiled = torch.compile(lambda t: torch.nn.functional.group_norm(t, 32), dynamic=False)(x.half())
    per_channel = ChannelStatsGroupNorm(torch.nn.GroupNorm(32, 64, affine=False).cuda())  # what `compiled` runs
    compiled_per_channel = torch.compile(per_channel, dynamic=False)(
        x.half().contiguous(memory_format=torch.channels_last))
    for result in (eager, compiled, compiled_per_channel):
        assert torch.isfinite(result).all()
        # fp16 rounding of the input (half an ulp of ~64 is 0.016, over sigma 10) and of outputs up to ~5 (0.002)
        assert (result.float() - expected).abs().max().item() < 1e-2


@pytest.mark.gpu
def test_eager_triton_kernels_match_pytorch_in_fp32(cuda_model):
    batch = tiles(2, 64, 64)
    with_kernels = TorchBackend(cuda_model, "cuda", "fp32")(batch)
    reference = ReferenceBackend(cuda_model, "cuda")(batch)  # the same model with the kernels switched off
    assert (with_kernels - reference).abs().max().item() <= FP32_MAX_ABS
    on_device = TorchBackend(cuda_model, "cuda", "fp32")(batch.cuda())  # device_io: the result stays on the GPU
    assert on_device.is_cuda and (on_device.cpu() - reference).abs().max().item() <= FP32_MAX_ABS


@pytest.fixture(scope="module")
def compiled(cuda_model):
    from runtime.backends import CompiledBackend

    return CompiledBackend(cuda_model, "cuda", "fp16", (64, 64), batch=2, autotune=False)


@pytest.mark.gpu
def test_compiled_backend_matches_the_fp32_reference(cuda_model, compiled):
    assert compiled.triton_kernels and compiled.describe().startswith("compiled (fp16 on cuda")
    batch = tiles(3, 64, 64)  # two graph replays, the second with a padded batch
    result = compiled(batch)
    reference = ReferenceBackend(cuda_model, "cuda")(batch)
    assert result.shape == batch.shape and torch.isfinite(result).all()
    assert psnr(result, reference) >= 40.0
    torch.testing.assert_close(compiled(batch), result, rtol=0, atol=0)  # replays are deterministic
    on_device = compiled(batch.cuda())  # device_io: no host round trip, the same replays
    assert on_device.is_cuda
    torch.testing.assert_close(on_device.cpu(), result, rtol=0, atol=0)
    assert not cuda_model.lora_merged  # the backend merged LoRA into its own copy


@pytest.mark.gpu
def test_compiled_backend_with_and_without_triton_kernels_agree(cuda_model, compiled):
    import copy

    from guidesr.model import set_kernels_enabled
    from runtime.backends import CompiledBackend

    plain_model = copy.deepcopy(cuda_model)
    set_kernels_enabled(plain_model, False)
    plain = CompiledBackend(plain_model, "cuda", "fp16", (64, 64), batch=2, autotune=False)
    assert not plain.triton_kernels
    batch = tiles(2, 64, 64, seed=3)
    with_kernels, without = compiled(batch), plain(batch)
    reference = ReferenceBackend(cuda_model, "cuda")(batch)
    assert psnr(with_kernels, without) >= 45.0  # the two differ only by fp16 rounding
    assert psnr(with_kernels, reference) >= psnr(without, reference) - 1.0  # the kernels are no less accurate


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in onnxruntime.get_available_providers(),
                    reason="onnxruntime-gpu is not installed (no CUDAExecutionProvider)")
def test_onnxruntime_on_the_cuda_provider(cuda_model, tmp_path):
    backend, _ = create_backend("onnxruntime", cuda_model, "cuda", tile=64, onnx_cache=tmp_path)
    assert backend.provider == "CUDAExecutionProvider" and backend.precision == "fp16"
    batch = tiles(1, 64, 64)
    assert psnr(backend(batch), ReferenceBackend(cuda_model, "cuda")(batch)) >= 40.0


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_engine_runs_and_a_stale_one_is_refused(model, cuda_model, other_base, tmp_path):
    from export.tensorrt_build import build_engine

    spec = guidesr_graph(model.config.size_multiple, (64, 64), "static")
    (graph,) = export_graphs(model, tmp_path, [spec], ["fp16"], weights="test")
    engine = graph.path.with_suffix(".engine")
    build_engine(graph.path, engine, optimization_level=0)
    backend, why = create_backend("auto", cuda_model, "cuda", engine=engine)
    assert backend.name == "tensorrt" and why.startswith("--backend auto chose tensorrt")
    batch = tiles(1, 64, 64)
    assert psnr(backend(batch), ReferenceBackend(cuda_model, "cuda")(batch)) >= 40.0
    with pytest.raises(BackendError, match="it holds other weights than the model"):
        create_backend("tensorrt", copy.deepcopy(other_base).to("cuda"), "cuda", engine=engine)

    metadata = engine_metadata.read(engine)
    engine_metadata.write(engine_metadata.EngineMetadata(**{**metadata.__dict__, "checkpoint_sha256": "f" * 64}),
                          engine)
    with pytest.raises(BackendError, match="it holds the weights of checkpoint sha256 ffffffffffff"):
        create_backend("tensorrt", cuda_model, "cuda", engine=engine)


def test_precision_auto_and_explicit():
    from types import SimpleNamespace

    from runtime.backends.base import resolve_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    half, no_half = SimpleNamespace(supports_half=True), SimpleNamespace(supports_half=False)
    assert ([resolve_precision(p, cuda, half) for p in (None, "auto", "fp32", "fp16")]
            == ["fp16", "fp16", "fp32", "fp16"])
    assert resolve_precision("auto", cuda, None) == "fp16"
    assert resolve_precision("auto", cuda, no_half) == "fp32"  # a model without fp16 support stays fp32
    assert resolve_precision(None, cpu, half) == "fp32"
    with pytest.raises(BackendError, match=r"precision must be auto or one of \('fp32', 'fp16'\), not 'bf16'"):
        resolve_precision("bf16", cpu, half)


def test_static_tile_shape_is_rounded_down_to_the_size_multiple():
    from runtime.backends.base import BackendRequest

    cpu = torch.device("cpu")
    assert BackendRequest(cpu, tile=(50, 37)).tile_for(16, "compiled") == (48, 32)
    assert BackendRequest(cpu, tile=100).tile_for(16, "compiled") == (96, 96)
    assert BackendRequest(cpu, tile=(8, 70)).tile_for(16, "compiled") == (16, 64)
    with pytest.raises(BackendError, match="the compiled backend runs one fixed tile shape: give a tile size"):
        BackendRequest(cpu).tile_for(16, "compiled")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_asking_for_cuda_without_it_says_so():
    from runtime.backends import resolve_device

    with pytest.raises(BackendError, match="--device cuda:1: CUDA is not available on this machine"):
        resolve_device("cuda:1")
