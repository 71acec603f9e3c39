"""Fused channel attention of the FCA block (paper §3.1): z = g * sigmoid(W @ mean_hw(g) + b), g = GELU(y + b1).

The FCA block is ``out = x + conv2(z)`` with ``y + b1 = conv1(x)``; this op is everything between
the two 3x3 convolutions, and it takes conv1's bias b1 (``y_bias``, optional) so that conv1 can run
without one: Inductor peels a convolution's bias off into a pointwise add that it fuses into the
consumer, and a custom op is a consumer it cannot fuse into, so without ``y_bias`` the compiled
model would spend a whole extra pass (read N, write N) adding b1 before this op.
GELU is the erf form (``nn.GELU()``'s default): exact for fp32, a fit for fp16 and bf16 (below).

GELU's cost (fast form for fp16 and bf16)
-----------------------------------------
Pass 1 and pass 3 below both evaluate GELU, and libdevice's ``erff`` (two polynomial branches, a
warp of random data takes both) makes the passes instruction-bound rather than memory-bound: at
1x64x1024² on an H200 (2026-11-26) this op ran at 47 % of copy bandwidth. Counted in the sm_90
SASS (tests/test_kernels_compile_sm90.py compiles the kernels; ``cuobjdump -sass``), the erf
passes issue ~43 instructions per element, which at 132 SMs x 128 lanes x 1.98 GHz is ~86 µs per
pass over 64 Mi elements, against 32 µs (pass 1) and 63 µs (pass 3) of memory time. For fp16 and
bf16 inputs the kernels therefore evaluate

    GELU(x) = x / (1 + 2^(x * Q(x²))),  Q a degree-4 polynomial (``FAST_GELU_COEFFICIENTS``),

i.e. x·sigmoid(x·P(x²)) with log2(e) folded into P, fitted (iteratively reweighted least squares
towards minimax) to x·Φ(x) on [-10, 10]: absolute error below 4e-6 in fp32 arithmetic (0.004 of
an fp16 ulp at 1; tests/test_fca_attention.py checks it), Q <= -2.30 everywhere so the tails go to
x and to 0 without a clamp, at 8 FMA-pipe instructions plus ex2 and a reciprocal. fp32 inputs keep
the exact ``erf``; ``fast_gelu`` on the launcher overrides the choice (the benchmark times both).
Predicted from the SASS (~24 instructions per element): pass 1 ~48 µs, pass 3 at memory speed, the
op ~0.115 ms instead of 0.203. Measured on the H200 (2026-11-27, commit 52c4354, CUDA-graph
replays): 0.116 ms NCHW (82 % of copy bandwidth; erf form in the same run 0.204 ms), pass 1 49.4 µs,
pass 3 64.5 µs (4160 GB/s), gate 3.4 µs; channels_last 0.138 ms (69 %), of which the gate kernel
took 14.6 µs summing 64 Ki partial sums in one program. Fast against erf form, largest output
difference: 1.95e-3, one fp16 step at the output's scale. (Tried and reverted, commit 871daa3: gate
steps 4x larger with ``num_warps=8`` as a launch argument took the channels_last gate to 6.1 µs and
the op to 0.130 ms, but the eager call took ~0.13 ms more host time, 0.194 -> 0.319 ms in
``do_bench``. The launch argument was the only change to the launch; torch's Triton wrapper can
wrap a kernel launched with such options in a new autotuner per call, the likely cause, not
confirmed; docs/benchmarks.md.)

Passes over the [B, C, H, W] tensor (N elements of e bytes each)
-----------------------------------------------------------------
Eager PyTorch runs five kernels, three over the full tensor:
``gelu`` reads N and writes N, ``mean`` reads N, ``linear``/``sigmoid`` touch [B, C],
the broadcast multiply reads N and writes N: **5·N·e bytes**.

The Triton op makes two passes over y and never writes GELU's output (pass 3 recomputes it):

1. ``_gelu_partial_sum_kernel`` reads y, sums GELU(y) per (b, c) over a fixed chunk of H·W in
   fp32 and writes one partial sum per (b, c, chunk): **N·e** read. The chunk count is chosen so
   the grid has about 4096 programs whatever the layout (the first H200 run found channels_last
   batch 1 at 64 programs for 132 SMs, 10% of copy bandwidth; docs/benchmarks.md).
2. ``_channel_gate_kernel`` adds the partials in index order, divides by H·W, applies the 1x1
   conv (a [C, C] matvec per sample) and the sigmoid: O(B·C·chunks + C²), negligible.
3. ``_gated_gelu_kernel`` reads y again, recomputes GELU, multiplies by the gate and writes z:
   **2·N·e**.

Each kernel takes its tensor inputs, then its scalars, then its output: the order a TensorRT AOT
plugin launches a kernel with (kernels/fca_attention_aot.py, export/tensorrt_plugins.py).

Total **3·N·e bytes** (40 % less traffic than eager), three launches instead of five. Where y
fits in L2 (50 MB on an H100), pass 3's read of y may come from L2 rather than DRAM.
Everything is accumulated in fp32 whatever the input dtype; only z is rounded to y's dtype.
The reduction is deterministic without atomics: the number of chunks depends only on H·W (never
on the device or a timing), each program sums its chunk in a fixed order and the gate kernel adds
the chunks in index order, so two runs give bitwise-equal results.

Folding the gate into conv2 (considered, not done)
--------------------------------------------------
``conv2(g * a) == conv2`` with weights ``W2[o, c, :, :] * a[b, c]``, exactly (zero padding stays
zero). With the fold, pass 3 disappears and pass 1 writes g instead: 2·N·e instead of 3·N·e.
It is not done here because (a) the gate is per *sample*, so for B > 1 the fold needs a grouped
convolution with B groups over a [1, B·C, H, W] view (or B convolutions), trading cuDNN's dense
conv for a less tuned path; (b) the saving is one N·e out of the block's ~10·N·e with this op
(conv1 and conv2 each read and write N, the residual add reads 2·N and writes N), while the 3x3
convolutions dominate the block's time; (c) it would move
this op's semantics into conv2 and break the op boundary that the ONNX export, the PyTorch
reference and the tests share. ``python -m kernels.benchmark`` times the whole block, which is
where a fold would have to show a gain (for B = 1 it is a plain conv with rescaled weights).

Inference only: the op has no autograd formula; ``fca_channel_attention`` uses the PyTorch
reference whenever a gradient is required, during ONNX export, on the CPU and without Triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    from .triton_launch import launch_device, launchable
except ImportError:  # triton is an optional dependency (the "triton" extra)
    triton = None

OP_NAME = "guidesr::fca_channel_attention"

_TILE = 2048  # elements per [BLOCK_C, BLOCK_HW] tile in passes 1 and 3
# Pass 1 splits H·W into chunks so that its grid has about _TARGET_PROGRAMS programs, each summing
# at least _MIN_PROGRAM_ELEMENTS elements, with at most _MAX_CHUNKS partial sums per (b, c). All three
# are constants (never the device's SM count), so the reduction order depends on the shape alone.
_TARGET_PROGRAMS = 4096
_MIN_PROGRAM_ELEMENTS = 8192
_MAX_CHUNKS = 1024
_MAX_BLOCK_K = 128  # partial sums the gate kernel adds per step


# GELU(x) ~ x / (1 + 2^(x * Q(x^2))); Q's coefficients from x^0 up (see "GELU's cost" above)
FAST_GELU_COEFFICIENTS = (-2.30204531, -0.105226838, 0.000360343681, 8.82271836e-05, -3.22845091e-06)


def fast_gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """The kernels' fp16/bf16 GELU form in PyTorch, in x's dtype (the tests check the fit in float64)."""
    x2 = x * x
    q = torch.full_like(x, FAST_GELU_COEFFICIENTS[-1])
    for coefficient in FAST_GELU_COEFFICIENTS[-2::-1]:
        q = q * x2 + coefficient
    return x / (1 + torch.exp2(x * q))


def fca_channel_attention_reference(
    y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, y_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The PyTorch definition (and the ONNX-exported graph): GELU, spatial mean, 1x1 conv, sigmoid, scale."""
    c = y.shape[1]
    if y_bias is not None:
        y = y + y_bias.reshape(1, c, 1, 1)
    g = F.gelu(y)
    gate = torch.sigmoid(F.linear(g.mean(dim=(2, 3)), weight.reshape(c, c), bias))  # [B, C]
    return g * gate[:, :, None, None]


