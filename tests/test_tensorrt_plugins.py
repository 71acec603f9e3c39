"""Issue 5 (acceptance 4): the FCA kernels as TensorRT plugins, as far as a machine without TensorRT checks them.

Checked here: the plugin-node ONNX graph of the tiny preset (structure, inputs, types, checker, the
TensorRT op check), the kernels' ahead-of-time compilation to PTX for sm_80/sm_90 (in a subprocess
without TRITON_INTERPRET, as tests/test_kernels_compile_sm90.py does), the plugin launch plan run
through Triton's interpreter against the PyTorch reference, and the error paths. On a GPU, without
TensorRT: the trimmed PTX loaded by the CUDA driver and launched with exactly the plugins' arguments.
The TensorRT engine test needs a GPU and TensorRT >= 10.10 and is skipped without them.
"""

import ctypes
import functools
import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch

from export.graphs import GraphSpec, guidesr_graph
from export.onnx_export import export_graphs, read_metadata
from export.plugin_nodes import (
    CHANNEL_GATE,
    DOMAIN,
    GATED_GELU,
    GELU_PARTIAL_SUM,
    PLUGIN_NAMESPACE,
    PLUGIN_OPS,
    FCAPluginBlock,
)
from export.trt_supported_ops import tensorrt_problems
from guidesr.guidance import FCABlock
from helpers import randomized_tiny

REPO = Path(__file__).resolve().parents[1]
STATIC_TILE = (64, 48)
# (dtype, compute capability, channels, PTX ISA: None for Triton's own, 80 for a CUDA 12.0 driver's)
AOT_CASES = [("fp16", 90, 24, None), ("fp32", 80, 24, None), ("bf16", 90, 128, None), ("fp16", 90, 64, 80)]


@pytest.fixture(scope="module")
def model():
    return randomized_tiny(0)


@pytest.fixture(scope="module")
def graphs(model, tmp_path_factory):
    """{(variant, precision, trt_plugins): path}: plugin graphs (static fp16, dynamic fp32) and a plain static fp16."""
    out = tmp_path_factory.mktemp("plugins")
    specs = [guidesr_graph(16, STATIC_TILE, "static", trt_plugins=True), guidesr_graph(16, STATIC_TILE, "static")]
    exported = export_graphs(model, out, specs, precisions=["fp16"], weights="test")
    exported += export_graphs(model, out, [guidesr_graph(16, (64, 64), "dynamic", trt_plugins=True)],
                              precisions=["fp32"], weights="test")
    return {(g.spec.variant, g.precision, g.spec.trt_plugins): g.path for g in exported}


def fca_blocks(model) -> int:
    return sum(isinstance(module, FCABlock) for module in model.modules())


def op_counts(path: Path) -> Counter:
    return Counter((node.domain, node.op_type) for node in onnx.load(str(path)).graph.node)


def test_plugin_graphs_hold_three_plugin_nodes_per_fca_block_and_no_decomposition(graphs, model):
    blocks = fca_blocks(model)
    assert blocks == 4
    plain = op_counts(graphs[("static", "fp16", False)])
    for key in [("static", "fp16", True), ("dynamic", "fp32", True)]:
        path = graphs[key]
        onnx.checker.check_model(str(path), full_check=True)
        counts = op_counts(path)
        assert {op: counts[op] for op in PLUGIN_OPS} == {op: blocks for op in PLUGIN_OPS}
        assert counts[("", "Gemm")] == counts[("", "ReduceMean")] == 0  # FCA's gates and pools, all of them
        if key[1] == "fp16":
            for op in ("Erf", "Sigmoid"):  # one GELU and one sigmoid per block left the graph
                assert counts[("", op)] == plain[("", op)] - blocks
        assert tensorrt_problems(path, PLUGIN_OPS) == []
        problems = tensorrt_problems(path)
        assert len(problems) == 3 * blocks and all(f"domain {DOMAIN!r}" in p for p in problems)
    assert not any(domain == DOMAIN for domain, _ in plain)


