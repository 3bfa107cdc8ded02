"""Fused LCMD step: distances of every candidate to a new centre, then the running min and its owner.

One pass over psi: a program owns BLOCK_M rows, accumulates Σ_j (psi_ij − c_j)² over BLOCK_K column
chunks (differences, not norms, so near-duplicates keep their accuracy), and updates dmin2/owner in
place where the new distance is strictly smaller.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .utils import acc_tl_dtype, check_launchable, lcmd_update_settings, rows_contiguous

__all__ = ["lcmd_update_triton"]


@triton.jit(do_not_specialize=["M", "new_id"])
def _lcmd_update_kernel(
    dmin2_ptr, owner_ptr,
    psi_ptr, stride_psi, c_ptr,
    M, k, new_id,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    offs_k = tl.arange(0, BLOCK_K)
    d2 = tl.zeros([BLOCK_M], dtype=ACC)
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + offs_k
        col_mask = cols < k
        p = tl.load(psi_ptr + rows[:, None] * stride_psi + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(ACC)
        cc = tl.load(c_ptr + cols, mask=col_mask, other=0.0).to(ACC)
        diff = p - cc[None, :]  # masked entries are 0 - 0
        d2 += tl.sum(diff * diff, axis=1)
    d2 = d2.to(dmin2_ptr.dtype.element_ty)  # compare in dmin2's dtype, as the reference does
    cur = tl.load(dmin2_ptr + rows, mask=row_mask, other=0.0)
    better = (d2 < cur) & row_mask
    tl.store(dmin2_ptr + rows, d2, mask=better)
    tl.store(owner_ptr + rows, tl.zeros([BLOCK_M], dtype=tl.int64) + new_id, mask=better)


def lcmd_update_triton(psi, c, dmin2, owner, id, *, blocks=None):
    """Launch :func:`_lcmd_update_kernel`; same contract as ``ntk_kernels.lcmd_update`` (in place).

    Arguments are not checked here (``ntk_kernels.lcmd_update`` checks them once). ``blocks``
    overrides entries of the chosen meta-parameters (BLOCK_M/K, num_warps); tests use it.
    """
    check_launchable(psi.device)
    M, k = psi.shape
    if M == 0:
        return dmin2, owner
    psi = rows_contiguous(psi)
    c = c.contiguous()
    meta = lcmd_update_settings(k, psi.dtype)
    meta.update(blocks or {})
    grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]),)  # noqa: E731
    _lcmd_update_kernel[grid](dmin2, owner, psi, psi.stride(0), c, M, k, id,
                              ACC=acc_tl_dtype(psi.dtype), **meta)
    return dmin2, owner