def fca_channel_attention(
    y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, y_bias: torch.Tensor | None = None,
    use_kernel: bool = True,
) -> torch.Tensor:
    """FCA channel attention of y + y_bias; the fused Triton op where it applies, else the PyTorch reference.

    `weight` is the 1x1 conv's [C, C, 1, 1] (or [C, C]) weight, `bias` its [C] bias, `y_bias` a [C]
    bias added to y first (conv1's). The Triton op runs only with `use_kernel` where
    `fused_op_applies` says so.
    """
    if use_kernel and fused_op_applies(y, weight, bias, y_bias):
        return torch.ops.guidesr.fca_channel_attention(y, weight, bias, y_bias)
    return fca_channel_attention_reference(y, weight, bias, y_bias)


def fused_op_applies(y: torch.Tensor, *parameters: torch.Tensor | None) -> bool:
    """The Triton op runs on CUDA tensors of one device, outside ONNX export, when no gradient is needed (inference
    only). `parameters` are every other tensor the op takes (None for an absent y_bias)."""
    tensors = (y, *(t for t in parameters if t is not None))
    return (
        triton is not None
        and y.is_cuda
        and all(t.device == y.device for t in tensors)
        and not torch.onnx.is_in_onnx_export()
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and y.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and y.dim() == 4
    )