def test_plugin_nodes_read_the_blocks_tensors(graphs, model):
    proto = onnx.load(str(graphs[("static", "fp16", True)]))
    proto = onnx.shape_inference.infer_shapes(proto)
    initializers = {t.name: t for t in proto.graph.initializer}
    producers = {out: node for node in proto.graph.node for out in node.output}
    values = {v.name: v for v in (*proto.graph.value_info, *proto.graph.output)}
    channels = model.guidance.frgnet[0].blocks[0].conv1.out_channels
    nodes = [node for node in proto.graph.node if node.domain == DOMAIN]
    gates = {node.output[0]: node for node in nodes if node.op_type == CHANNEL_GATE}
    partial_sums = {node.output[0]: node for node in nodes if node.op_type == GELU_PARTIAL_SUM}
    for gated in (node for node in nodes if node.op_type == GATED_GELU):
        y, y_bias, gate_out = gated.input
        gate = gates[gate_out]
        partial_out, weight, bias, gate_y = gate.input
        partial = partial_sums[partial_out]
        assert list(partial.input) == [y, y_bias] and gate_y == y
        conv1 = producers[y]
        assert conv1.op_type == "Conv" and len(conv1.input) == 2  # conv1 without its bias: the plugins add it
        assert list(initializers[y_bias].dims) == [channels]
        assert list(initializers[weight].dims) == [channels, channels, 1, 1]
        assert list(initializers[bias].dims) == [channels]
        assert initializers[y_bias].data_type == onnx.TensorProto.FLOAT16
        for node in (partial, gate, gated):
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attributes == {"plugin_namespace": PLUGIN_NAMESPACE.encode(), "aot": 1}
        z = values[gated.output[0]].type.tensor_type
        assert z.elem_type == onnx.TensorProto.FLOAT16
        assert [d.dim_value for d in z.shape.dim] == [1, channels, *STATIC_TILE]
        assert values[gate.output[0]].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert len(nodes) == 3 * fca_blocks(model)


def test_static_plugin_graph_folds_every_shape(graphs):
    assert ("", "Shape") not in op_counts(graphs[("static", "fp16", True)])


def test_plugin_option_shows_in_the_spec_and_the_file_name_only_when_set(graphs):
    plugin, plain = graphs[("static", "fp16", True)], graphs[("static", "fp16", False)]
    assert plugin.name == "tiny-static-b1-64x48-fp16-trtplugins.onnx"
    assert plain.name == "tiny-static-b1-64x48-fp16.onnx"
    assert "trt_plugins" not in json.loads(read_metadata(plain)["graph_spec"])
    spec = GraphSpec.from_json(read_metadata(plugin)["graph_spec"])
    assert spec.trt_plugins and spec == guidesr_graph(16, STATIC_TILE, "static", trt_plugins=True)
    assert GraphSpec.from_json(guidesr_graph(16, STATIC_TILE, "dynamic").to_json()).trt_plugins is False


def test_plugin_block_computes_what_the_fca_block_computes():
    """The block traced into plugin nodes repeats FCABlock's structure (conv1 without bias, attention, conv2,
    residual): it must compute the same, or the plugin graph would silently differ from the model."""
    torch.manual_seed(0)
    block = FCABlock(12, use_kernel=False).double()
    x = torch.randn(2, 12, 9, 14, dtype=torch.float64)
    torch.testing.assert_close(FCAPluginBlock(block)(x), block(x), rtol=1e-12, atol=1e-12)


def test_plugin_nodes_context_swaps_blocks_and_puts_the_originals_back():
    """Inside fca_plugin_nodes every FCABlock (nested too) is an FCAPluginBlock; after it, even on an error,
    the originals."""
    from export.plugin_nodes import fca_plugin_nodes

    blocks = [FCABlock(4, use_kernel=False) for _ in range(3)]
    module = torch.nn.Sequential(blocks[0], torch.nn.Sequential(torch.nn.Identity(), blocks[1]), blocks[2])
    with pytest.raises(RuntimeError, match="inside"), fca_plugin_nodes(module):
        assert [type(m) for m in (module[0], module[1][1], module[2])] == [FCAPluginBlock] * 3
        raise RuntimeError("inside")
    assert module[0] is blocks[0] and module[1][1] is blocks[1] and module[2] is blocks[2]


