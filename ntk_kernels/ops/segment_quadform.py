"""Chunked posterior-variance reduction: row_out_i = ‖Linv g_i‖², seg_out[s] = Σ_{i in s} w_i row_out_i.

Two kernels. ``_segment_quadform_kernel`` owns a BLOCK_R row tile of G and computes G_tile @ Linvᵀ in
BLOCK_J column chunks (each accumulated over BLOCK_L chunks of k in registers), squaring and summing
as it goes, so G is streamed once from memory. ``_segment_sum_kernel`` then sums w_i row_out_i per
segment over CSR offsets (deterministic: fixed order, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import acc_dtype
from .utils import (
    acc_tl_dtype,
    check_launchable,
    csr_offsets,
    rows_contiguous,
    segment_quadform_settings,
    segment_sum_settings,
)

__all__ = ["segment_quadform_triton", "segment_sum_triton"]


@triton.jit(do_not_specialize=["R"])
def _segment_quadform_kernel(
    row_out_ptr,
    g_ptr, stride_g, lt_ptr, stride_lt,
    R, k,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    offs_j = tl.arange(0, BLOCK_J)
    offs_l = tl.arange(0, BLOCK_L)
    total = tl.zeros([BLOCK_R], dtype=ACC)
    for j0 in range(0, k, BLOCK_J):
        jj = j0 + offs_j
        j_mask = jj < k
        h = tl.zeros([BLOCK_R, BLOCK_J], dtype=ACC)
        for l0 in range(0, k, BLOCK_L):
            ll = l0 + offs_l
            l_mask = ll < k
            g = tl.load(g_ptr + rows[:, None] * stride_g + ll[None, :],
                        mask=row_mask[:, None] & l_mask[None, :], other=0.0)
            # lt = Linvᵀ (contiguous): lt[l, j] = Linv[j, l]
            lt = tl.load(lt_ptr + ll[:, None] * stride_lt + jj[None, :],
                         mask=l_mask[:, None] & j_mask[None, :], other=0.0)
            h = tl.dot(g, lt, h, input_precision=PRECISION, out_dtype=ACC)
        total += tl.sum(h * h, axis=1)
    tl.store(row_out_ptr + rows, total.to(row_out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit(do_not_specialize=["n_seg"])
def _segment_sum_kernel(
    out_ptr, val_ptr, w_ptr, seg_ptr, ptr_ptr, n_seg,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    s0 = pid * BLOCK_S
    s_end = tl.minimum(s0 + BLOCK_S, n_seg)
    row_lo = tl.load(ptr_ptr + s0)
    row_hi = tl.load(ptr_ptr + s_end)
    local = tl.arange(0, BLOCK_S)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_S], dtype=ACC)
    for r0 in range(row_lo, row_hi, BLOCK_R):
        rows = r0 + offs_r
        row_mask = rows < row_hi
        v = tl.load(val_ptr + rows, mask=row_mask, other=0.0).to(ACC)
        v = v * tl.load(w_ptr + rows, mask=row_mask, other=0.0).to(ACC)
        slot = tl.load(seg_ptr + rows, mask=row_mask, other=-1) - s0
        acc += tl.sum(tl.where(local[:, None] == slot[None, :], v[None, :], 0.0), axis=1)
    segs = s0 + local
    tl.store(out_ptr + segs, acc.to(out_ptr.dtype.element_ty), mask=segs < n_seg)


def segment_sum_triton(values, weight, seg, n_seg, *, ptr=None, out=None, blocks=None):
    """Deterministic out[s] = Σ_{seg_i = s} weight_i values_i for sorted ``seg`` (1-D, CSR loop over
    ``ptr``, computed from seg when not given)."""
    acc = acc_dtype(values.dtype)
    if out is None:
        out = torch.empty(n_seg, dtype=acc, device=values.device)
    if n_seg == 0:
        return out
    if ptr is None:
        ptr = csr_offsets(seg, n_seg)
    meta = segment_sum_settings(values.shape[0] / n_seg)
    meta.update(blocks or {})
    grid = lambda m: (triton.cdiv(n_seg, m["BLOCK_S"]),)  # noqa: E731
    _segment_sum_kernel[grid](out, values, weight.contiguous(), seg.contiguous(), ptr, n_seg,
                              ACC=acc_tl_dtype(values.dtype), **meta)
    return out


def segment_quadform_triton(G, Linv, seg, weight, n_seg, ptr=None, *, blocks=None, sum_blocks=None):
    """Launch the quadform and segment-sum kernels; same contract as ``ntk_kernels.segment_quadform``.

    Returns ``(seg_out [n_seg], row_out [R])`` in fp32 (fp64 for fp64 G). Arguments are not checked
    here (``ntk_kernels.segment_quadform`` checks them once): ``seg`` must be sorted and in range,
    ``ptr`` (optional, on G's device) its CSR offsets. ``blocks`` / ``sum_blocks`` override
    meta-parameters of the quadform and segment-sum kernels (tests use them).
    """
    check_launchable(G.device)
    R, k = G.shape
    acc = acc_dtype(G.dtype)
    row_out = torch.empty(R, dtype=acc, device=G.device)
    if R > 0:
        G = rows_contiguous(G)
        lt = Linv.t().contiguous()  # k×k, negligible next to G; makes the tile loads coalesced
        meta = segment_quadform_settings(k, G.dtype)
        meta.update(blocks or {})
        grid = lambda m: (triton.cdiv(R, m["BLOCK_R"]),)  # noqa: E731
        _segment_quadform_kernel[grid](row_out, G, G.stride(0), lt, lt.stride(0), R, k,
                                       ACC=acc_tl_dtype(G.dtype), **meta)
    seg_out = segment_sum_triton(row_out, weight, seg, n_seg, ptr=ptr, blocks=sum_blocks)
    return seg_out, row_out
