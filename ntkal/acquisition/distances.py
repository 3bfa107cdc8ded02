"""LCMD's per-structure vectors ψ: what "far apart" means when a diverse batch is picked
(docs/design.md, "Distances that see forces").

- energy / embedding rows: the row itself (one per structure);
- force rows G_s [r, k]: a structure-level force kernel ⟨M_s, M_t⟩_F with M_s = G_sᵀG_s / N_s, the
  force rows' second moment per atom. It is invariant to rotation (a rotation mixes each atom's x, y, z
  rows orthogonally), translation and atom order, and probe rows estimate M_s without bias. Its
  tensor sketch ψ_F(s) = Σ_i (g_i A) ⊙ (g_i B) / (√d N_s) (ntk_kernels.tensor_sketch, A, B Gaussian)
  has E⟨ψ_F(s), ψ_F(t)⟩ = ⟨M_s, M_t⟩_F;
- energy + force rows (joint): both parts side by side; the posterior scales each part so that its
  mean squared norm over the labelled set is 1 (centres.py).
Rows may be posterior-transformed first (L⁻¹g, LCMD's P mode).
"""
from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Tuple

import torch

import ntk_kernels

from ..features.rowblock import EMBEDDING, FORCE, RowBlock


@lru_cache(maxsize=8)
def _factors(k: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    from ..features.sketch import _gaussian
    return _gaussian(seed, "ntkal-lcmd-force#A", (k, k)), _gaussian(seed, "ntkal-lcmd-force#B", (k, k))


def lcmd_vectors(rows: RowBlock, seed: int = 0, linv: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[int]]:
    """(ψ float64 [n, d] on the CPU, sizes of its parts). RowBlock.psi is used only for embedding-only rows
    (precomputed vectors such as a committee's); linv: apply L⁻¹ to the rows first (P mode)."""
    n = len(rows)
    kind = rows.kind.to(rows.rows.device)
    if bool((rows.kind == EMBEDDING).all()) and rows.psi is not None and linv is None:
        psi = rows.psi.detach().cpu().to(torch.float64)
        return psi, [psi.shape[1]]
    G = rows.rows.detach()
    if linv is not None:
        G = G @ linv.to(device=G.device, dtype=G.dtype).T
    seg = rows.seg.to(G.device)
    parts = []
    single = kind != FORCE
    if bool(single.any()):
        parts.append(torch.zeros(n, G.shape[1], dtype=G.dtype, device=G.device).index_add_(0, seg[single], G[single]))
    force = kind == FORCE
    if bool(force.any()):
        A, B = (f.to(device=G.device, dtype=G.dtype) for f in _factors(G.shape[1], seed))
        g = G[force].contiguous()
        ts = ntk_kernels.tensor_sketch(g, g, A, B, seg[force].contiguous(), n)
        parts.append(ts / rows.natoms.to(device=G.device, dtype=G.dtype)[:, None])
    psi = torch.cat(parts, 1).cpu().to(torch.float64)
    return psi, [p.shape[1] for p in parts]


def exact_force_kernel(rows: RowBlock) -> torch.Tensor:
    """⟨M_s, M_t⟩_F for every pair (float64 [n, n]): the kernel ψ_F's sketch estimates (tests use it)."""
    M = []
    for s in range(len(rows)):
        a, b = int(rows.ptr[s]), int(rows.ptr[s + 1])
        g = rows.rows[a:b][rows.kind[a:b] == FORCE].to(torch.float64)
        M.append((g.T @ g / int(rows.natoms[s])).reshape(-1))
    M = torch.stack(M)
    return M @ M.T