def test_plugin_export_leaves_the_model_unchanged(graphs, model):
    assert fca_blocks(model) == 4 and all(type(m).__name__ != "FCAPluginBlock" for m in model.modules())


# ------------------------------------------------------------------------- kernels ahead of time, on the CPU

def test_plugin_kernels_compile_to_ptx_for_sm80_and_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count("plugin kernel ok") == len(AOT_CASES) * 3, result.stdout


def compile_and_check(dtype: str, capability: int, channels: int, ptx_version: int | None) -> None:
    import re

    from kernels.fca_attention_aot import compile_plugin_kernels, plugin_kernels, plugin_ptx_version

    sources = plugin_kernels(dtype, channels)
    isa = plugin_ptx_version(capability, None) if ptx_version is None else ptx_version
    for name, kernel in compile_plugin_kernels(dtype, capability, channels, ptx_version).items():
        entry = re.search(r"\.entry (\w+)\(([^)]*)\)", kernel.ptx)
        assert f".target sm_{capability}" in kernel.ptx and kernel.cubin
        assert re.search(r"^\.version (\d+)\.(\d+)$", kernel.ptx, re.M).groups() == (str(isa // 10), str(isa % 10))
        assert entry.group(1) == kernel.name == sources[name].fn.__name__
        # TensorRT passes the plugin's inputs, scalars and outputs, nothing else (Triton's scratch pointers trimmed)
        assert entry.group(2).count(".param") == len(sources[name].signature)
        assert kernel.num_warps == 4 and kernel.shared_mem >= 0
        print(f"{name} {dtype} sm_{capability} C={channels} PTX {isa}: plugin kernel ok", flush=True)


def test_plugin_ptx_isa_is_lowered_to_the_drivers_never_raised():
    pytest.importorskip("triton.backends.nvidia")
    from triton.backends.nvidia.compiler import get_ptxas, ptx_get_version

    from kernels.fca_attention_aot import plugin_ptx_version

    own = ptx_get_version(get_ptxas(90).version)  # the ISA of the ptxas Triton ships
    assert plugin_ptx_version(90, None) == own
    assert plugin_ptx_version(90, 80) == 80  # a CUDA 12.0 driver
    assert plugin_ptx_version(90, own + 10) == own  # a driver newer than Triton's ptxas: ptxas's ISA
    assert ptx_get_version("13.0") == 90 and ptx_get_version("12.8") == 87  # the table driver_ptx_version reads


PTX_WITH_SCRATCH = """.version 8.7
.target sm_90a
.address_size 64
.visible .entry k(
\t.param .u64 .ptr .global .align 1 k_param_0,
\t.param .u32 k_param_1,
\t.param .u64 .ptr .global .align 1 k_param_2,
\t.param .u64 .ptr .global .align 1 k_param_3
)
{
\tld.param.u64 \t%rd1, [k_param_0];
\tld.param.u32 \t%r1, [k_param_1];
\tBODY
\tret;
}
"""


def test_trimming_drops_unread_trailing_params_and_refuses_read_ones():
    from kernels.fca_attention_aot import trim_entry_params

    ptx = PTX_WITH_SCRATCH.replace("BODY", "")
    trimmed = trim_entry_params(ptx, "k", 2)
    declared = trimmed[trimmed.index("(") + 1 : trimmed.index(")")]
    assert ([line.split()[-1].rstrip(",") for line in declared.splitlines() if line.strip()]
            == ["k_param_0", "k_param_1"])
    assert trimmed[trimmed.index(")") :] == ptx[ptx.index(")") :]  # the body is untouched
    assert trim_entry_params(ptx, "k", 4) == ptx  # nothing to drop: the text comes back as it was
    reads_scratch = PTX_WITH_SCRATCH.replace("BODY", "ld.param.u64 \t%rd3, [k_param_3];")
    with pytest.raises(ValueError, match=r"extra parameters \['k_param_3'\]"):
        trim_entry_params(reads_scratch, "k", 2)
    reads_first_extra = PTX_WITH_SCRATCH.replace("BODY", "ld.param.u64 \t%rd2, [k_param_2];")  # right after `keep`
    with pytest.raises(ValueError, match=r"extra parameters \['k_param_2'\]"):
        trim_entry_params(reads_first_extra, "k", 2)
    with pytest.raises(ValueError, match="fewer than its 5 arguments"):
        trim_entry_params(ptx, "k", 5)
    with pytest.raises(ValueError, match="no .entry other"):
        trim_entry_params(ptx, "other", 2)


@pytest.mark.parametrize("batch, channels, height, width", [(1, 5, 37, 53), (3, 24, 131, 127), (2, 1, 1, 16385)])
def test_plugin_launches_cover_odd_shapes(batch, channels, height, width):
    from kernels.fca_attention import gate_block_sizes
    from kernels.fca_attention_aot import PLUGIN_BLOCK_HW, PLUGIN_CHUNK, plugin_launches
    from triton import cdiv

    hw = height * width
    launches = plugin_launches(batch, channels, hw, cdiv)
    (programs, chunks), scalars = launches["gelu_partial_sum"].grid, launches["gelu_partial_sum"].scalars
    assert programs == batch * channels and (chunks - 1) * PLUGIN_CHUNK < hw <= chunks * PLUGIN_CHUNK
    assert scalars == (channels, hw, chunks, PLUGIN_CHUNK)
    block_co, _ = gate_block_sizes(channels)
    assert launches["channel_gate"].grid == (batch, cdiv(channels, block_co))
    assert launches["channel_gate"].scalars == (channels, chunks, hw, channels)
    (gated_programs,) = launches["gated_gelu"].grid
    assert launches["gated_gelu"].scalars == (channels, hw, cdiv(hw, PLUGIN_BLOCK_HW))
    assert gated_programs == cdiv(hw, PLUGIN_BLOCK_HW) * batch * channels


@pytest.mark.parametrize("batch, channels, height, width", [
    (4, 32, 8192, 8192),  # the sd-turbo preset's C at the max of a dynamic profile for 4096² tiles: C·H·W = 2^31
    (4, 128, 4320, 7680),  # 4K UHD tiles, max 2x: C·H·W = 4.2e9
])
def test_plugin_scalars_fit_32_bits_where_c_times_hw_does_not(batch, channels, height, width):
    """TensorRT passes plugin scalars as 32-bit integers; a sample stride C·H·W past 2^31 - 1 among them would wrap
    (a negative offset for every sample after the first). The kernels form it in 64 bits instead."""
    from triton import cdiv

    from kernels import fca_attention_aot

    assert channels * height * width > 2**31 - 1
    for name, launch in fca_attention_aot.plugin_launches(batch, channels, height * width, cdiv).items():
        assert max(launch.scalars) <= 2**31 - 1, (name, launch.scalars)
    assert fca_attention_aot.plugin_shape_problems(batch, channels, height * width) == []


def test_plugin_shape_problems_name_the_limit_they_pass():
    from kernels.fca_attention_aot import PLUGIN_CHUNK, plugin_shape_problems

    largest = 65535 * PLUGIN_CHUNK  # H·W of 65535 partial-sum chunks, CUDA's most grid blocks along y
    assert plugin_shape_problems(4, 64, largest) == []
    assert plugin_shape_problems(1, 1, largest + 1) == [
        "the gelu_partial_sum kernel's grid along y is 65536, past its limit of 65535"]
    problems = plugin_shape_problems(1, 1, 2**31)
    assert ("the gelu_partial_sum kernel's 32-bit scalar argument is 2147483648, past its limit of 2147483647"
            in problems)
    assert "the 32-bit H·W index, rounded up to whole partial-sum chunks is 2147483648, past its limit of 2147483647" \
        in problems


def test_graph_shape_problems_take_c_from_the_plugin_graph(graphs):
    """The engine builder's check: the tiny preset's blocks (C = 16) at the profile's largest image."""
    from export.tensorrt_plugins import graph_shape_problems

    for key in [("static", "fp16", True), ("dynamic", "fp32", True)]:
        assert graph_shape_problems(graphs[key], (4, 3, 8192, 8192)) == []
        assert graph_shape_problems(graphs[key], (2, 3, 32768, 32768)) == [
            "C = 16, [B, C, H, W] = [2, 16, 32768, 32768]: the gelu_partial_sum kernel's grid along y is 65536, past "
            "its limit of 65535"]


def run_plugin_chain(y, weight, bias, y_bias, launch) -> torch.Tensor:
    """The three plugin kernels in graph order on NaN-filled outputs; `launch(name, arguments)` runs one kernel
    with its runtime arguments in TensorRT's order (tensor inputs, scalars, output). Returns z."""
    from triton import cdiv

    from kernels.fca_attention_aot import partial_sum_chunks, plugin_launches

    batch, channels, height, width = y.shape
    hw = height * width
    launches = plugin_launches(batch, channels, hw, cdiv)
    partial = torch.full((batch, channels, partial_sum_chunks(hw, cdiv)), float("nan"), device=y.device)
    gate = torch.full((batch, channels), float("nan"), device=y.device)
    z = torch.full_like(y, float("nan"))
    for name, inputs, output in [("gelu_partial_sum", (y, y_bias), partial),
                                 ("channel_gate", (partial, weight, bias, y), gate),
                                 ("gated_gelu", (y, y_bias, gate), z)]:
        launch(name, launches[name].grid, [*inputs, *launches[name].scalars, output])
    return z


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch, channels, height, width", [(2, 5, 7, 9), (1, 3, 131, 127)])
def test_plugin_launch_plan_matches_the_reference_in_the_interpreter(dtype, batch, channels, height, width):
    """The three kernels launched as the plugins launch them, on the CPU: the compiled signature's runtime arguments
    (inputs, scalars, output: the order TensorRT passes them in), grids and constexprs."""
    from kernels.fca_attention import fca_channel_attention_reference
    from kernels.fca_attention_aot import plugin_kernels

    generator = torch.Generator().manual_seed(3)
    y, weight, bias, y_bias = (torch.randn(*shape, generator=generator).to(dtype) for shape in
                               [(batch, channels, height, width), (channels, channels, 1, 1), (channels,), (channels,)])
    kernels = plugin_kernels("fp32" if dtype == torch.float32 else "fp16", channels)

    def launch(name, grid, arguments):
        kernel = kernels[name]
        kernel.fn[grid](**dict(zip(kernel.signature, arguments, strict=True)), **kernel.constexprs)

    z = run_plugin_chain(y, weight, bias, y_bias, launch)
    expected = fca_channel_attention_reference(y.double(), weight.double(), bias.double(), y_bias.double())
    tolerance = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(z.double(), expected, atol=tolerance, rtol=tolerance)
    # The launcher's rule, error <= 2x PyTorch's own + eps: for fp32 this holds only with the erf GELU (the fp16
    # form's fit error, 4e-6, is inside the 1e-5 above), so an fp32 plugin compiled with the fast form fails here.
    own_error = (fca_channel_attention_reference(y, weight, bias, y_bias).double() - expected).abs().max().item()
    error = (z.double() - expected).abs().max().item()
    assert error <= 2 * own_error + torch.finfo(dtype).eps, (error, own_error)


# ------------------------------------------------------ kernels ahead of time, on the GPU without TensorRT

@functools.cache
def cuda_driver() -> ctypes.CDLL:
    """libcuda with the argument types of the calls below."""
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuModuleLoadData.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
    lib.cuModuleGetFunction.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p]
    lib.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [
        ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p)]
    lib.cuModuleUnload.argtypes = [ctypes.c_void_p]
    lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return lib


