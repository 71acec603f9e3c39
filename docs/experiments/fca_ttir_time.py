"""Time Triton's front end (TTIR, what Inductor's mutation analysis generates per call site) and a full sm_90
compile of the three FCA kernels, on a machine without a GPU.

    PYTHONPATH=. python docs/experiments/fca_ttir_time.py

One-off; its 2026-11-27 result on the 2-core CPU (triton 3.9, commit 93eb8b7) is in docs/benchmarks.md.
"""
import time, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton._C.libtriton import ir
from triton.backends.nvidia.compiler import CUDABackend
from kernels.fca_attention_aot import plugin_kernels
target = GPUTarget("cuda", 90, 32)
backend = CUDABackend(target)
options = backend.parse_options({"num_warps": 4})
for name, pk in plugin_kernels("fp16", 64).items():
    src = pk.source()
    for i in range(3):
        t = time.perf_counter()
        context = ir.context(); ir.load_dialects(context); backend.load_dialects(context)
        codegen_fns = backend.get_codegen_implementation(options)
        module_map = backend.get_module_map()
        m = src.make_ir(target, options, codegen_fns, module_map, context)
        print(name, i, round((time.perf_counter()-t)*1e3, 1), "ms TTIR")
    t = time.perf_counter(); triton.compile(src, target=target, options={"num_warps": 4})
    print(name, "full compile", round((time.perf_counter()-t)*1e3,1), "ms")