def _hw_stride(t: torch.Tensor) -> int | None:
    """The stride of the flattened H·W axis, or None where H and W do not flatten into one axis."""
    _, _, h, w = t.shape
    if w == 1:
        return t.stride(2)
    if h <= 1 or w == 0 or t.stride(2) == w * t.stride(3):  # an empty H·W flattens whatever the strides
        return t.stride(3)
    return None


def gate_block_sizes(channels: int) -> tuple[int, int]:
    """(BLOCK_CO, BLOCK_CI) of the gate kernel for C = `channels` (the launcher's and the TensorRT plugin's)."""
    channels_pow2 = 1 << (channels - 1).bit_length()
    block_co = min(channels_pow2, 64)
    return block_co, min(channels_pow2, 4096 // block_co)


def _shares_memory_between_elements(t: torch.Tensor) -> bool:
    """Whether two of t's elements may lie at one address: its axes of size > 1, taken by increasing stride, do not
    each step over the whole extent of the ones before (a stride-0 expanded axis, for instance)."""
    if t.numel() == 0:
        return False
    extent = 1
    for stride, size in sorted((t.stride(d), t.shape[d]) for d in range(t.dim()) if t.shape[d] > 1):
        if stride < extent:
            return True
        extent = stride * size
    return False


def _empty_output(y: torch.Tensor) -> torch.Tensor:
    """z's buffer: channels_last if y is, else contiguous (both flatten H·W, whatever y's strides)."""
    channels_last = not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(y, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


if triton is not None:

    _Q0, _Q1, _Q2, _Q3, _Q4 = (tl.constexpr(c) for c in FAST_GELU_COEFFICIENTS)

    @triton.jit
    def _gelu(x, FAST: tl.constexpr):
        if FAST:  # x / (1 + 2^(x Q(x²))): see "GELU's cost" in the module docstring
            x2 = x * x
            q = _Q4 * x2 + _Q3
            q = q * x2 + _Q2
            q = q * x2 + _Q1
            q = q * x2 + _Q0
            return x / (1.0 + tl.math.exp2(x * q))
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))

    @triton.jit
    def _load_biased(ptrs, mask, y_bias_ptr, c, c_mask, HAS_Y_BIAS: tl.constexpr):
        """y[b, c, hw] (+ y_bias[c]) in fp32; masked lanes are 0."""
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_Y_BIAS:
            y_bias = tl.load(y_bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
            v = tl.where(mask, v + y_bias[:, None], 0.0)
        return v

    @triton.jit
    def _gelu_partial_sum_kernel(
        y_ptr, y_bias_ptr, C, HW, n_chunks, chunk,
        stride_yb, stride_yc, stride_yhw, partial_ptr,
        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, HAS_Y_BIAS: tl.constexpr, FAST_GELU: tl.constexpr,
    ):
        """partial[b, c, k] = sum of GELU(y[b, c, hw] + y_bias[c]) over chunk k of H·W, in fp32."""
        pid_bc = tl.program_id(0)
        k = tl.program_id(1)
        n_cblocks = tl.cdiv(C, BLOCK_C)
        b = pid_bc // n_cblocks
        c = (pid_bc % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c < C
        row = y_ptr + b.to(tl.int64) * stride_yb + c.to(tl.int64)[:, None] * stride_yc
        acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
        for start in range(0, chunk, BLOCK_HW):
            hw = k * chunk + start + tl.arange(0, BLOCK_HW)
            mask = c_mask[:, None] & (hw < HW)[None, :]
            v = _load_biased(row + hw.to(tl.int64)[None, :] * stride_yhw, mask, y_bias_ptr, c, c_mask, HAS_Y_BIAS)
            acc += _gelu(v, FAST_GELU)  # masked lanes are 0 and GELU(0) = 0
        tl.store(partial_ptr + (b * C + c) * n_chunks + k, tl.sum(acc, axis=1), mask=c_mask)

    @triton.jit
    def _channel_gate_kernel(
        partial_ptr, w_ptr, bias_ptr, C, n_chunks, HW,
        stride_wo, stride_wi, gate_ptr,
        BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """gate[b, co] = sigmoid(sum_ci W[co, ci] * mean[b, ci] + bias[co]), mean from the partial sums."""
        b = tl.program_id(0)
        co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
        co_mask = co < C
        acc = tl.zeros([BLOCK_CO], dtype=tl.float32)
        for ci_start in range(0, C, BLOCK_CI):
            ci = ci_start + tl.arange(0, BLOCK_CI)
            ci_mask = ci < C
            total = tl.zeros([BLOCK_CI], dtype=tl.float32)
            for k_start in range(0, n_chunks, BLOCK_K):  # chunks in index order: deterministic
                k = k_start + tl.arange(0, BLOCK_K)
                partial = tl.load(
                    partial_ptr + (b * C + ci)[:, None] * n_chunks + k[None, :],
                    mask=ci_mask[:, None] & (k < n_chunks)[None, :], other=0.0,
                )
                total += tl.sum(partial, axis=1)
            mean = total / HW  # HW is an int: Inductor passes Python floats to Triton as fp64
            w = tl.load(
                w_ptr + co[:, None] * stride_wo + ci[None, :] * stride_wi,
                mask=co_mask[:, None] & ci_mask[None, :], other=0.0,
            ).to(tl.float32)
            acc += tl.sum(w * mean[None, :], axis=1)
        bias = tl.load(bias_ptr + co, mask=co_mask, other=0.0).to(tl.float32)
        tl.store(gate_ptr + b * C + co, tl.sigmoid(acc + bias), mask=co_mask)

    @triton.jit
    def _gated_gelu_kernel(
        y_ptr, y_bias_ptr, gate_ptr, C, HW, n_hw_blocks,
        stride_yb, stride_yc, stride_yhw, stride_ob, stride_oc, stride_ohw, out_ptr,
        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, HAS_Y_BIAS: tl.constexpr, FAST_GELU: tl.constexpr,
    ):
        """out[b, c, hw] = GELU(y[b, c, hw] + y_bias[c]) * gate[b, c], computed in fp32, stored in out's dtype."""
        pid = tl.program_id(0)  # consecutive programs walk one channel block's H·W
        hw = (pid % n_hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        pid_bc = pid // n_hw_blocks
        n_cblocks = tl.cdiv(C, BLOCK_C)
        b = pid_bc // n_cblocks
        c = (pid_bc % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c < C
        mask = c_mask[:, None] & (hw < HW)[None, :]
        b64, c64, hw64 = b.to(tl.int64), c.to(tl.int64)[:, None], hw.to(tl.int64)[None, :]
        v = _load_biased(y_ptr + b64 * stride_yb + c64 * stride_yc + hw64 * stride_yhw, mask, y_bias_ptr, c, c_mask,
                         HAS_Y_BIAS)
        gate = tl.load(gate_ptr + b * C + c, mask=c_mask, other=0.0)
        z = _gelu(v, FAST_GELU) * gate[:, None]
        out = out_ptr + b64 * stride_ob + c64 * stride_oc + hw64 * stride_ohw
        tl.store(out, z.to(out_ptr.dtype.element_ty), mask=mask)

    def fca_channel_attention_triton(
        y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, y_bias: torch.Tensor | None = None,
        out: torch.Tensor | None = None, fast_gelu: bool | None = None,
    ) -> torch.Tensor:
        """Launch the three kernels (see the module docstring); returns z, written into `out` if given.

        `fast_gelu`: the polynomial-sigmoid GELU (None: for fp16 and bf16 y, erf for fp32).
        Takes any strides: NCHW and channels_last tensors are read in place (the tile runs along
        whichever of C or H·W is the inner axis); a tensor whose H and W do not flatten into one
        axis (e.g. a crop) is made contiguous first. `out` must have y's shape and dtype and
        flattenable H·W, and no two of its elements at one address. An empty y (B, C, H or W of 0) gives an
        empty z, as the reference does, without a launch. On CPU tensors this runs under TRITON_INTERPRET=1 only.
        """
        if y.dim() != 4:
            raise ValueError(f"expected a [B, C, H, W] tensor, got shape {tuple(y.shape)}")
        if y.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"y must be float32, float16 or bfloat16 (the kernels compute in float32), not {y.dtype}")
        on_device = launch_device(y=y, weight=weight, bias=bias, y_bias=y_bias, out=out)
        # Block sizes are constexprs, so the launch is specialised to concrete sizes (under dynamic
        # shapes this guards on them instead of reasoning about symbolic block sizes).
        batch, channels, height, width = (int(d) for d in y.shape)
        hw = height * width
        if out is None:
            out = _empty_output(y)
        elif out.shape != y.shape or out.dtype != y.dtype or _hw_stride(out) is None:
            raise ValueError("out must have y's shape and dtype and a flattenable H*W axis")
        elif _shares_memory_between_elements(out):
            raise ValueError(f"out's elements must not share memory (programs would race to write them), got strides "
                             f"{out.stride()} for shape {tuple(out.shape)}")
        if _hw_stride(y) is None:
            y = y.contiguous()
        weight = weight.reshape(channels, channels)
        if bias.shape != (channels,) or (y_bias is not None and y_bias.shape != (channels,)):
            shapes = tuple(bias.shape), None if y_bias is None else tuple(y_bias.shape)
            raise ValueError(f"bias and y_bias must have shape ({channels},), got {shapes[0]} and {shapes[1]}")
        if y.numel() == 0:
            return out
        bias = bias.contiguous()  # the kernels read both at unit stride; a no-op for the model's parameters
        y_bias = None if y_bias is None else y_bias.contiguous()
        flags = {"HAS_Y_BIAS": y_bias is not None,
                 "FAST_GELU": y.dtype != torch.float32 if fast_gelu is None else bool(fast_gelu)}
        y_bias = bias if y_bias is None else y_bias  # a pointer the kernels never read without HAS_Y_BIAS
        y_strides = (int(y.stride(0)), int(y.stride(1)), int(_hw_stride(y)))
        out_strides = (int(out.stride(0)), int(out.stride(1)), int(_hw_stride(out)))

        if y.stride(1) < y_strides[2]:  # channels inner (channels_last): tile along C first
            block_c = min(triton.next_power_of_2(channels), 64)
            block_hw = min(triton.next_power_of_2(hw), _TILE // block_c)
        else:  # H·W inner (NCHW)
            block_hw = min(triton.next_power_of_2(hw), _TILE)
            block_c = min(triton.next_power_of_2(channels), _TILE // block_hw)
        n_cblocks = triton.cdiv(channels, block_c)

        n_chunks = min(triton.cdiv(_TARGET_PROGRAMS, batch * n_cblocks), _MAX_CHUNKS,
                       triton.cdiv(hw * block_c, _MIN_PROGRAM_ELEMENTS))
        n_chunks = max(n_chunks, 1)
        chunk = triton.cdiv(triton.cdiv(hw, n_chunks), block_hw) * block_hw
        n_chunks = triton.cdiv(hw, chunk)

        with on_device:
            partial = torch.empty((batch, channels, n_chunks), device=y.device, dtype=torch.float32)
            gate = torch.empty((batch, channels), device=y.device, dtype=torch.float32)

            launchable(_gelu_partial_sum_kernel)[(batch * n_cblocks, n_chunks)](
                y, y_bias, channels, hw, n_chunks, chunk, *y_strides, partial,
                BLOCK_C=block_c, BLOCK_HW=block_hw, **flags,
            )
            block_co, block_ci = gate_block_sizes(channels)
            launchable(_channel_gate_kernel)[(batch, triton.cdiv(channels, block_co))](
                partial, weight, bias, channels, n_chunks, hw, weight.stride(0), weight.stride(1), gate,
                BLOCK_CO=block_co, BLOCK_CI=block_ci, BLOCK_K=min(triton.next_power_of_2(n_chunks), _MAX_BLOCK_K),
            )
            n_hw_blocks = triton.cdiv(hw, block_hw)
            launchable(_gated_gelu_kernel)[(n_hw_blocks * batch * n_cblocks,)](
                y, y_bias, gate, channels, hw, n_hw_blocks, *y_strides, *out_strides, out,
                BLOCK_C=block_c, BLOCK_HW=block_hw, **flags,
            )
        return out

    @torch.library.triton_op(OP_NAME, mutates_args=())
    def _fca_channel_attention_op(
        y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, y_bias: torch.Tensor | None
    ) -> torch.Tensor:
        return fca_channel_attention_triton(y, weight, bias, y_bias)

    # triton_op's default fake traces the launcher, which under TRITON_INTERPRET would run the
    # interpreter on fake tensors; this one only allocates, so the fake is checkable on a CPU.
    @_fca_channel_attention_op.register_fake
    def _(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, y_bias: torch.Tensor | None) -> torch.Tensor:
        return _empty_output(y)