class DriverKernel:
    """One AOT kernel loaded from its PTX by the CUDA driver (libcuda via ctypes), launched as TensorRT launches an
    AOT plugin's kernel: the plugin's tensor inputs, its scalars, its outputs, and nothing else."""

    MAX_DYNAMIC_SHARED_SIZE_BYTES = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES

    def __init__(self, kernel):
        self.kernel, self.driver = kernel, cuda_driver()
        self.module, self.function = ctypes.c_void_p(), ctypes.c_void_p()
        torch.cuda.init()  # PyTorch's primary context is current on this thread from here on
        self.check("cuModuleLoadData", self.driver.cuModuleLoadData(ctypes.byref(self.module), kernel.ptx.encode()))
        self.check("cuModuleGetFunction",
                   self.driver.cuModuleGetFunction(ctypes.byref(self.function), self.module, kernel.name.encode()))
        if kernel.shared_mem > 48 * 1024:
            self.check("cuFuncSetAttribute", self.driver.cuFuncSetAttribute(
                self.function, self.MAX_DYNAMIC_SHARED_SIZE_BYTES, kernel.shared_mem))

    def check(self, call: str, result: int) -> None:
        if result != 0:
            name = ctypes.c_char_p()
            self.driver.cuGetErrorName(result, ctypes.byref(name))
            raise RuntimeError(f"{call} failed for {self.kernel.name}: {name.value.decode() if name.value else result}")

    def launch(self, grid: tuple[int, ...], arguments: list) -> None:
        values = [ctypes.c_uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int32(a)
                  for a in arguments]
        params = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values))
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        stream = torch.cuda.current_stream().cuda_stream
        self.check("cuLaunchKernel", self.driver.cuLaunchKernel(
            self.function, gx, gy, gz, self.kernel.threads_per_block, 1, 1, self.kernel.shared_mem,
            ctypes.c_void_p(stream), params, None))

    def unload(self) -> None:
        self.check("cuModuleUnload", self.driver.cuModuleUnload(self.module))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, batch, channels, height, width", [
    (torch.float32, 2, 5, 37, 53), (torch.float16, 1, 64, 131, 127), (torch.bfloat16, 3, 24, 131, 127)])
