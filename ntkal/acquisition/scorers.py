"""Scorers: what ranks the pool. Each turns a chunk's feature rows into a key per structure (the
shortlist's order) plus the per-structure and per-atom values written beside every pick. The target
scorer (expected target-variance reduction) is in target.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from ..features.rowblock import FORCE, KIND_NAMES, RowBlock


@dataclass
class Scored:
    key: np.ndarray                                          # float64 [n]: higher = more worth labelling
    values: Dict[str, np.ndarray] = field(default_factory=dict)                 # per structure
    atom_values: Dict[str, List[Optional[np.ndarray]]] = field(default_factory=dict)  # per structure, per atom


class PVScorer:
    """Posterior variance (novelty relative to the labelled set): the paper's score."""

    name = "pv"

    def __init__(self, post):
        self.post = post

    def __call__(self, rows: RowBlock) -> Scored:
        if len(rows) == 0:
            s, atom_var = np.zeros(0), []
        else:
            scores, row_out = self.post.variances(rows)
            s, atom_var = scores.numpy(), self.post.atom_split(rows, row_out)
        return Scored(s, {"score": s}, {"atom_variance": atom_var})


class CommitteeScorer:
    """Committee disagreement on precomputed rows: each structure's row is its member-deviation vector
    (ntkal/experiment/committee.py), whose squared norm is the disagreement."""

    name = "committee"

    def __call__(self, rows: RowBlock) -> Scored:
        sq = torch.zeros(len(rows), dtype=torch.float64).index_add_(
            0, rows.seg.cpu(), rows.rows.detach().cpu().to(torch.float64).square().sum(1))
        s = sq.numpy()
        return Scored(s, {"score": s}, {})


class ErrorScorer:
    """Expected error of the model at each structure, in physical units (docs/design.md, "Error-aware score",
    "Calibration").

    Per row: the posterior mean of the labelled residuals μ = ρ c gᵀm (what linearised fine-tuning on them
    predicts the model's error to be) and the variance ρ²(c²gᵀΛ⁻¹g + σ²). The key ranks by the expected
    squared error E[err²] = μ² + α²ρ²(PV + σ²) (α² moment-matched), summed over kinds as
    Σ_κ E[err_κ²] / (the labelled set's mean squared residual of kind κ): 1 = as wrong as a typical labelled
    structure. The written errors (energy_error meV/atom, force_error meV/Å, atom_force_error meV/Å) are the
    calibrated ones: the median real RMS error of structures (atoms) with that prediction.
    """

    name = "error"

    def __init__(self, post, variance: bool = True):
        if post.residual is None:
            from ..errors import NtkalError
            raise NtkalError("the error-aware score needs labelled training structures (REF_energy, REF_forces)")
        self.post, self.variance = post, variance  # variance=False ranks by the posterior mean alone

    def __call__(self, rows: RowBlock) -> Scored:
        post, F64 = self.post, torch.float64
        pred = post.predictive(rows)
        pv, row_out, resid_ms = pred.score, pred.row_pv, post.residual.resid_ms
        spread = pred.mu.square() + pred.alpha2 * pred.epistemic * self.variance  # per row, without the floor
        floor = pred.alpha2 * pred.noise * self.variance
        n, seg, is_f = len(rows), rows.seg.cpu(), rows.kind == FORCE
        key, values = torch.zeros(n, dtype=F64), {"pv": pv.numpy()}
        atom_values = {"atom_variance": post.atom_split(rows, row_out)}
        err = post.residual.errors(rows, pred)
        if bool((~is_f).any()):  # the energy (or embedding) row
            e2 = torch.zeros(n, dtype=F64).index_add_(0, seg[~is_f], (spread + floor)[~is_f])
            key += e2 / max(resid_ms.get(KIND_NAMES[int(rows.kind[~is_f][0])], 1.0), 1e-300)
            values["energy_error"] = 1e3 * err["energy"]  # meV/atom
        if bool(is_f.any()):  # mean over the 3N components (probe rows estimate the same sum), one floor
            f_floor = float(floor[is_f][0])
            e2 = torch.zeros(n, dtype=F64).index_add_(0, seg[is_f], spread[is_f]) / (3 * rows.natoms.to(F64)) + f_floor
            key += e2 / max(resid_ms.get("force", 1.0), 1e-300)
            values["force_error"] = 1e3 * err["force"]  # meV/Å
            atom_values["atom_force_error"] = _per_structure(err.get("atom_force"), err.get("atom_seg"), n, 1e3)
        values["score"] = key.numpy()
        return Scored(key.numpy(), values, atom_values)


def _per_structure(flat, seg, n: int, factor: float) -> List[Optional[np.ndarray]]:
    """A flat per-atom array split into one array per structure (None where a structure has none)."""
    if flat is None:
        return [None] * n
    out = np.split(factor * flat, np.cumsum(np.bincount(seg, minlength=n))[:-1])
    return [None if len(a) == 0 or not np.isfinite(a).all() else a for a in out]
