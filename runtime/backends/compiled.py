"""`compiled`: torch.compile (Inductor) captured in one CUDA graph; fp16, channels_last, one static tile shape.

Built once, before the first tile (a few seconds for tiny, minutes for sd-turbo with autotuning):

1. `prepare_model`, the copy that is compiled, each rewrite the same function:
   a. `export.merge.inference_copy`: a copy of the model with LoRA folded into plain weights (the
      caller's model is untouched and can serve as the --validate reference), gradients off, cast
      to fp16 (or fp32) with channels_last weights, on the device;
   b. every `nn.GroupNorm` becomes `group_norm.ChannelStatsGroupNorm` (statistics per channel then
      per group, which Inductor can spread over the GPU; see that file for the measurement behind it);
   c. the UNet's attention projections are fused (below);
   d. every attention with heads wider than flash attention takes (the VAE's, 512 wide) computes its
      score matrix with cuBLAS (`wide_head_attention.py`) instead of SDPA's memory-efficient kernel;
   e. the constant inputs are folded (`constant_folding.py`, below): the time embedding at the fixed
      timestep goes into every UNet ResNet block's conv1 bias, and every cross-attention's k/v of
      the prompt become a buffer;
2. `torch.compile(..., dynamic=False)` of  image NCHW -> model(image as channels_last).r1 -> NCHW
   float32, in the model's dtype up to that last cast, so the layout changes are part of the
   compiled graph. The Triton ops
   (FCA channel attention, pixel-unshuffle + concat) stay on when the model has them on
   (`config.use_triton_kernels`); they are `triton_op`s, so Inductor launches them from its own code.
   The other attentions go through diffusers' AttnProcessor2_0, i.e. F.scaled_dot_product_attention,
   which picks flash attention where the head width allows (sd-turbo's UNet: 64; tiny's first UNet
   level has 4-wide heads, which only the math kernel takes);
3. warm-up: WARMUP_CALLS calls on a side stream, with cudnn.benchmark on: compilation,
   autotuning, cuDNN algorithm choice and cuBLAS initialisation all happen here;
4. capture of one call into a `torch.cuda.CUDAGraph` with a static input and output buffer.

Per call, CPU tiles: cast them to the model's dtype into a page-locked input buffer, copy that to
the graph's input asynchronously, replay, copy the graph's float32 output (the cast is the last
operation of the compiled graph, fused into its NCHW copy) into a new page-locked tensor from
PyTorch's caching host allocator, synchronise, return that tensor. Tiles already on the GPU: cast
into the graph's input on the device, replay, return a copy of the output on the device (no host
round trip, no synchronisation). A partial batch is padded to the graph's batch with copies of its
last tile.

Why the host copies look like this: on the H200 (2026-11-26, commit 67fdbe6) a 512x512 call took
15.39 ms with CPU tensors and 14.72 ms with the tiles on the GPU; the 0.67 ms between them was a
pageable copy of the float32 input (3 MB) in and of the float32 output out into a new CPU tensor.
Casting the input to fp16 into a page-locked buffer and copying the fp16 output into another, then
casting it to a new float32 tensor on the CPU, measured (same card, commit 52c4354) 15.29 ms with
CPU tensors against 14.65 ms with device tensors and 14.51 ms for the graph replay alone: 0.64 ms
of host side, not the ~0.3 ms predicted, so most of it was CPU work around the copies rather than
the copies. The output side now has no CPU pass at all: the DMA writes the float32 result straight
into the page-locked tensor that is returned (3 MB instead of 1.5 MB over the bus, ~0.05 ms more;
the CPU cast of 0.79 M elements and the new 3 MB allocation, ~0.1-0.2 ms, gone). Predicted: host
side 0.64 -> ~0.5 ms. Measured (H200, 2026-11-27, commit 871daa3, runtime.report): 15.14 ms median
with CPU tensors (the steady calls 15.03-15.10; the first eight of warm-up and timing took 17.8-21.7
ms, cause not measured) against 14.72 ms with device tensors: ~0.4 ms of host side.

UNet attention: `fuse_qkv_projections()` (diffusers) replaces each self-attention's three q/k/v
projections by one matmul and each cross-attention's k/v pair by one, the same products in fewer,
larger cuBLAS calls: the H200 profile (commit 52c4354) counted 1182 kernels per forward, with
matmuls of [256, 1280] x [1280, 1280] at ~5 us each, far below the card's rate. Predicted: ~48
fewer launches and ~0.1-0.2 ms less per 512x512 forward. Measured (commit 871daa3, with the Triton
kernels on as well): 14.72 ms with device tensors, the same as without either change (14.72 ms,
commit 67fdbe6): no measurable gain. It stays because that run is the measured configuration; the
next profile should show whether the split q/k/v views cost copies that ate the saving.

Constant inputs (`constant_folding.py`): the UNet runs at one timestep with one prompt, yet every
forward recomputed the time embedding, each ResNet block's projection of it and each
cross-attention's k/v of the prompt. sd-turbo's UNet has 22 ResNet blocks with a time projection
(12 of [1, 1280] x [1280, 1280], 5 with 640 and 5 with 320 outputs) and 16 cross-attentions, so the
folded forward has 40 fewer cuBLAS calls (24 addmm: the time MLP's 2 and the 22 projections; 16 mm
of [77·B, 1024] x [1024, 2·inner]) and fewer small Inductor kernels: the sinusoid (traced, but
nothing reads it, so Inductor drops it), the SiLUs of the embedding and, with a batch above 1, the
copy of the expanded prompt that to_kv read. Checked with Inductor on the CPU (tiny preset, batch
1): 14 fewer extern matmuls (2 + 8 ResNet blocks + 4 cross-attentions), 5 fewer fused kernels (the
sinusoid and 4 SiLUs), no sin/cos left. For sd-turbo on the H200 that is ~45-50 of the 1182
launches. Predicted: ~0.1-0.2 ms less per 512x512 forward (the 52c4354 profile put the 13 [1,
1280]-wide addmm at 0.068 ms; the others are kernels of a few us each), i.e. 15.14 -> ~14.95-15.05
ms with CPU tensors. Not measured yet. With a batch above 1 the stored k/v reach SDPA as a
stride-0 expand over the batch; should Inductor copy them before the flash kernel, that part of
the saving becomes copies.

Why a hand-made CUDA graph instead of mode="reduce-overhead": the graph then holds the whole
forward, one launch per batch, including any part dynamo leaves to eager PyTorch (graph breaks),
whereas cudagraph trees record only the compiled regions and skip a region silently (a log line)
when they meet something they cannot record; a capture by hand works or raises. It also gives us
the input buffer to copy into, with no dynamo guard evaluation per call. The compile mode is
Inductor's default; `autotune=True` (`--autotune`) uses "max-autotune-no-cudagraphs" (Inductor
benchmarks Triton templates against cuBLAS/cuDNN for every matmul and convolution, plus
coordinate-descent tuning of its own kernels), not "max-autotune", which would add cudagraph trees
on top of our graph. Autotuning is opt-in because it is slow to build: on an H200 (2026-11-26) one
sd-turbo 512x512 build with it, convolutions and matmuls limited to ATen, was not finished after
200 s.

fp32 where accuracy needs it, with fp16 weights and activations everywhere else: GroupNorm
(ChannelStatsGroupNorm: statistics and the affine pass in fp32, rounded once) and LayerNorm
(Inductor's decomposition accumulates half inputs in float) compute their statistics in fp32, SDPA's
flash / memory-efficient kernels keep the softmax in fp32 (the wide-head form rounds its logits to
fp16 first, then takes the softmax in fp32; see that file), the FCA pooling is done in fp32 inside
the Triton kernel, and tensor-core convolutions and matmuls accumulate in fp32.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from .base import (
    PRECISIONS,
    Backend,
    BackendError,
    BackendRequest,
    BackendSpec,
    exact_fp32,
    resolve_precision,
    run_static_batches,
    skip_when_an_artifact_is_given,
)
from .group_norm import use_channel_stats_group_norm

if TYPE_CHECKING:
    from guidesr.model import GuideSR

WARMUP_CALLS = 3  # the first compiles and autotunes; the others run the steady state once more before capture


def prepare_model(model: GuideSR, device: torch.device, dtype: torch.dtype) -> GuideSR:
    """The copy of `model` that the compiled backend compiles (step 1 of the module docstring)."""
    from export.merge import inference_copy  # imports peft and diffusers (seconds): only when building

    from .constant_folding import fold_constant_inputs
    from .wide_head_attention import use_wide_head_attention  # imports diffusers (seconds): only when building

    prepared = inference_copy(model, device, dtype)
    use_channel_stats_group_norm(prepared)
    prepared.unet.fuse_qkv_projections()
    use_wide_head_attention(prepared)
    fold_constant_inputs(prepared)
    return prepared


class _TileForward(nn.Module):
    """image [B, 3, H, W] NCHW in the model's dtype -> R1 NCHW float32; the model runs channels_last."""

    def __init__(self, model: GuideSR):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image.contiguous(memory_format=torch.channels_last)).r1.contiguous().float()


