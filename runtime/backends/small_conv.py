"""Convolutions at small spatial sizes as one matmul (im2col): chosen per layer by timing, when the compiled backend builds.

The sd-turbo UNet's deepest levels run 3x3 convolutions of 1280 (or 2560) channels on 8x8 and 16x16
latents (a 512x512 output). On an H200 (2026-11-26, commit 52c4354, `runtime.stage_timing
--profile-compiled`) cuDNN took 21 us per [1, 1280, 8, 8] x [1280, 1280, 3, 3] call (11 per forward)
and 23.5 us per 16x16 one (8 per forward): as a GEMM that is M = 64 (or 256) pixels, N = 1280,
K = 11520, and reading the 29.5 MB of weights alone takes ~7 us at the card's copy bandwidth. With
so few output pixels there are too few output tiles to occupy 132 SMs unless K is split, which
cuBLAS's heuristics do for such shapes. `Im2ColConv2d` computes the same convolution as
`F.unfold` (a [B, C·k·k, H·W] gather, 1.5 MB at 8x8) and one matmul with the [C·k·k, O] weight
matrix, written channels_last without a copy. Predicted: ~10-13 us per 8x8 call and ~15 us per
16x16 call, ~0.15 ms per 512x512 forward.

Whether that wins depends on the card, the shapes and the libraries, so `use_im2col_where_faster`
does not assume it: it records the input shape of every eligible convolution (3x3 or any k x k,
stride 1, no dilation, one group, at most `max_pixels` output pixels) in one forward, times both
forms of each on that input (CUDA events, median of `repeats` calls, after cuDNN has chosen its
algorithm with cudnn.benchmark as in the compiled backend) and swaps a layer only where im2col is
faster by `min_gain`. Under torch.compile the gather and the matmul are ordinary ops (Inductor
fuses the gather's padding; the matmul goes to cuBLAS); the result is the same function.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

MAX_PIXELS = 256  # output pixels per image at most (16x16) for a layer to be considered
MIN_GAIN = 0.9  # swap where im2col takes at most this fraction of the convolution's time


class Im2ColConv2d(nn.Module):
    """`nn.Conv2d` (stride 1, "same" zero padding, no dilation, one group) as unfold + one matmul, for inference.

    It holds the convolution's weight as a contiguous [O, C·k·k] matrix (a copy made once: a channels_last
    [O, C, k, k] weight does not reshape to it in place, and a reshape per call would copy it every call)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not eligible(conv):
            raise ValueError(f"Im2ColConv2d takes stride-1, undilated, ungrouped, zero-padded convolutions, not {conv}")
        self.kernel_size = conv.kernel_size
        self.padding = conv.padding
        out_channels = conv.weight.shape[0]
        matrix = conv.weight.detach().reshape(out_channels, -1).contiguous()  # unfold's (c, i, j) order
        self.weight = nn.Parameter(matrix, requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        out_channels = self.weight.shape[0]
        columns = F.unfold(x, self.kernel_size, padding=self.padding)  # [B, C·k·k, H·W]
        weight = self.weight  # [O, C·k·k]
        if batch == 1 and self.bias is not None:  # one 2-D matmul, the bias added in cuBLAS's epilogue
            out = torch.addmm(self.bias, columns[0].t(), weight.t()).unsqueeze(0)  # [1, H·W, O]
        else:
            out = columns.transpose(1, 2) @ weight.t()  # [B, H·W, O]
            if self.bias is not None:
                out = out + self.bias
        return out.reshape(batch, height, width, out_channels).permute(0, 3, 1, 2)  # channels_last [B, O, H, W]


def eligible(conv: nn.Module, max_pixels: int | None = None, input_shape: torch.Size | None = None) -> bool:
    """A plain Conv2d im2col reproduces; with `input_shape`, also one of at most `max_pixels` output pixels."""
    if type(conv) is not nn.Conv2d:
        return False
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
        return False
    if not isinstance(conv.padding, tuple) or any(2 * p != k - 1 for p, k in zip(conv.padding, conv.kernel_size)):
        return False  # only "same" padding: the output has the input's H x W
    if input_shape is not None and max_pixels is not None:
        return input_shape[-2] * input_shape[-1] <= max_pixels
    return True


def record_conv_inputs(model: nn.Module, run: Callable[[], object], max_pixels: int) -> dict[str, torch.Tensor]:
    """{name: its input} for each eligible nn.Conv2d of at most `max_pixels` output pixels, from one call of
    `run` (forward pre-hooks; the larger layers' inputs are not kept)."""
    inputs: dict[str, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple, name: str) -> None:
        if eligible(module, max_pixels, args[0].shape):
            inputs.setdefault(name, args[0].detach())

    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: record(m, args, name))
             for name, module in model.named_modules() if type(module) is nn.Conv2d]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def median_call_ms(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of `call`: CUDA events on the GPU, perf_counter on the CPU."""
    call()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            call()
            samples.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(samples)


def use_im2col_where_faster(model: nn.Module, run: Callable[[], object], max_pixels: int = MAX_PIXELS,
                            min_gain: float = MIN_GAIN, repeats: int = 20) -> list[dict]:
    """Swap each small-spatial Conv2d of `model` for Im2ColConv2d where it measured faster on its own input.

    `run` calls the model once on its static input. Returns one row per timed layer: name, input shape,
    both medians in ms, and whether it was swapped.
    """
    inputs = record_conv_inputs(model, run, max_pixels)
    modules = dict(model.named_modules())
    rows = []
    with torch.no_grad():
        for name, x in inputs.items():
            conv = modules[name]
            im2col = Im2ColConv2d(conv)
            conv_ms = median_call_ms(lambda: conv(x), x.device, repeats)
            im2col_ms = median_call_ms(lambda: im2col(x), x.device, repeats)
            swap = im2col_ms <= min_gain * conv_ms
            if swap:
                parent_name, _, child = name.rpartition(".")
                setattr(modules[parent_name] if parent_name else model, child, im2col)
            rows.append({"layer": name, "input": list(x.shape), "conv_ms": conv_ms, "im2col_ms": im2col_ms,
                         "swapped": swap})
    return rows
