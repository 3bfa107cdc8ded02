"""The residual model of the error-aware score (docs/design.md, "Error-aware score"), float64.

The labelled residuals ε = label − prediction are modelled as ε = ρ_κ c_κ gᵀv + η, v ~ N(0, I),
η ~ N(0, ρ_κ²σ_κ²), with the precision's Λ: posterior mean m = Λ⁻¹ Σ c g (ε/ρ)/σ², predicted residual
μ = ρ c gᵀm, variance ρ²(c²gᵀΛ⁻¹g + σ²) scaled by α² from K-fold cross-fitting (the ranking key), and
the written errors' Calibration (calibration.py) from the same cross-fitting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..features.rowblock import FORCE, KIND_NAMES, RowBlock
from .calibration import LEVELS, Calibration
from .precision import F64, Accumulator, Precision, cholesky_inverse


@dataclass
class Predictive:
    """Per row, in the rows' physical units, and the PV score of `Precision.variances`."""

    mu: torch.Tensor          # [R] predicted residual ρ c gᵀm (0 without the mean)
    epistemic: torch.Tensor   # [R] ρ²c²‖L⁻¹g‖² (uncalibrated)
    noise: torch.Tensor       # [R] noise floor ρ²σ² (uncalibrated)
    alpha2: torch.Tensor      # [R] the moment-matched α² of the ranking key (ErrorScorer)
    score: torch.Tensor       # [n] posterior-variance score per structure
    row_pv: torch.Tensor      # [R] ‖L⁻¹g‖²

    @property
    def spread(self) -> torch.Tensor:
        """μ² + ρ²c²PV per row: the uncalibrated expected squared error without the floor."""
        return self.mu.square() + self.epistemic


def raw_levels(rows: RowBlock, sq: torch.Tensor, floor: torch.Tensor) -> Dict[str, object]:
    """RMS values per level from per-row squares `sq` (μ² + ρ²c²PV, or ε² for the real errors) plus the
    per-row `floor` (ρ²σ², 0 for real errors): "energy" [n] of the energy (or embedding) row, "force" [n]
    over the 3N components (probe rows: the unbiased estimate of the same sum), "atom_force" [n_atoms in
    all] over each atom's 3 exact components with "atom_seg" its structure (NaN where a level is absent)."""
    n, seg, is_f = len(rows), rows.seg.cpu(), rows.kind == FORCE
    sq, floor = sq.to(F64), floor.to(F64)
    out: Dict[str, object] = {}
    for level, mask, comps in (("energy", ~is_f, torch.ones(n, dtype=F64)),
                               ("force", is_f, 3 * rows.natoms.to(F64))):
        count = torch.zeros(n, dtype=F64).index_add_(0, seg[mask], torch.ones(int(mask.sum()), dtype=F64))
        total = torch.zeros(n, dtype=F64).index_add_(0, seg[mask], sq[mask])
        fl = torch.zeros(n, dtype=F64).index_add_(0, seg[mask], floor[mask]) / count.clamp_min(1)
        val = (total / comps + fl).sqrt()
        out[level] = torch.where(count > 0, val, torch.full_like(val, float("nan"))).numpy()
        out[level + "_rows"] = count.numpy()
    if rows.atom is not None and bool(is_f.any()):
        exact = is_f & (rows.atom >= 0)
        offsets = torch.cumsum(rows.natoms, 0) - rows.natoms
        gid = (offsets[seg] + rows.atom.clamp_min(0))[exact]
        n_at = int(rows.natoms.sum())
        count = torch.zeros(n_at, dtype=F64).index_add_(0, gid, torch.ones(len(gid), dtype=F64))
        total = torch.zeros(n_at, dtype=F64).index_add_(0, gid, sq[exact])
        fl = torch.zeros(n_at, dtype=F64).index_add_(0, gid, floor[exact]) / count.clamp_min(1)
        val = (total / 3 + fl).sqrt()
        out["atom_force"] = torch.where(count > 0, val, torch.full_like(val, float("nan"))).numpy()
        out["atom_seg"] = torch.repeat_interleave(torch.arange(n), rows.natoms).numpy()
    return out


