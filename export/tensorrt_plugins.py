"""TensorRT plugins for the FCA plugin nodes (export/plugin_nodes.py), with ahead-of-time Triton kernels.

One quickly deployable plugin (`tensorrt.plugin`) per node, "guidesr::FCAGeluPartialSum",
"guidesr::FCAChannelGate" and "guidesr::FCAGatedGelu": `@trtp.register` describes the outputs,
`@trtp.aot_impl` compiles the plugin's Triton kernel to PTX for the build GPU's compute capability
and the input's type (kernels/fca_attention_aot.py) and returns its name, PTX, launch parameters
and scalar arguments; TensorRT embeds the PTX in the engine, which then needs no Python to run.
An AOT implementation returns one kernel, hence three plugins for the op's three kernels.

Importing this module registers nothing: the engine builder calls `register_fca_plugins` for a
graph with plugin nodes. It needs TensorRT >= 10.10 (`tensorrt.plugin.aot_impl`) and Triton with
its NVIDIA backend in compiling mode (not TRITON_INTERPRET=1). Annotations are evaluated on purpose
(no `from __future__ import annotations`): `trtp.register` tells tensor inputs from attributes by them.

Not yet run in TensorRT: written against the TensorRT 10.x Python plugin documentation and
NVIDIA's quickly_deployable_plugins sample; docs/design/export.md lists what is verified.
"""

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from .plugin_nodes import CHANNEL_GATE, DOMAIN, GATED_GELU, GELU_PARTIAL_SUM, PLUGIN_NAMESPACE

# AOT Python plugins (tensorrt.plugin.aot_impl) arrived in 10.9 (its release notes); 10.10's ONNX parser also
# takes a plugin node's namespace from its domain (CHANGELOG 10.10), a second route beside the
# plugin_namespace attribute the export writes
MIN_TENSORRT_VERSION = (10, 10)
PLUGIN_KERNELS = {GELU_PARTIAL_SUM: "gelu_partial_sum", CHANNEL_GATE: "channel_gate", GATED_GELU: "gated_gelu"}


class PluginRegistrationError(RuntimeError):
    """The FCA plugins cannot be registered (TensorRT too old, or Triton unable to compile)."""


def check_plugin_kernels_compilable() -> ModuleType:
    """kernels.fca_attention_aot, or PluginRegistrationError saying why its kernels cannot be compiled here."""
    try:
        from kernels import fca_attention, fca_attention_aot
    except ImportError as err:
        raise PluginRegistrationError(f"the plugins compile Triton kernels, and Triton's CUDA compiler is not "
                                      f"importable ({err}); install triton") from err
    from triton.runtime.jit import JITFunction

    if not isinstance(fca_attention._gelu_partial_sum_kernel, JITFunction):
        raise PluginRegistrationError("Triton runs in interpreter mode (TRITON_INTERPRET=1), where kernels cannot be "
                                      "compiled ahead of time; build the engine without TRITON_INTERPRET")
    return fca_attention_aot


def register_fca_plugins(trt: ModuleType) -> None:
    """Register the three FCA plugins with `trt` (the imported tensorrt module); registering again is a no-op."""
    aot = check_plugin_kernels_compilable()
    version = tuple(int(part) for part in trt.__version__.split(".")[:2])
    if version < MIN_TENSORRT_VERSION:
        raise PluginRegistrationError(f"TensorRT {trt.__version__} has no AOT plugin implementations (tensorrt.plugin."
                                      f"aot_impl); they need TensorRT >= {'.'.join(map(str, MIN_TENSORRT_VERSION))}")
    import tensorrt.plugin as trtp

    try:
        _define_plugins(trt, trtp, aot)
    except ValueError as err:  # tensorrt.plugin's checks of the decorated functions, or a second definition
        raise PluginRegistrationError(f"tensorrt.plugin refused the FCA plugin definitions: {err}") from err


