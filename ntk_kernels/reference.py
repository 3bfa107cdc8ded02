"""Pure-PyTorch versions of the three ops, with the kernels' signatures.

They are the test oracle, the CPU path and the benchmark baseline: vectorised (matmuls plus
``index_add_``), computing in fp32 (fp64 for fp64 inputs), and chunked over rows so the [rows, k]
intermediates stay bounded. They do not validate arguments (``ntk_kernels.dispatch`` does).
"""
from __future__ import annotations

import math

import torch

__all__ = ["tensor_sketch_ref", "segment_quadform_ref", "lcmd_update_ref", "acc_dtype"]

#: Upper bound on elements of one [rows, k] intermediate (16M elements = 64 MB in fp32).
_CHUNK_ELEMS = 1 << 24


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(k: int) -> int:
    return max(1, _CHUNK_ELEMS // max(int(k), 1))


def tensor_sketch_ref(x, dy, A, B, seg, n_seg, x2=None, dy2=None):
    """out[s] = Σ_{seg_i = s} (x_i A) ⊙ (dy_i B) / √k  (+ the same for x2, dy2), dtype of x."""
    acc = acc_dtype(x.dtype)
    k = A.shape[1]
    out = torch.zeros(n_seg, k, dtype=acc, device=x.device)
    Aa, Ba = A.to(acc), B.to(acc)
    step = _chunk_rows(k)
    for r0 in range(0, x.shape[0], step):
        sl = slice(r0, r0 + step)
        t = (x[sl].to(acc) @ Aa).mul_(dy[sl].to(acc) @ Ba)
        if x2 is not None:
            t.add_((x2[sl].to(acc) @ Aa).mul_(dy2[sl].to(acc) @ Ba))
        out.index_add_(0, seg[sl], t)
    out.div_(math.sqrt(k))
    return out.to(x.dtype)


def segment_quadform_ref(G, Linv, seg, weight, n_seg):
    """row_out_i = ‖Linv g_i‖², seg_out[s] = Σ_{seg_i = s} weight_i row_out_i; accumulation dtype."""
    acc = acc_dtype(G.dtype)
    R, k = G.shape
    row_out = torch.empty(R, dtype=acc, device=G.device)
    Lt = Linv.to(acc).t()
    step = _chunk_rows(k)
    for r0 in range(0, R, step):
        sl = slice(r0, r0 + step)
        row_out[sl] = (G[sl].to(acc) @ Lt).square_().sum(dim=1)
    seg_out = torch.zeros(n_seg, dtype=acc, device=G.device)
    seg_out.index_add_(0, seg, weight.to(acc) * row_out)
    return seg_out, row_out


def lcmd_update_ref(psi, c, dmin2, owner, id):
    """In place: d2_i = Σ_j (psi_ij − c_j)²; where d2_i < dmin2_i: dmin2_i = d2_i, owner_i = id."""
    acc = acc_dtype(psi.dtype)
    ca = c.to(acc)
    step = _chunk_rows(psi.shape[1])
    for r0 in range(0, psi.shape[0], step):
        sl = slice(r0, r0 + step)
        d2 = (psi[sl].to(acc) - ca).square_().sum(dim=1).to(dmin2.dtype)
        cur = dmin2[sl]
        better = d2 < cur
        cur.copy_(torch.where(better, d2, cur))
        owner[sl].masked_fill_(better, id)
    return dmin2, owner
