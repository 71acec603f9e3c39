"""A kernel that loops to a bound given at launch, as every kernel of this project does (see conftest)."""

import triton
import triton.language as tl


@triton.jit
def count_to(out_ptr, n):
    count = 0
    for _ in range(0, n):
        count += 1
    tl.store(out_ptr, count)
