"""The FCA channel attention's kernels compiled ahead of time, for TensorRT plugins (no TensorRT needed here).

TensorRT's AOT plugins (`tensorrt.plugin.aot_impl`, export/tensorrt_plugins.py) embed one compiled
kernel per plugin and launch it with the plugin's tensor inputs, then scalar arguments, then its
outputs, in that order; the kernels of kernels/fca_attention.py take their arguments in that order.
The op's three kernels therefore become three plugins, in the graph as three nodes per FCA block:

    gelu_partial_sum   (y, y_bias)                -> partial [B, C, n_chunks] fp32
    channel_gate       (partial, weight, bias, y) -> gate    [B, C] fp32
    gated_gelu         (y, y_bias, gate)          -> z       [B, C, H, W], y's dtype

A plugin's scalar arguments can only be computed from its inputs' shapes, and the gate divides by
H·W, which the partial sums' shape does not tell: the gate plugin takes y as well, for its shape,
and `_channel_gate_plugin_kernel` is the gate kernel with that (never read) pointer argument.
TensorRT passes a plugin's scalars as 32-bit integers, and C·H·W, the NCHW sample stride, passes
2^31 - 1 at C = 32 and 8192² (a dynamic profile for 4096² tiles): the partial-sum and gated-GELU plugin
kernels wrap theirs to form it in 64 bits from C and H·W. `plugin_shape_problems` lists the sizes
that are still past a 32-bit scalar or CUDA's grid limits; the engine builder refuses those.

A plugin kernel is compiled once per engine, before H and W are known (dynamic profiles), so its
tiles depend on the channel count alone: NCHW (TensorRT's linear format), one channel per program
(BLOCK_C = 1), PLUGIN_BLOCK_HW elements of H·W per step, and a fixed PLUGIN_CHUNK elements of H·W
per partial sum. The reduction order still depends on the shape alone, so results stay
deterministic. `plugin_launches` computes the grids and scalar arguments from (B, C, H·W) with
plain arithmetic and a `cdiv`, so the same code serves Python ints (tests) and TensorRT's symbolic
shape expressions (`tensorrt.plugin.ShapeExpr` with `tensorrt.plugin.cdiv`).

TensorRT embeds PTX (its only AOT form), which the CUDA driver compiles when the engine loads, and a
driver refuses PTX of a newer ISA than it knows. Triton writes the ISA of the ptxas it ships (8.7 with
Triton 3.6, 9.4 with Triton 3.9, which a CUDA 13.0 driver cannot load), so `plugin_ptx_version`
lowers it to what the machine's driver loads; the kernels compile at ISA 8.0 and up.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from typing import Any, Callable

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.backends.nvidia.compiler import get_ptxas, ptx_get_version
from triton.compiler.compiler import make_backend

from kernels import fca_attention

PLUGIN_KERNELS = ("gelu_partial_sum", "channel_gate", "gated_gelu")
PLUGIN_DTYPES = ("fp32", "fp16", "bf16")  # Triton's names; fp16 and bf16 use the fast GELU, as the launcher does
PLUGIN_BLOCK_HW = 2048
PLUGIN_CHUNK = 8 * PLUGIN_BLOCK_HW
PLUGIN_BLOCK_K = 64
NUM_WARPS = 4
INT32_MAX = 2**31 - 1
GRID_LIMITS = (2**31 - 1, 65535)  # CUDA's most blocks in a grid along x, along y


@dataclass(frozen=True)
class AheadOfTimeKernel:
    name: str  # the kernel's entry in `ptx`
    ptx: str
    cubin: bytes
    num_warps: int
    shared_mem: int  # bytes of dynamic shared memory per program

    @property
    def threads_per_block(self) -> int:
        return self.num_warps * 32


@dataclass(frozen=True)
class PluginKernel:
    fn: Any  # the @triton.jit kernel
    signature: dict[str, str]  # Triton types of its runtime arguments, in order
    constexprs: dict[str, Any]

    def source(self) -> ASTSource:
        return ASTSource(self.fn, self.signature | {k: "constexpr" for k in self.constexprs},
                         constexprs=self.constexprs)


@dataclass(frozen=True)
class PluginLaunch:
    grid: tuple[Any, ...]  # (x,) or (x, y)
    scalars: tuple[Any, ...]  # the kernel's scalar arguments, between its tensor inputs and its output


@triton.jit
def _gelu_partial_sum_plugin_kernel(
    y_ptr, y_bias_ptr, C, HW, n_chunks, chunk, partial_ptr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, HAS_Y_BIAS: tl.constexpr, FAST_GELU: tl.constexpr,
):
    """`_gelu_partial_sum_kernel` on an NCHW y whose sample stride C·H·W is formed here in 64 bits: TensorRT passes
    a plugin's scalars as 32-bit integers, and C·H·W passes 2^31 - 1 at C = 32 and 8192²."""
    fca_attention._gelu_partial_sum_kernel(y_ptr, y_bias_ptr, C, HW, n_chunks, chunk, C.to(tl.int64) * HW, HW, 1,
                                           partial_ptr, BLOCK_C, BLOCK_HW, HAS_Y_BIAS, FAST_GELU)


