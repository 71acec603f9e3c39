"""`wrap_triton` for the kernels' launchers, on every torch and triton this project supports."""

from __future__ import annotations

from typing import Any

from torch.library import wrap_triton
from triton.runtime.interpreter import InterpretedFunction


def launchable(kernel: Any) -> Any:
    """`wrap_triton(kernel)`, except for a kernel run by Triton's interpreter (TRITON_INTERPRET=1).

    Under the interpreter `@triton.jit` returns an `InterpretedFunction`, which torch 2.11's
    `wrap_triton` refuses ("only works on functions annotated with triton.jit"); later torch
    returns it unwrapped. Nothing traces an interpreted kernel, so it is launched as it is.
    """
    return kernel if isinstance(kernel, InterpretedFunction) else wrap_triton(kernel)