def test_plugin_ptx_loaded_by_the_driver_and_launched_as_tensorrt_does(dtype, batch, channels, height, width):
    """What TensorRT does with the plugins' AOT kernels, without TensorRT: the driver JIT-compiles the trimmed PTX
    for this GPU, and each kernel runs with the plugin's grid, block, shared memory and arguments only.
    131 x 127 spans two partial-sum chunks; three kernels compiled per case (~1.7 s each on the CPU machine)."""
    from kernels.fca_attention import fca_channel_attention_reference
    from kernels.fca_attention_aot import compile_plugin_kernels, driver_ptx_version, plugin_ptx_version

    major, minor = torch.cuda.get_device_capability()
    triton_type = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    driver = driver_ptx_version()
    assert driver is not None and driver >= 80
    # the ISA the engine builder picks (export/tensorrt_plugins.py)
    kernels = compile_plugin_kernels(triton_type, major * 10 + minor, channels,
                                     plugin_ptx_version(major * 10 + minor, driver))
    generator = torch.Generator().manual_seed(5)
    y, weight, bias, y_bias = (torch.randn(*shape, generator=generator).to("cuda", dtype) for shape in
                               [(batch, channels, height, width), (channels, channels, 1, 1), (channels,), (channels,)])

    def launch(name, grid, arguments):
        kernel = DriverKernel(kernels[name])
        try:
            kernel.launch(grid, arguments)
            torch.cuda.synchronize()
        finally:
            kernel.unload()

    z = run_plugin_chain(y, weight, bias, y_bias, launch)
    expected = fca_channel_attention_reference(*(t.double() for t in (y, weight, bias, y_bias)))
    own_error = (fca_channel_attention_reference(y, weight, bias, y_bias).double() - expected).abs().max().item()
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z.double(), expected, atol=2 * own_error + 1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- error paths