@dataclass
class ResidualModel:
    """Per kind ρ (residual scale), α² (moment-matched variance scale of the ranking key; alpha2_pv for a zero
    mean) and the labelled set's mean squared residual per structure; the mean m; and the calibration of the
    written errors per variant ("error": with the mean, "pv": posterior variance alone)."""

    mean: torch.Tensor  # float64 [k]: posterior mean of ε/ρ
    rho: Dict[str, float] = field(default_factory=dict)
    alpha2: Dict[str, float] = field(default_factory=dict)
    alpha2_pv: Dict[str, float] = field(default_factory=dict)
    resid_ms: Dict[str, float] = field(default_factory=dict)
    calibration: Optional[str] = None  # how it was calibrated
    calib: Dict[str, Calibration] = field(default_factory=dict)

    @classmethod
    def fit(cls, prec: Precision, acc: Accumulator, rho: Optional[Dict[str, float]] = None) -> "ResidualModel":
        """ρ_κ² = Σε²/Σ|c g|² (the prior matches the labelled residuals' size; or the given ρ),
        m = Λ⁻¹ Σ_κ c_κ b_κ/(ρ_κ σ_κ²), then α² and the calibration by cross-fitting over the kept labelled
        (and labelled pretraining) rows."""
        out = cls(mean=torch.zeros(0, dtype=F64))
        b = torch.zeros(prec.k, dtype=F64)
        for kind, sums in acc.res.items():
            name, c = KIND_NAMES[kind], prec.scales[KIND_NAMES[kind]]
            ss, gg = sums.sq_residual, sums.sq_rows
            out.rho[name] = math.sqrt(ss / (c * c * gg)) if ss > 0 and gg > 0 else 0.0
            out.rho[name] = float((rho or {}).get(name, out.rho[name]))
            out.resid_ms[name] = sums.per_structure / acc.n
            if out.rho[name] > 0:
                b += c / (out.rho[name] * (prec.sigma_f2 if kind == FORCE else prec.sigma_e2)) * acc.b[kind].cpu()
        out.mean = prec.Linv.T @ (prec.Linv @ b)
        out.alpha2 = {name: 1.0 for name in out.rho}
        out.alpha2_pv = dict(out.alpha2)
        kept = [(block, r, True) for _, block, r in acc.kept] + [(block, r, False) for _, block, r in acc.kept_pretrain]
        if kept:
            out.calibrate(prec, kept)
        return out

    def calibrate(self, prec: Precision, kept: List[Tuple[RowBlock, torch.Tensor, bool]], folds: int = 5,
                  seed: int = 0):
        """K-fold cross-fitting over the kept structures (labelled: True for the labelled set, False for a
        labelled pretraining sample): with each fold's rows removed from Λ and from Σ g ε, the held-out rows'
        mean μ̂ and variance c²gᵀΛ_f⁻¹g + σ² (in units of ρ). α² = Σ (ε/ρ − μ̂)² / Σ (PV + σ²) per kind over the
        labelled set (moment matching, the ranking key's scale; alpha2_pv for μ̂ = 0); the written errors'
        Calibration (calibration.py) over every held-out structure."""
        rows = RowBlock.cat([b for b, _, _ in kept])
        eps = torch.cat([r for _, r, _ in kept])
        labelled = torch.cat([torch.full((len(b.kind),), lab, dtype=torch.bool) for b, _, lab in kept])
        n = len(rows)
        if n < 2:
            self.calibration = "uncalibrated: fewer than 2 labelled structures with labels"
            return
        g = rows.rows.detach().to(F64).cpu() * prec.per_row(rows.kind, prec.scales)[:, None]  # c g
        rho, noise = prec.per_row(rows.kind, self.rho, 0.0), prec.row_noise(rows.kind)
        ok = torch.isfinite(eps) & (rho > 0)
        target = torch.where(ok, eps / rho.clamp_min(1e-300), torch.zeros_like(eps))  # ε/ρ
        hat = g / noise.sqrt()[:, None]  # noise-normalised rows: Λ = I + Σ ĝĝᵀ, b = Σ ĝ (ε/ρ)/σ
        lam = prec.L @ prec.L.T
        b = lam @ self.mean
        k_folds = min(folds, n)
        fold = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % k_folds)[rows.seg.cpu()]
        mu, pv = torch.full_like(eps, float("nan")), torch.full_like(eps, float("nan"))
        for f in range(k_folds):
            out = fold == f  # every row of the fold leaves Λ; those with a residual are predicted
            sel = out & ok
            Linv_f, _ = cholesky_inverse(lam - hat[out].T @ hat[out])
            m_f = Linv_f.T @ (Linv_f @ (b - hat[sel].T @ (target[sel] / noise[sel].sqrt())))
            mu[sel] = g[sel] @ m_f
            pv[sel] = (g[sel] @ Linv_f.T).square().sum(1)
        num, num_pv, den = (torch.zeros(len(KIND_NAMES), dtype=F64) for _ in range(3))
        lab = ok & labelled
        kinds = rows.kind[lab].long()
        num.index_add_(0, kinds, (target[lab] - mu[lab]).square())
        num_pv.index_add_(0, kinds, target[lab].square())
        den.index_add_(0, kinds, pv[lab] + noise[lab])
        for kind, name in KIND_NAMES.items():
            if name in self.alpha2 and den[kind] > 0:
                self.alpha2[name] = float(num[kind] / den[kind])
                self.alpha2_pv[name] = float(num_pv[kind] / den[kind])
        rho2 = rho.square()
        known = torch.where(ok, eps, torch.full_like(eps, float("nan")))
        real = raw_levels(rows, known.square(), torch.zeros_like(eps))
        for variant, with_mean in (("error", True), ("pv", False)):
            sq = rho2 * (pv + (mu.square() if with_mean else 0))
            raw = raw_levels(rows, sq, rho2 * noise)
            self.calib[variant] = Calibration.fit(*_calibration_data(rows, raw, real, eps, labelled))
        n_pre = int(sum(len(b) for b, _, lab in kept if not lab))
        self.calibration = (f"{k_folds}-fold cross-fitted over {n - n_pre} labelled structures"
                            + (f" and {n_pre} labelled pretraining structures" if n_pre else ""))

    def predictive(self, prec: Precision, rows: RowBlock, with_mean: bool = True) -> Predictive:
        """μ, the uncalibrated epistemic variance and noise floor per row, and the key's α² (with_mean=False:
        μ = 0 and α² of posterior variance alone), from one pass of `prec.variances`."""
        seg_out, row_out = prec.variances(rows)
        a2 = prec.per_row(rows.kind, self.alpha2 if with_mean else self.alpha2_pv, 1.0)
        c, rho = prec.per_row(rows.kind, prec.scales), prec.per_row(rows.kind, self.rho, 0.0)
        G = rows.rows.detach()
        mu = (G @ self.mean.to(device=G.device, dtype=G.dtype)).cpu().to(F64) * c * rho if with_mean else 0 * rho
        return Predictive(mu, rho.square() * c.square() * row_out, rho.square() * prec.row_noise(rows.kind), a2,
                          seg_out, row_out)

    def errors(self, rows: RowBlock, pred: Predictive, with_mean: bool = True) -> Dict[str, object]:
        """The calibrated errors (conditional medians of the real RMS error; docs/design.md, "Calibration"):
        "energy" [n] (per atom), "force" [n] (force components), "atom_force" [atoms] with "atom_seg", and the
        raw values they came from ("raw")."""
        cal = self.calib.get("error" if with_mean else "pv", Calibration())
        raw = raw_levels(rows, pred.spread if with_mean else pred.epistemic, pred.noise)
        out = {level: cal.apply(level, raw[level]) for level in LEVELS if level in raw}
        out["atom_seg"], out["raw"], out["calibration"] = raw.get("atom_seg"), raw, cal
        return out

    # --- plain state ------------------------------------------------------------------------------
    def to_state(self) -> dict:
        """Plain data (the checkpoint contract of ntkal.runstate)."""
        return {"mean": self.mean, "rho": dict(self.rho), "alpha2": dict(self.alpha2),
                "alpha2_pv": dict(self.alpha2_pv), "resid_ms": dict(self.resid_ms), "calibration": self.calibration,
                "calib": {k: c.to_state() for k, c in self.calib.items()}}

    @classmethod
    def from_state(cls, state: dict) -> "ResidualModel":
        def table(name):
            return {str(k): float(v) for k, v in state[name].items()}
        return cls(mean=state["mean"].to(F64), rho=table("rho"), alpha2=table("alpha2"),
                   alpha2_pv=table("alpha2_pv"), resid_ms=table("resid_ms"), calibration=state["calibration"],
                   calib={str(k): Calibration.from_state(v) for k, v in state["calib"].items()})


