"""Fused per-segment tensor sketch: out[s] = Σ_{i in s} (x_i A) ⊙ (dy_i B) / √k.

This is the sketched per-atom Jacobian of a linear layer (the outer product x_i ⊗ dy_i projected by
the tensor sketch (A, B)). The projections of a row tile live only in registers: x A and dy B are never
written to memory. Segments are reduced deterministically (CSR offsets, no atomics): a program owns
BLOCK_S consecutive segments and one BLOCK_K tile of sketch columns and loops over their rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import acc_tl_dtype, check_launchable, csr_offsets, rows_contiguous, tensor_sketch_settings

__all__ = ["tensor_sketch_triton"]


@triton.jit
def _project(u_ptr, stride_u, w_ptr, stride_w, rows, row_mask, cols, col_mask, d,
             ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
             PRECISION: tl.constexpr):
    """[BLOCK_R, BLOCK_K] tile of U[rows] @ W[:, cols], accumulated over d in BLOCK_D chunks."""
    p = tl.zeros([BLOCK_R, BLOCK_K], dtype=ACC)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, d, BLOCK_D):
        dd = d0 + offs_d
        d_mask = dd < d
        u = tl.load(u_ptr + rows[:, None] * stride_u + dd[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptr + dd[:, None] * stride_w + cols[None, :],
                    mask=d_mask[:, None] & col_mask[None, :], other=0.0)
        p = tl.dot(u, w, p, input_precision=PRECISION, out_dtype=ACC)
    return p


@triton.jit(do_not_specialize=["n_seg", "k"])
def _tensor_sketch_kernel(
    out_ptr, stride_out,
    x_ptr, stride_x, dy_ptr, stride_dy,
    x2_ptr, stride_x2, dy2_ptr, stride_dy2,
    a_ptr, stride_a, b_ptr, stride_b,
    seg_ptr, ptr_ptr,
    n_seg, d_in, d_out, k,
    HAS_SECOND: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_s = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    s0 = pid_s * BLOCK_S
    s_end = tl.minimum(s0 + BLOCK_S, n_seg)
    row_lo = tl.load(ptr_ptr + s0)
    row_hi = tl.load(ptr_ptr + s_end)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < k
    offs_r = tl.arange(0, BLOCK_R)
    if BLOCK_S == 1:
        acc = tl.zeros([BLOCK_K], dtype=ACC)
    else:
        acc = tl.zeros([BLOCK_S, BLOCK_K], dtype=ACC)
    for r0 in range(row_lo, row_hi, BLOCK_R):
        rows = r0 + offs_r
        row_mask = rows < row_hi
        t = _project(x_ptr, stride_x, a_ptr, stride_a, rows, row_mask, cols, col_mask, d_in,
                     ACC, BLOCK_R, BLOCK_K, BLOCK_D, PRECISION)
        t = t * _project(dy_ptr, stride_dy, b_ptr, stride_b, rows, row_mask, cols, col_mask, d_out,
                         ACC, BLOCK_R, BLOCK_K, BLOCK_D, PRECISION)
        if HAS_SECOND:
            t2 = _project(x2_ptr, stride_x2, a_ptr, stride_a, rows, row_mask, cols, col_mask, d_in,
                          ACC, BLOCK_R, BLOCK_K, BLOCK_D, PRECISION)
            t2 = t2 * _project(dy2_ptr, stride_dy2, b_ptr, stride_b, rows, row_mask, cols, col_mask, d_out,
                               ACC, BLOCK_R, BLOCK_K, BLOCK_D, PRECISION)
            t = t + t2
        if BLOCK_S == 1:
            acc += tl.sum(t, axis=0)
        else:
            local = tl.arange(0, BLOCK_S)
            # Rows -> their segment's slot in this program, summed by a one-hot matmul (exact 0/1
            # weights, fixed order: deterministic). Masked rows get a negative slot and match nothing.
            slot = tl.load(seg_ptr + rows, mask=row_mask, other=-1) - s0
            onehot = (local[:, None] == slot[None, :]).to(ACC)
            acc = tl.dot(onehot, t, acc, input_precision=PRECISION, out_dtype=ACC)
    kf = tl.zeros([1], dtype=ACC) + k
    if ACC == tl.float64:
        acc = acc / tl.sqrt(kf)
    else:
        acc = acc / tl.sqrt_rn(kf)  # tl.sqrt is approximate in fp32 on GPUs
    if BLOCK_S == 1:
        tl.store(out_ptr + s0 * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)
    else:
        segs = s0 + tl.arange(0, BLOCK_S)
        tl.store(out_ptr + segs[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(segs < n_seg)[:, None] & col_mask[None, :])


def tensor_sketch_triton(x, dy, A, B, seg, n_seg, x2=None, dy2=None, ptr=None, *, blocks=None):
    """Launch :func:`_tensor_sketch_kernel`; same contract as ``ntk_kernels.tensor_sketch``.

    Arguments are not checked here (``ntk_kernels.tensor_sketch`` checks them once): ``seg`` must be
    sorted and in range, ``ptr`` (optional, on x's device) its CSR offsets. ``blocks`` overrides
    entries of the chosen meta-parameters (BLOCK_R/K/D/S, num_warps, PRECISION); tests and bench kernels use it.
    """
    check_launchable(x.device)
    R, d_in = x.shape
    d_out = dy.shape[1]
    k = A.shape[1]
    out = torch.empty((n_seg, k), dtype=x.dtype, device=x.device)
    if n_seg == 0:
        return out
    x, dy, A, B = (rows_contiguous(t) for t in (x, dy, A, B))
    has_second = x2 is not None
    if has_second:
        x2, dy2 = rows_contiguous(x2), rows_contiguous(dy2)
    else:
        x2, dy2 = x, dy  # never read (HAS_SECOND=False)
    seg = seg.contiguous()
    if ptr is None:
        ptr = csr_offsets(seg, n_seg)
    meta = tensor_sketch_settings(d_in, d_out, k, R / n_seg, x.dtype)
    meta.update(blocks or {})
    if meta["BLOCK_S"] not in (1, 16, 32, 64, 128):
        raise ValueError(f"BLOCK_S must be 1 or a power of two in [16, 128], got {meta['BLOCK_S']}")
    grid = lambda m: (triton.cdiv(n_seg, m["BLOCK_S"]), triton.cdiv(k, m["BLOCK_K"]))  # noqa: E731
    _tensor_sketch_kernel[grid](
        out, out.stride(0),
        x, x.stride(0), dy, dy.stride(0),
        x2, x2.stride(0), dy2, dy2.stride(0),
        A, A.stride(0), B, B.stride(0),
        seg, ptr,
        n_seg, d_in, d_out, k,
        HAS_SECOND=has_second, ACC=acc_tl_dtype(x.dtype),
        **meta,
    )
    return out