def test_registration_refuses_interpreted_kernels():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernels are compiled here (TRITON_INTERPRET is not set)")
    from export.tensorrt_plugins import PluginRegistrationError, check_plugin_kernels_compilable

    with pytest.raises(PluginRegistrationError, match="interpreter mode"):
        check_plugin_kernels_compilable()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="TensorRT is installed here; this checks the build without it")
def test_engine_build_of_a_plugin_graph_without_tensorrt_fails_clearly(graphs, tmp_path):
    from export.tensorrt_build import TensorRTUnavailableError, build_engine

    with pytest.raises(TensorRTUnavailableError, match="pip install tensorrt-cu12"):
        build_engine(graphs[("static", "fp16", True)], tmp_path / "plugins.engine")
    assert not (tmp_path / "plugins.engine").exists()


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("key", [("static", "fp16", True), ("dynamic", "fp32", True)])
def test_plugin_engine_matches_pytorch(graphs, model, key, tmp_path):
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from export.tensorrt_build import build_engine

    image = torch.rand(1, 3, *STATIC_TILE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    engine = tmp_path / graphs[key].with_suffix(".engine").name
    build_engine(graphs[key], engine)
    with torch.no_grad():
        expected = model(image).r1
    with TrtRunner(EngineFromBytes(BytesFromPath(str(engine)))) as runner:
        got = torch.from_numpy(runner.infer({"image": image.numpy()})["r1"])
    tolerance = 2e-2 if key[1] == "fp16" else 1e-3
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)


