"""Host cost of one custom-op call: torch.library.triton_op vs custom_op vs a plain Python call (no kernel launch).

    PYTHONPATH=. python docs/experiments/custom_op_dispatch.py

One-off; its 2026-11-27 result on the 2-core CPU (torch 2.13.0+cpu, commit 93eb8b7) is in docs/benchmarks.md.
"""
import time, torch
torch.set_num_threads(1)
@torch.library.triton_op("s7test::noop", mutates_args=())
def noop(y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, yb: torch.Tensor | None) -> torch.Tensor:
    return torch.empty_like(y)
@torch.library.custom_op("s7test::noop2", mutates_args=())
def noop2(y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, yb: torch.Tensor | None) -> torch.Tensor:
    return torch.empty_like(y)
def plain(y, w, b, yb): return torch.empty_like(y)
y = torch.randn(1, 4, 4, 4); w = torch.randn(4, 4, 1, 1); b = torch.randn(4); yb = torch.randn(4)
def bench(f, n=20000):
    for _ in range(100): f()
    t = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t) / n * 1e6
for name, f in [("triton_op", lambda: torch.ops.s7test.noop(y, w, b, yb)),
                ("custom_op", lambda: torch.ops.s7test.noop2(y, w, b, yb)),
                ("plain", lambda: plain(y, w, b, yb)), ("conv2d 4ch", lambda: torch.nn.functional.conv2d(y, w))]:
    print(name, round(bench(f), 2), "us/call")