class CompiledBackend(Backend):
    device_io = True

    def __init__(self, model: GuideSR, device: str | torch.device, precision: str = "fp16",
                 tile: tuple[int, int] = (512, 512), batch: int = 1, autotune: bool = False):
        self.device = torch.device(device)
        reason = compiled_unavailable_reason(self.device)
        if reason is not None:
            raise BackendError(f"the compiled backend cannot run on {self.device}: {reason}")
        if precision not in PRECISIONS:
            raise BackendError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.descriptor = model.descriptor
        multiple = self.descriptor.size_multiple
        if tile[0] <= 0 or tile[1] <= 0 or tile[0] % multiple or tile[1] % multiple:
            raise BackendError(f"tile {tile[0]}x{tile[1]} must be positive multiples "
                               f"of the model's size multiple {multiple}")
        if batch < 1:
            raise BackendError(f"batch must be >= 1, got {batch}")
        self.name = "compiled"
        self.precision = precision
        self.tile_shape = (int(tile[0]), int(tile[1]))
        self.max_batch = batch
        self.mode = "max-autotune-no-cudagraphs" if autotune else "default"
        self.triton_kernels = any(getattr(module, "use_kernel", False) for module in model.modules())

        dtype = torch.float16 if precision == "fp16" else torch.float32
        with self._numerics():  # fp32: the constants folded into the copy are computed without TF32, as the graph runs
            prepared = prepare_model(model, self.device, dtype)
        shape = (batch, 3, *self.tile_shape)
        self._input = torch.empty(shape, device=self.device, dtype=dtype).uniform_(-1, 1)
        self._host_input = torch.empty(shape, dtype=dtype, pin_memory=True)
        # The compiled function must outlive the graph: it owns the kernels the graph replays.
        self._compiled = torch.compile(_TileForward(prepared), mode=self.mode, dynamic=False)
        with torch.cuda.device(self.device), torch.no_grad(), self._numerics():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    self._compiled(self._input)
            torch.cuda.current_stream().wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._output = self._compiled(self._input)
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def _numerics(self) -> Iterator[None]:
        """cuDNN benchmarks its algorithms during warm-up (the capture keeps its choice); fp32 without TF32."""
        saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            with exact_fp32(self.device) if self.precision == "fp32" else contextlib.nullcontext():
                yield
        finally:
            torch.backends.cudnn.benchmark = saved

    def describe(self) -> str:
        height, width = self.tile_shape
        kernels = "Triton kernels on" if self.triton_kernels else "Triton kernels off"
        return (f"compiled ({self.precision} on {self.device}, tiles of {height}x{width}, batch {self.max_batch}; "
                f"torch.compile {self.mode} + CUDA graph, channels_last, per-channel-statistics GroupNorm, "
                f"cuBLAS score-matrix attention for wide heads, fused UNet q/k/v, time embedding and prompt k/v "
                f"folded, {kernels})")

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        if tuple(tiles.shape[-2:]) != self.tile_shape:
            raise ValueError(f"the compiled backend runs tiles of {self.tile_shape[0]}x{self.tile_shape[1]}, "
                             f"got {tiles.shape[-2]}x{tiles.shape[-1]}")
        with torch.cuda.device(self.device):
            return run_static_batches(tiles, self.max_batch, self._replay)

    def replay_graph(self) -> torch.Tensor:
        """One replay on whatever the graph's input buffer holds; returns its output buffer (for profiling)."""
        with torch.cuda.device(self.device):
            self._graph.replay()
        return self._output

    def compiled_forward(self) -> torch.Tensor:
        """The compiled function on the graph's input buffer, outside the graph (for profiling its ops)."""
        with torch.cuda.device(self.device), torch.no_grad(), self._numerics():
            return self._compiled(self._input)

    def _replay(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.is_cuda:
            self._input.copy_(batch)  # into the captured graph's input buffer
            self._graph.replay()
            return self._output.to(batch.device, copy=True)  # the next replay overwrites the buffer
        self._host_input.copy_(batch)  # the previous call synchronised: its copy from this buffer is done
        self._input.copy_(self._host_input, non_blocking=True)
        self._graph.replay()
        # page-locked, from PyTorch's caching host allocator (a block the caller has freed comes back)
        output = torch.empty(self._output.shape, dtype=torch.float32, pin_memory=True)
        output.copy_(self._output, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return output


def compiled_unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"torch.compile with CUDA graphs runs on CUDA GPUs only (device is {device})"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install -e '.[triton]'); Inductor generates Triton kernels for CUDA"
    return None


def _auto_skip_reason(request: BackendRequest) -> str | None:
    if not request.tile:
        return "it needs a fixed tile size (--tile > 0) for its CUDA graph"
    return skip_when_an_artifact_is_given(request)


def create_compiled_backend(model: GuideSR, request: BackendRequest) -> CompiledBackend:
    precision = resolve_precision(request.precision, request.device, model.descriptor)
    tile = request.tile_for(model.descriptor.size_multiple, "compiled")
    return CompiledBackend(model, request.device, precision, tile, request.tile_batch, autotune=request.autotune)


COMPILED = BackendSpec(
    name="compiled",
    speed_rank=20,
    summary="torch.compile + CUDA graph, fp16, channels_last, Triton kernels (CUDA only)",
    unavailable_reason=compiled_unavailable_reason,
    create=create_compiled_backend,
    auto_skip_reason=_auto_skip_reason,
)