@triton.jit
def _gated_gelu_plugin_kernel(
    y_ptr, y_bias_ptr, gate_ptr, C, HW, n_hw_blocks, out_ptr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, HAS_Y_BIAS: tl.constexpr, FAST_GELU: tl.constexpr,
):
    """`_gated_gelu_kernel` on NCHW y and z, their sample stride C·H·W formed here in 64 bits (as above)."""
    sample_stride = C.to(tl.int64) * HW
    fca_attention._gated_gelu_kernel(y_ptr, y_bias_ptr, gate_ptr, C, HW, n_hw_blocks, sample_stride, HW, 1,
                                     sample_stride, HW, 1, out_ptr, BLOCK_C, BLOCK_HW, HAS_Y_BIAS, FAST_GELU)


@triton.jit
def _channel_gate_plugin_kernel(
    partial_ptr, w_ptr, bias_ptr, shape_only_ptr, C, n_chunks, HW, stride_wo, gate_ptr,
    stride_wi: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """`_channel_gate_kernel` with the gate plugin's inputs; `shape_only_ptr` (y) is there for its shape."""
    fca_attention._channel_gate_kernel(partial_ptr, w_ptr, bias_ptr, C, n_chunks, HW, stride_wo, stride_wi, gate_ptr,
                                       BLOCK_CO, BLOCK_CI, BLOCK_K)


def partial_sum_chunks(hw: Any, cdiv: Callable[[Any, Any], Any]) -> Any:
    """n_chunks, the last dim of gelu_partial_sum's output, for H·W = `hw`."""
    return cdiv(hw, PLUGIN_CHUNK)


def plugin_launches(batch: Any, channels: int, hw: Any, cdiv: Callable[[Any, Any], Any]) -> dict[str, PluginLaunch]:
    """Grid and scalar arguments of each plugin kernel for NCHW tensors of B = `batch`, C = `channels`, H·W = `hw`.

    `batch` and `hw` may be symbolic (put first in every product); `channels` is the engine's constant C.
    """
    n_chunks = partial_sum_chunks(hw, cdiv)
    n_hw_blocks = cdiv(hw, PLUGIN_BLOCK_HW)
    block_co, _ = fca_attention.gate_block_sizes(channels)
    return {
        "gelu_partial_sum": PluginLaunch((batch * channels, n_chunks), (channels, hw, n_chunks, PLUGIN_CHUNK)),
        "channel_gate": PluginLaunch((batch, triton.cdiv(channels, block_co)), (channels, n_chunks, hw, channels)),
        "gated_gelu": PluginLaunch((n_hw_blocks * batch * channels,), (channels, hw, n_hw_blocks)),
    }


def plugin_shape_problems(batch: int, channels: int, hw: int) -> list[str]:
    """What the plugin kernels cannot address on NCHW tensors of B = `batch`, C = `channels`, H·W = `hw`; empty
    where they run.

    TensorRT passes a plugin kernel's scalars as 32-bit integers (`SymInt32`; its plugin argument types end at
    INT32), CUDA bounds a grid at 2^31 - 1 blocks along x and 65535 along y, and the kernels index the partial
    sums and H·W in 32 bits. Offsets into y and z are 64-bit, so B·C·H·W itself is not limited.
    """
    launches = plugin_launches(batch, channels, hw, triton.cdiv)
    n_chunks = partial_sum_chunks(hw, triton.cdiv)
    checks = [(f"the {name} kernel's grid along {axis}", size, limit)
              for name, launch in launches.items() for axis, size, limit in zip("xy", launch.grid, GRID_LIMITS)]
    checks += [(f"the {name} kernel's 32-bit scalar argument", value, INT32_MAX)
               for name, launch in launches.items() for value in launch.scalars]
    checks += [("the partial sums' 32-bit element count B·C·ceil(H·W / PLUGIN_CHUNK)", batch * channels * n_chunks,
                INT32_MAX),
               ("the 32-bit H·W index, rounded up to whole partial-sum chunks", n_chunks * PLUGIN_CHUNK, INT32_MAX)]
    return [f"{what} is {value}, past its limit of {limit}" for what, value, limit in checks if value > limit]


def plugin_kernels(dtype: str, channels: int) -> dict[str, PluginKernel]:
    """Each plugin kernel with its argument types and constexprs, for tensors of Triton type `dtype`
    and C = `channels`."""
    if dtype not in PLUGIN_DTYPES:
        raise ValueError(f"dtype must be one of {PLUGIN_DTYPES}, not {dtype!r}")
    y = f"*{dtype}"
    tiles = {"BLOCK_C": 1, "BLOCK_HW": PLUGIN_BLOCK_HW, "HAS_Y_BIAS": True, "FAST_GELU": dtype != "fp32"}
    block_co, block_ci = fca_attention.gate_block_sizes(channels)
    return {
        "gelu_partial_sum": PluginKernel(
            _gelu_partial_sum_plugin_kernel,
            {"y_ptr": y, "y_bias_ptr": y, "C": "i32", "HW": "i32", "n_chunks": "i32", "chunk": "i32",
             "partial_ptr": "*fp32"},
            tiles),
        "channel_gate": PluginKernel(
            _channel_gate_plugin_kernel,
            {"partial_ptr": "*fp32", "w_ptr": y, "bias_ptr": y, "shape_only_ptr": y, "C": "i32", "n_chunks": "i32",
             "HW": "i32", "stride_wo": "i32", "gate_ptr": "*fp32"},
            {"stride_wi": 1, "BLOCK_CO": block_co, "BLOCK_CI": block_ci, "BLOCK_K": PLUGIN_BLOCK_K}),
        "gated_gelu": PluginKernel(
            _gated_gelu_plugin_kernel,
            {"y_ptr": y, "y_bias_ptr": y, "gate_ptr": "*fp32", "C": "i32", "HW": "i32", "n_hw_blocks": "i32",
             "out_ptr": y},
            tiles),
    }


def driver_ptx_version() -> int | None:
    """The newest PTX ISA (e.g. 90 for 9.0) the installed CUDA driver compiles; None without a driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return ptx_get_version(f"{version.value // 1000}.{version.value % 1000 // 10}")  # 13000 -> "13.0" -> 90


def plugin_ptx_version(capability: int, driver: int | None) -> int:
    """The PTX ISA to compile plugin kernels at: Triton's own (its ptxas's), or the driver's where that is older."""
    own = ptx_get_version(get_ptxas(capability).version)
    return own if driver is None else min(own, driver)