@lru_cache(maxsize=None)  # once per process: TensorRT's plugin registry refuses a second definition
def _define_plugins(trt: ModuleType, trtp: ModuleType, aot: ModuleType) -> None:
    # tensorrt.plugin checks an aot_impl's signature when it is decorated: exactly (inputs..., outputs,
    # tactic) and this return annotation (tensorrt/plugin/_validate.py, `_validate_aot_impl`)
    AotLaunch = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]

    @trtp.register(f"{PLUGIN_NAMESPACE}::{GELU_PARTIAL_SUM}")
    def _partial_sum_outputs(y: trtp.TensorDesc, y_bias: trtp.TensorDesc) -> trtp.TensorDesc:
        shape = y.shape_expr
        chunks = aot.partial_sum_chunks(shape[2] * shape[3], trtp.cdiv)
        return trtp.from_shape_expr((shape[0], shape[1], chunks), dtype=trt.float32)

    @trtp.aot_impl(f"{PLUGIN_NAMESPACE}::{GELU_PARTIAL_SUM}")
    def _partial_sum_kernel(y: trtp.TensorDesc, y_bias: trtp.TensorDesc, outputs, tactic: int) -> AotLaunch:
        return _kernel_launch(trt, trtp, aot, GELU_PARTIAL_SUM, y)

    @trtp.register(f"{PLUGIN_NAMESPACE}::{CHANNEL_GATE}")
    def _gate_outputs(partial: trtp.TensorDesc, weight: trtp.TensorDesc, bias: trtp.TensorDesc,
                      y: trtp.TensorDesc) -> trtp.TensorDesc:
        shape = partial.shape_expr
        return trtp.from_shape_expr((shape[0], shape[1]), dtype=trt.float32)

    @trtp.aot_impl(f"{PLUGIN_NAMESPACE}::{CHANNEL_GATE}")
    def _gate_kernel(partial: trtp.TensorDesc, weight: trtp.TensorDesc, bias: trtp.TensorDesc, y: trtp.TensorDesc,
                     outputs, tactic: int) -> AotLaunch:
        return _kernel_launch(trt, trtp, aot, CHANNEL_GATE, y)

    @trtp.register(f"{PLUGIN_NAMESPACE}::{GATED_GELU}")
    def _gated_gelu_outputs(y: trtp.TensorDesc, y_bias: trtp.TensorDesc, gate: trtp.TensorDesc) -> trtp.TensorDesc:
        return y.like()

    @trtp.aot_impl(f"{PLUGIN_NAMESPACE}::{GATED_GELU}")
    def _gated_gelu_kernel(y: trtp.TensorDesc, y_bias: trtp.TensorDesc, gate: trtp.TensorDesc, outputs,
                           tactic: int) -> AotLaunch:
        return _kernel_launch(trt, trtp, aot, GATED_GELU, y)


def _kernel_launch(trt: ModuleType, trtp: ModuleType, aot: ModuleType, op_type: str, y):
    """(kernel name, PTX, launch parameters, scalar arguments) of the op's kernel for y, the block's
    [B, C, H, W] tensor (constant C), on the GPU PyTorch sees (the one TensorRT builds for)."""
    import torch

    shape = y.shape_expr
    if not shape[1].is_constant:
        raise PluginRegistrationError(f"{op_type} needs a constant channel count; the network's is dynamic")
    channels = shape[1].constant_value()
    triton_types = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}
    if y.dtype not in triton_types:
        raise PluginRegistrationError(f"{op_type} has kernels for float32, float16 and bfloat16, not {y.dtype}")
    major, minor = torch.cuda.get_device_capability()
    kernel_name = PLUGIN_KERNELS[op_type]
    kernel = _compiled_kernels(triton_types[y.dtype], major * 10 + minor, channels, aot)[kernel_name]
    launch = aot.plugin_launches(shape[0], channels, shape[2] * shape[3], trtp.cdiv)[kernel_name]
    params = trtp.KernelLaunchParams()
    params.grid_x = launch.grid[0]
    if len(launch.grid) > 1:
        params.grid_y = launch.grid[1]
    params.block_x = kernel.threads_per_block
    params.shared_mem = kernel.shared_mem
    scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(value) for value in launch.scalars])
    return kernel.name.encode(), kernel.ptx.encode(), params, scalars


def graph_shape_problems(onnx_path: Path, max_image_shape: Sequence[int]) -> list[str]:
    """What the plugin kernels cannot address in the graph at `onnx_path` for its largest input, `max_image_shape`
    ([B, 3, H, W], the profile's max); empty where they run. Every FCA block runs at the image's B, H and W
    (`type_plugin_outputs`), with the C of its partial-sum node's y_bias; the limits are
    `kernels.fca_attention_aot.plugin_shape_problems`'. The graph is read without its external data."""
    import onnx

    from kernels.fca_attention_aot import plugin_shape_problems

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializer_dims = {t.name: tuple(t.dims) for t in graph.initializer}
    channels = set()
    for node in graph.node:
        if node.domain == DOMAIN and node.op_type == GELU_PARTIAL_SUM:
            if node.input[1] not in initializer_dims:
                raise PluginRegistrationError(f"the {GELU_PARTIAL_SUM} node {node.name!r} takes y_bias "
                                              f"{node.input[1]!r}, which is not an initializer, so its channel count "
                                              "is unknown")
            channels.add(initializer_dims[node.input[1]][0])
    batch, _, height, width = max_image_shape
    return [f"C = {c}, [B, C, H, W] = {[batch, c, height, width]}: {problem}"
            for c in sorted(channels) for problem in plugin_shape_problems(batch, c, height * width)]


def plugin_ptx_isa(capability: int) -> int:
    """The PTX ISA the plugin kernels are compiled at for sm_`capability`: Triton's own, or this machine's
    driver's where that is older, so that the engine loads where it is built (and on newer drivers)."""
    aot = check_plugin_kernels_compilable()
    return aot.plugin_ptx_version(capability, aot.driver_ptx_version())


def driver_ptx_isa() -> int | None:
    """The newest PTX ISA this machine's CUDA driver compiles, for checking an engine's plugin kernels before it
    loads; None where that cannot be told (no driver, or no Triton, whose CUDA-to-ISA table it reads)."""
    try:
        from kernels.fca_attention_aot import driver_ptx_version
    except ImportError:
        return None
    return driver_ptx_version()


@lru_cache(maxsize=None)
def _compiled_kernels(dtype: str, capability: int, channels: int, aot: ModuleType):
    return aot.compile_plugin_kernels(dtype, capability, channels, plugin_ptx_isa(capability))
