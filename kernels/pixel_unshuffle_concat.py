"""cat([h, PixelUnshuffle(f, s)], dim=1) in one pass (paper eq. 3 and the UNet injection).

``h`` is the UNet hidden state [B, Ch, H/s, W/s], ``f`` the guidance features [B, Cf, H, W]; the
result is [B, Ch + Cf·s², H/s, W/s] with ``out[:, Ch + c·s² + i·s + j, y, x] = f[:, c, y·s + i, x·s + j]``
(``F.pixel_unshuffle``'s channel order).

Passes and bytes (N_h, N_f elements, e bytes each)
--------------------------------------------------
Eager PyTorch materialises ``pixel_unshuffle(f)`` (read N_f, write N_f) and then ``torch.cat``
copies both inputs (read N_h + N_f, write N_h + N_f): **2·N_h + 4·N_f** element moves, two launches.
The Triton kernel reads each input once and writes each element straight to its channel slot of
the output: **2·N_h + 2·N_f**, one launch. One program either copies a tile of h rows or takes a
[rows, x, s] tile of f — each f row read contiguously, as x·s + j — and stores it as the s planes
``j`` it belongs to, each contiguous in x; Triton moves the tile between the two layouts
through shared memory, so both the load and the stores are coalesced.

The alternative: never materialise the unshuffle
-------------------------------------------------
In GuideSR the concatenation only feeds a 1x1 projection P (``guidesr/injection.py``), and
``P(cat(h, unshuffle(f))) = P_h(h) + conv2d(f, W_f, stride=s)`` where ``W_f`` is P's f-columns
reshaped to [Cout, Cf, s, s]: an s x s, stride-s convolution reads f once and writes nothing
intermediate, so the concat buffer (N_h + N_f written, then read again by P) disappears. Whether
that wins depends on the convolution algorithm cuDNN finds for a large, non-overlapping kernel
against a 1x1 conv over Ch + Cf·s² channels (a plain GEMM): it is an empirical question, answered
per shape by ``python -m kernels.benchmark``, which times concat-kernel + 1x1 conv, eager
cat + 1x1 conv and the 1x1 + strided-conv pair at the injection scales (same FLOPs; by bytes the
strided pair wins, since it skips writing and re-reading the N_h + N_f concatenation). ``W_h`` and
``W_f`` are views of P's weight, so a model could switch forms without touching its checkpoints.

Inference only: no autograd formula; ``pixel_unshuffle_concat`` uses the PyTorch reference whenever
a gradient is required, during ONNX export, on the CPU and without Triton.
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

OP_NAME = "guidesr::pixel_unshuffle_concat"

_TILE = 4096  # elements per program


def pixel_unshuffle_concat_reference(h: torch.Tensor, f: torch.Tensor, s: int) -> torch.Tensor:
    """The PyTorch definition (and the ONNX-exported graph)."""
    return torch.cat([h, F.pixel_unshuffle(f, s)], dim=1)


def pixel_unshuffle_concat(h: torch.Tensor, f: torch.Tensor, s: int, use_kernel: bool = True) -> torch.Tensor:
    """cat([h, PixelUnshuffle(f, s)], dim=1); the Triton op where it applies, else the reference.

    The Triton op runs only with `use_kernel` on CUDA tensors of one dtype, outside ONNX export
    and when no gradient is needed (the op is inference only).
    """
    if use_kernel and fused_op_applies(h, f):
        return torch.ops.guidesr.pixel_unshuffle_concat(h, f, s)
    return pixel_unshuffle_concat_reference(h, f, s)


def fused_op_applies(h: torch.Tensor, f: torch.Tensor) -> bool:
    """The Triton op runs on 4-D CUDA tensors of one real dtype and device, outside ONNX export, without a
    gradient."""
    return (
        triton is not None
        and h.is_cuda
        and f.device == h.device
        and not torch.onnx.is_in_onnx_export()
        and not (torch.is_grad_enabled() and (h.requires_grad or f.requires_grad))
        and h.dtype == f.dtype
        and not h.is_complex()
        and h.dim() == 4
        and f.dim() == 4
    )


def _output_shape(h: torch.Tensor, f: torch.Tensor, s: int) -> tuple[int, int, int, int]:
    batch, ch, ho, wo = h.shape
    fb, cf, fh, fw = f.shape
    if s < 1 or fb != batch or fh != ho * s or fw != wo * s:
        raise ValueError(
            f"need h [B, Ch, H/s, W/s] and f [B, Cf, H, W] with s = {s}; got {tuple(h.shape)} and {tuple(f.shape)}"
        )
    return batch, ch + cf * s * s, ho, wo


if triton is not None:

    @triton.jit
    def _unshuffle_f_tile(
        f_ptr, out_ptr, tile, Ch, Cf, Ho, Wo, n_rows_f, n_xblocks,
        stride_fb, stride_fc, stride_fy, stride_fx, stride_ob, stride_oc, stride_oy, stride_ox,
        S: tl.constexpr, S_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_X: tl.constexpr,
    ):
        """f rows r = (b, c, y), y = yo*S + i, columns x*S + j  ->  out[b, Ch + c*S*S + i*S + j, yo, x]."""
        r = (tile // n_xblocks) * ROWS + tl.arange(0, ROWS)
        x = (tile % n_xblocks) * BLOCK_X + tl.arange(0, BLOCK_X)
        j = tl.arange(0, S_PAD)
        fh = Ho * S
        b = (r // (Cf * fh)).to(tl.int64)
        c = ((r // fh) % Cf).to(tl.int64)
        y = r % fh
        src_row = b * stride_fb + c * stride_fc + y.to(tl.int64) * stride_fy
        dst_row = b * stride_ob + (Ch + c * (S * S) + (y % S) * S) * stride_oc + (y // S).to(tl.int64) * stride_oy
        mask = (r < n_rows_f)[:, None, None] & (x < Wo)[None, :, None] & (j < S)[None, None, :]
        x64, j64 = x.to(tl.int64), j.to(tl.int64)
        src = src_row[:, None, None] + ((x64 * S)[None, :, None] + j64[None, None, :]) * stride_fx
        dst = dst_row[:, None, None] + x64[None, :, None] * stride_ox + j64[None, None, :] * stride_oc
        tl.store(out_ptr + dst, tl.load(f_ptr + src, mask=mask), mask=mask)

    @triton.jit
    def _copy_h_tile(
        h_ptr, out_ptr, tile, Ch, Ho, Wo, n_rows_h, n_xblocks,
        stride_hb, stride_hc, stride_hy, stride_hx, stride_ob, stride_oc, stride_oy, stride_ox,
        ROWS: tl.constexpr, BLOCK_X: tl.constexpr,
    ):
        """h rows r = (b, c, yo)  ->  out[b, c, yo, :]."""
        r = (tile // n_xblocks) * ROWS + tl.arange(0, ROWS)
        x = (tile % n_xblocks) * BLOCK_X + tl.arange(0, BLOCK_X)
        b = (r // (Ch * Ho)).to(tl.int64)
        c = ((r // Ho) % Ch).to(tl.int64)
        yo = (r % Ho).to(tl.int64)
        mask = (r < n_rows_h)[:, None] & (x < Wo)[None, :]
        x64 = x.to(tl.int64)
        src = (b * stride_hb + c * stride_hc + yo * stride_hy)[:, None] + x64[None, :] * stride_hx
        dst = (b * stride_ob + c * stride_oc + yo * stride_oy)[:, None] + x64[None, :] * stride_ox
        tl.store(out_ptr + dst, tl.load(h_ptr + src, mask=mask), mask=mask)

    @triton.jit
    def _unshuffle_concat_kernel(
        h_ptr, f_ptr, out_ptr,
        Ch, Cf, Ho, Wo, n_rows_h, n_rows_f, n_f_programs, n_xblocks,
        stride_hb, stride_hc, stride_hy, stride_hx,
        stride_fb, stride_fc, stride_fy, stride_fx,
        stride_ob, stride_oc, stride_oy, stride_ox,
        S: tl.constexpr, S_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_X: tl.constexpr,
    ):
        """Programs [0, n_f_programs) unshuffle f tiles; the rest copy h tiles of the same size."""
        pid = tl.program_id(0)
        if pid < n_f_programs:
            _unshuffle_f_tile(
                f_ptr, out_ptr, pid, Ch, Cf, Ho, Wo, n_rows_f, n_xblocks,
                stride_fb, stride_fc, stride_fy, stride_fx, stride_ob, stride_oc, stride_oy, stride_ox,
                S, S_PAD, ROWS, BLOCK_X,
            )
        else:
            _copy_h_tile(
                h_ptr, out_ptr, pid - n_f_programs, Ch, Ho, Wo, n_rows_h, n_xblocks,
                stride_hb, stride_hc, stride_hy, stride_hx, stride_ob, stride_oc, stride_oy, stride_ox,
                ROWS * S_PAD, BLOCK_X,
            )

    def pixel_unshuffle_concat_triton(
        h: torch.Tensor, f: torch.Tensor, s: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Launch the kernel; returns the concatenation, written into `out` (contiguous) if given.

        Inputs of any strides are read in place. On CPU tensors this runs under TRITON_INTERPRET=1 only.
        """
        shape = _output_shape(h, f, s)
        if h.dtype != f.dtype:
            raise ValueError(f"h and f must share a dtype, got {h.dtype} and {f.dtype}")
        if h.is_complex():
            raise ValueError(f"Triton has no complex types, got {h.dtype}; pixel_unshuffle_concat_reference takes them")
        on_device = launch_device(h=h, f=f, out=out)
        if out is None:
            out = h.new_empty(shape)
        elif out.shape != shape or out.dtype != h.dtype or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {h.dtype} tensor of shape {shape}")
        # Block sizes are constexprs, so the launch is specialised to concrete sizes (under dynamic
        # shapes this guards on them instead of reasoning about symbolic block sizes).
        batch, ch, ho, wo = (int(d) for d in h.shape)
        cf = int(f.shape[1])
        if out.numel() == 0:
            return out

        s_pad = triton.next_power_of_2(s)
        block_x = min(triton.next_power_of_2(wo), max(_TILE // s_pad, 1))
        rows = max(_TILE // (block_x * s_pad), 1)
        n_xblocks = triton.cdiv(wo, block_x)
        n_rows_h, n_rows_f = batch * ch * ho, batch * cf * ho * s
        n_f_programs = triton.cdiv(n_rows_f, rows) * n_xblocks
        n_h_programs = triton.cdiv(n_rows_h, rows * s_pad) * n_xblocks

        with on_device:
            launchable(_unshuffle_concat_kernel)[(n_f_programs + n_h_programs,)](
                h, f, out, ch, cf, ho, wo, n_rows_h, n_rows_f, n_f_programs, n_xblocks,
                *(int(v) for v in (*h.stride(), *f.stride(), *out.stride())),
                S=s, S_PAD=s_pad, ROWS=rows, BLOCK_X=block_x,
            )
        return out

    @torch.library.triton_op(OP_NAME, mutates_args=())
    def _pixel_unshuffle_concat_op(h: torch.Tensor, f: torch.Tensor, s: int) -> torch.Tensor:
        return pixel_unshuffle_concat_triton(h, f, s)

    # triton_op's default fake traces the launcher, which under TRITON_INTERPRET would run the
    # interpreter on fake tensors; this one only allocates, so the fake is checkable on a CPU.
    @_pixel_unshuffle_concat_op.register_fake
    def _(h: torch.Tensor, f: torch.Tensor, s: int) -> torch.Tensor:
        return h.new_empty(_output_shape(h, f, s))
