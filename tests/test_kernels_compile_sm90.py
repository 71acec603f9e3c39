"""Every Triton kernel compiles for Hopper (sm_90) through Triton's CUDA backend and ptxas, on the CPU.

The interpreter (TRITON_INTERPRET=1) runs kernels as NumPy and skips Triton's type checks and code
generation; this compiles them for real, as the GPU would at first launch, with the launchers'
block sizes. It caught an `if` whose branches bound one name to two types (a compile-only error).
The signatures below list the kernels' runtime arguments: a kernel whose arguments change must be
listed again here.

The test session runs Triton in interpreter mode (tests/conftest.py), where kernels are not
compilable objects, so the compilation runs in a subprocess without TRITON_INTERPRET: this file
run as a script (`python tests/test_kernels_compile_sm90.py`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count("sm_90 ok") == 7 * 4 + 4, result.stdout


def compile_for_hopper(fn, signature: dict[str, str], constexprs: dict[str, int]):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = dict(signature) | {name: "constexpr" for name in constexprs}
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 4})
    assert ".target sm_90" in kernel.asm["ptx"] and kernel.asm["cubin"]
    print(f"{fn.__name__} {constexprs}: sm_90 ok", flush=True)
    return kernel


def compile_fca_attention(dtype: str, layout: str, fast_gelu: bool, has_y_bias: bool) -> None:
    from kernels import fca_attention

    y_strides = ({"stride_yb": "i64", "stride_yc": "i64"} if layout == "nchw"
                 else {"stride_yb": "i64", "stride_yhw": "i64"})
    o_strides = ({"stride_ob": "i64", "stride_oc": "i64"} if layout == "nchw"
                 else {"stride_ob": "i64", "stride_ohw": "i64"})
    unit = {"stride_yhw": 1} if layout == "nchw" else {"stride_yc": 1}
    unit_out = {"stride_ohw": 1} if layout == "nchw" else {"stride_oc": 1}
    blocks = {"BLOCK_C": 1, "BLOCK_HW": 2048} if layout == "nchw" else {"BLOCK_C": 64, "BLOCK_HW": 32}
    blocks |= {"HAS_Y_BIAS": has_y_bias, "FAST_GELU": fast_gelu}
    compile_for_hopper(
        fca_attention._gelu_partial_sum_kernel,
        {"y_ptr": f"*{dtype}", "y_bias_ptr": f"*{dtype}", "partial_ptr": "*fp32", "C": "i32", "HW": "i32",
         "n_chunks": "i32", "chunk": "i32"}
        | y_strides, unit | blocks)
    compile_for_hopper(
        fca_attention._gated_gelu_kernel,
        {"y_ptr": f"*{dtype}", "y_bias_ptr": f"*{dtype}", "gate_ptr": "*fp32", "out_ptr": f"*{dtype}",
         "C": "i32", "HW": "i32", "n_hw_blocks": "i32"} | y_strides | o_strides, unit | unit_out | blocks)
    # H·W arrives as i32 from a direct launch and as i64 from Inductor's generated code.
    for hw_type in ("i32", "i64"):
        compile_for_hopper(
            fca_attention._channel_gate_kernel,
            {"partial_ptr": "*fp32", "w_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "gate_ptr": "*fp32", "C": "i32",
             "n_chunks": "i32", "HW": hw_type, "stride_wo": "i32", "stride_wi": "i32"},
            {"BLOCK_CO": 64, "BLOCK_CI": 64, "BLOCK_K": 128})


def compile_pixel_unshuffle_concat(s: int, s_pad: int, rows: int, block_x: int) -> None:
    from kernels import pixel_unshuffle_concat

    compile_for_hopper(
        pixel_unshuffle_concat._unshuffle_concat_kernel,
        {"h_ptr": "*fp16", "f_ptr": "*fp16", "out_ptr": "*fp16", "Ch": "i32", "Cf": "i32", "Ho": "i32", "Wo": "i32",
         "n_rows_h": "i32", "n_rows_f": "i32", "n_f_programs": "i32", "n_xblocks": "i32",
         "stride_hb": "i64", "stride_hc": "i32", "stride_hy": "i32", "stride_fb": "i64", "stride_fc": "i32",
         "stride_fy": "i32", "stride_ob": "i64", "stride_oc": "i32", "stride_oy": "i32"},
        {"stride_hx": 1, "stride_fx": 1, "stride_ox": 1, "S": s, "S_PAD": s_pad, "ROWS": rows, "BLOCK_X": block_x})


if __name__ == "__main__":
    for dtype in ("fp16", "bf16", "fp32"):
        for layout in ("nchw", "channels_last"):
            compile_fca_attention(dtype, layout, fast_gelu=dtype != "fp32", has_y_bias=layout == "nchw")
    compile_fca_attention("fp16", "nchw", fast_gelu=False, has_y_bias=False)  # the benchmark's erf comparison
    for config in ((2, 2, 4, 512), (3, 4, 1, 1024), (8, 8, 1, 256), (64, 64, 8, 8)):
        compile_pixel_unshuffle_concat(*config)