def component_scale(rows: RowBlock, levels: dict) -> np.ndarray:
    """Per row √(m/3N), m the structure's force rows (levels["force_rows"] of raw_levels): a probe row's
    residual times it is at the scale of one force component; 1 for exact force rows and for energy rows."""
    scale = np.sqrt(levels["force_rows"] / np.maximum(3 * rows.natoms.numpy(), 1))[rows.seg.cpu().numpy()]
    return np.where((rows.kind == FORCE).numpy(), scale, 1.0)


def _calibration_data(rows: RowBlock, raw: dict, real: dict, eps: torch.Tensor, labelled: torch.Tensor):
    """Calibration.fit's arguments from held-out raw and real levels: per level the pairs, per part the
    components at component scale (probe rows: ε_j·√(m/3N)) with their structure's raw prediction, and weights
    that give the labelled set and the pretraining sample equal say (each group's weights sum to 1: 40
    labelled structures are not outvoted by 500 pretraining ones, so the line passes through both regions)."""
    seg, is_f = rows.seg.cpu().numpy(), (rows.kind == FORCE).numpy()
    lab = np.zeros(len(rows), dtype=bool)
    lab[seg[labelled.numpy()]] = True
    w_struct = np.where(lab, 1.0 / max(lab.sum(), 1), 1.0 / max((~lab).sum(), 1))
    e = eps.numpy()
    comp = component_scale(rows, raw)
    t = {"energy": (e[~is_f], raw["energy"][seg[~is_f]], w_struct[seg[~is_f]]),
         "force": ((e * comp)[is_f], raw["force"][seg[is_f]], (w_struct / np.maximum(raw["force_rows"], 1))[seg[is_f]])}
    for part in ("energy", "force"):
        keep = np.isfinite(t[part][0]) & np.isfinite(t[part][1])
        t[part] = tuple(x[keep] for x in t[part])
    levels = {lv: raw[lv] for lv in LEVELS if lv in raw}
    weight = {"energy": w_struct, "force": w_struct}
    if "atom_force" in raw:
        weight["atom_force"] = (w_struct / np.maximum(rows.natoms.numpy(), 1))[raw["atom_seg"]]
    return levels, {lv: real[lv] for lv in levels}, t, weight
