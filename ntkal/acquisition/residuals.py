"""The labelled structures' residuals ε = label − prediction, one per feature row (docs/design.md,
"Error-aware score"): what the error-aware score's posterior mean is fitted to.

Energy (and embedding) rows observe the per-atom energy, so ε = (E_ref − E)/N in eV/atom. Exact force rows
observe force components in the rows' atom-major order, ε = F_ref − F in eV/Å. A probe row
u_j = Σ_c z_jc g_c / √m observes z_j·(F_ref − F)/√m, so Σ_j u_j ε_j has the expectation Σ_c g_c ε_c of the
exact rows (the same pairing that makes probe Grams unbiased). A structure without labels gets NaN.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..features.rowblock import FORCE, RowBlock


def labels(atoms):
    """(REF_energy, REF_forces) of a structure, or None where it has no labels."""
    e, f = atoms.info.get("REF_energy"), atoms.arrays.get("REF_forces")
    return None if e is None or f is None else (float(e), np.asarray(f, dtype=np.float64))


def residual_rows(rows: RowBlock, atoms: Sequence, pred_e, pred_f, probes: Optional[Callable] = None,
                  required: bool = False, path=None, start: int = 0) -> torch.Tensor:
    """float64 [R]: each row's residual. probes(atoms) gives a structure's Rademacher vectors [m, 3N]
    (the featurizer's probe_vectors) when its force rows are probe rows. required: missing labels are
    an InputError naming the structure; else NaN."""
    out = torch.full((rows.rows.shape[0],), float("nan"), dtype=torch.float64)
    for s, a in enumerate(atoms):
        lab = labels(a)
        if lab is None:
            if required:
                raise InputError("no REF_energy / REF_forces labels (the error-aware score needs labelled "
                                 "training structures)", path=path, index=start + s)
            continue
        e_ref, f_ref = lab
        lo, hi = int(rows.ptr[s]), int(rows.ptr[s + 1])
        kind = rows.kind[lo:hi]
        n_at = len(a)
        out[lo:hi][kind != FORCE] = (e_ref - float(pred_e[s])) / n_at
        is_f = kind == FORCE
        if bool(is_f.any()):
            df = torch.as_tensor(f_ref - np.asarray(pred_f[s]), dtype=torch.float64).reshape(-1)
            if rows.atom is not None and bool((rows.atom[lo:hi][is_f] >= 0).all()):
                out[lo:hi][is_f] = df  # exact rows, atom-major
            else:
                z = probes(a).to(torch.float64).cpu()
                out[lo:hi][is_f] = z @ df / math.sqrt(z.shape[0])
    return out