def compile_plugin_kernels(dtype: str, capability: int, channels: int,
                           ptx_version: int | None = None) -> dict[str, AheadOfTimeKernel]:
    """PTX and cubin of the three plugin kernels for compute capability `capability` (e.g. 90 for sm_90).

    The PTX declares the kernel's own arguments only (`trim_entry_params`) and is of ISA `ptx_version`
    (None: Triton's default); the cubin is ptxas's assembly of that PTX, so it is known to assemble.
    Needs Triton's compiler, so not under TRITON_INTERPRET=1 (the kernels are then interpreter objects).
    """
    target = GPUTarget("cuda", capability, 32)
    options = {"num_warps": NUM_WARPS} | ({} if ptx_version is None else {"ptx_version": ptx_version})
    compiled = {}
    for name, plugin_kernel in plugin_kernels(dtype, channels).items():
        kernel = triton.compile(plugin_kernel.source(), target=target, options=options)
        _check_plugin_launchable(name, kernel.metadata)
        ptx = trim_entry_params(kernel.asm["ptx"], kernel.metadata.name, len(plugin_kernel.signature))
        compiled[name] = AheadOfTimeKernel(kernel.metadata.name, ptx, assemble_ptx(ptx, capability),
                                           kernel.metadata.num_warps, kernel.metadata.shared)
    return compiled


def trim_entry_params(ptx: str, entry: str, keep: int) -> str:
    """`ptx` with the `entry` kernel declaring only its first `keep` parameters.

    Triton appends parameters of its own to every kernel (global and profile scratch pointers: two in
    Triton 3.9, seen in its PTX); TensorRT launches a plugin kernel with the plugin's inputs, scalars and outputs
    only, so a kernel that declares more would read parameter memory the launch never wrote.
    Dropping them is sound only while the body never reads them, which is checked: a trailing
    parameter that is referenced raises ValueError.
    """
    match = re.search(rf"\.entry {re.escape(entry)}\(([^)]*)\)", ptx)
    if match is None:
        raise ValueError(f"no .entry {entry}( ... ) in the PTX")
    params = [param.strip() for param in match.group(1).split(",")]
    names = [param.split()[-1] for param in params]
    if len(params) < keep:
        raise ValueError(f"{entry} declares {len(params)} parameters, fewer than its {keep} arguments")
    body = ptx[match.end():]
    used = [name for name in names[keep:] if re.search(rf"\b{re.escape(name)}\b", body)]
    if used:
        raise ValueError(f"{entry} reads Triton's extra parameters {used}; a TensorRT plugin launch does not pass them")
    declaration = ",\n\t".join(params[:keep])
    return ptx[:match.start(1)] + "\n\t" + declaration + "\n" + ptx[match.end(1):]


def assemble_ptx(ptx: str, capability: int) -> bytes:
    """The cubin of `ptx` for sm_`capability`, assembled as Triton assembles its own PTX (its ptxas and flags)."""
    backend = make_backend(GPUTarget("cuda", capability, 32))
    return backend.make_cubin(ptx, {}, backend.parse_options({"num_warps": NUM_WARPS}), capability)


def _check_plugin_launchable(name: str, metadata) -> None:
    """TensorRT launches the kernel with its own arguments only: Triton's trailing scratch pointers get null."""
    scratch = {field: getattr(metadata, field) for field in ("global_scratch_size", "profile_scratch_size")
               if getattr(metadata, field, 0)}
    if scratch or metadata.num_ctas != 1:
        raise RuntimeError(f"the {name} kernel needs {scratch or 'a CTA cluster'}; a TensorRT AOT plugin launch "
                           "provides neither")
