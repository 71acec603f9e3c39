"""`wrap_triton` for the kernels' launchers on every torch and triton this project supports; the launch device."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.library import wrap_triton
from triton.runtime.interpreter import InterpretedFunction


def launchable(kernel: Any) -> Any:
    """`wrap_triton(kernel)`, except for a kernel run by Triton's interpreter (TRITON_INTERPRET=1).

    Under the interpreter `@triton.jit` returns an `InterpretedFunction`, which torch 2.11's
    `wrap_triton` refuses ("only works on functions annotated with triton.jit"); later torch
    returns it unwrapped. Nothing traces an interpreted kernel, so it is launched as it is.
    """
    return kernel if isinstance(kernel, InterpretedFunction) else wrap_triton(kernel)


def launch_device(**tensors: torch.Tensor | None) -> contextlib.AbstractContextManager:
    """A context that makes the tensors' CUDA device the current one; ValueError where they are on different devices.

    Triton launches on the current CUDA device and its current stream, not on its arguments' device:
    a kernel on cuda:1 tensors launched while cuda:0 is current would run on cuda:0, unordered with
    the cuda:1 stream that wrote its input. `None` entries (absent optional tensors) are skipped.
    """
    named = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in named.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in named.items())
        raise ValueError(f"the op's tensors must be on one device, got {where}")
    (device,) = devices
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