if __name__ == "__main__":
    for case in AOT_CASES:
        compile_and_check(*case)


def test_type_plugin_outputs_types_each_node_from_the_image_and_the_biases():
    """z is [B, C, H, W] in conv1's bias type, the gate [B, C] fp32, the partial sums [B, C, ?] fp32;
    C from the bias."""
    import numpy as np
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from export.plugin_nodes import type_plugin_outputs

    channels, plugin = 6, {"plugin_namespace": PLUGIN_NAMESPACE, "aot": 1}
    initializers = [numpy_helper.from_array(np.zeros(shape, dtype), name) for name, shape, dtype in [
        ("y_bias", (channels,), np.float16), ("weight", (channels, channels, 1, 1), np.float16),
        ("bias", (channels,), np.float16)]]
    nodes = [helper.make_node("Relu", ["image"], ["y"]),
             helper.make_node(GELU_PARTIAL_SUM, ["y", "y_bias"], ["partial"], domain=DOMAIN, **plugin),
             helper.make_node(CHANNEL_GATE, ["partial", "weight", "bias", "y"], ["gate"], domain=DOMAIN, **plugin),
             helper.make_node(GATED_GELU, ["y", "y_bias", "gate"], ["z"], domain=DOMAIN, **plugin)]
    graph = helper.make_graph(nodes, "plugins", [helper.make_tensor_value_info("image", TensorProto.FLOAT16,
                                                                               ["batch", 3, 64, 48])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT16, None)], initializers)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                                  helper.make_opsetid(DOMAIN, 1)]))
    assert type_plugin_outputs(model) == 3
    outputs = {node.op_type: node.outputs[0] for node in model.graph}
    batch = model.graph.inputs[0].shape[0]
    expected = {GATED_GELU: (ir.DataType.FLOAT16, [batch, channels, 64, 48]),
                CHANNEL_GATE: (ir.DataType.FLOAT, [batch, channels]),
                GELU_PARTIAL_SUM: (ir.DataType.FLOAT, [batch, channels, None])}
    for op, (dtype, dims) in expected.items():
        assert (outputs[op].dtype, outputs[op].shape) == (dtype, ir.Shape(dims)), op
