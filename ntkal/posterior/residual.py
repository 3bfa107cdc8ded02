"""The residual model of the error-aware score (docs/design.md, "Error-aware score"), float64.

The labelled residuals ε = label − prediction are modelled as ε = ρ_κ c_κ gᵀv + η, v ~ N(0, I),
η ~ N(0, ρ_κ²σ_κ²), with the precision's Λ: posterior mean m = Λ⁻¹ Σ c g (ε/ρ)/σ², predicted residual
μ = ρ c gᵀm, variance ρ²(c²gᵀΛ⁻¹g + σ²) scaled by α² from K-fold cross-fitting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..features.rowblock import FORCE, KIND_NAMES, RowBlock
from .precision import F64, Accumulator, Precision, cholesky_inverse


@dataclass
class Predictive:
    """Per row, in the rows' physical units, and the PV score of `Precision.variances`."""

    mu: torch.Tensor          # [R] predicted residual ρ c gᵀm (0 without the mean)
    epistemic: torch.Tensor   # [R] calibrated variance α²ρ²c²‖L⁻¹g‖²
    noise: torch.Tensor       # [R] calibrated noise floor α²ρ²σ²
    score: torch.Tensor       # [n] posterior-variance score per structure
    row_pv: torch.Tensor      # [R] ‖L⁻¹g‖²


@dataclass
class ResidualModel:
    """Per kind ρ (residual scale), α² (cross-fitted variance calibration; alpha2_pv for a zero mean, i.e.
    posterior variance alone) and the labelled set's mean squared residual per structure; the mean m."""

    mean: torch.Tensor  # float64 [k]: posterior mean of ε/ρ
    rho: Dict[str, float] = field(default_factory=dict)
    alpha2: Dict[str, float] = field(default_factory=dict)
    alpha2_pv: Dict[str, float] = field(default_factory=dict)
    resid_ms: Dict[str, float] = field(default_factory=dict)
    calibration: Optional[str] = None  # how α² was found

    @classmethod
    def fit(cls, prec: Precision, acc: Accumulator, rho: Optional[Dict[str, float]] = None) -> "ResidualModel":
        """ρ_κ² = Σε²/Σ|c g|² (the prior matches the labelled residuals' size; or the given ρ),
        m = Λ⁻¹ Σ_κ c_κ b_κ/(ρ_κ σ_κ²), then α² by cross-fitting over the kept labelled rows."""
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
        if acc.kept:
            out.calibrate(prec, [(block, r) for _, block, r in acc.kept])
        return out

    def calibrate(self, prec: Precision, kept: List[Tuple[RowBlock, torch.Tensor]], folds: int = 5, seed: int = 0):
        """α_κ² by K-fold cross-fitting over the kept labelled structures: with each fold's rows removed from Λ
        and from Σ g ε, the held-out rows' squared normalised residuals (ε/ρ − μ̂)² against their predictive
        variance c²gᵀΛ_f⁻¹g + σ²; α² = Σ (ε/ρ − μ̂)² / Σ (PV + σ²) per kind (moment matching). alpha2_pv is
        the same for predictions of zero error (what posterior variance alone would claim)."""
        rows = RowBlock.cat([b for b, _ in kept])
        eps = torch.cat([r for _, r in kept])
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
        fold = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % min(folds, n))[rows.seg.cpu()]
        num, num_pv, den = (torch.zeros(len(KIND_NAMES), dtype=F64) for _ in range(3))
        for f in range(min(folds, n)):
            out = fold == f  # every row of the fold leaves Λ; those with a residual are scored
            sel = out & ok
            Linv_f, _ = cholesky_inverse(lam - hat[out].T @ hat[out])
            m_f = Linv_f.T @ (Linv_f @ (b - hat[sel].T @ (target[sel] / noise[sel].sqrt())))
            pv = (g[sel] @ Linv_f.T).square().sum(1)
            kinds = rows.kind[sel].long()
            num.index_add_(0, kinds, (target[sel] - g[sel] @ m_f).square())
            num_pv.index_add_(0, kinds, target[sel].square())
            den.index_add_(0, kinds, pv + noise[sel])
        for kind, name in KIND_NAMES.items():
            if name in self.alpha2 and den[kind] > 0:
                self.alpha2[name] = float(num[kind] / den[kind])
                self.alpha2_pv[name] = float(num_pv[kind] / den[kind])
        self.calibration = f"{min(folds, n)}-fold cross-fitted over {n} labelled structures"

    def predictive(self, prec: Precision, rows: RowBlock, with_mean: bool = True) -> Predictive:
        """μ, the calibrated epistemic variance and noise floor per row (with_mean=False: μ = 0 and the
        calibration of posterior variance alone), from one pass of `prec.variances`."""
        seg_out, row_out = prec.variances(rows)
        a2 = prec.per_row(rows.kind, self.alpha2 if with_mean else self.alpha2_pv, 1.0)
        c, rho = prec.per_row(rows.kind, prec.scales), prec.per_row(rows.kind, self.rho, 0.0)
        G = rows.rows.detach()
        mu = (G @ self.mean.to(device=G.device, dtype=G.dtype)).cpu().to(F64) * c * rho if with_mean else 0 * rho
        return Predictive(mu, a2 * rho.square() * c.square() * row_out, a2 * rho.square() * prec.row_noise(rows.kind),
                          seg_out, row_out)

    # --- plain state ------------------------------------------------------------------------------
    def to_state(self) -> dict:
        """Plain data (the checkpoint contract of ntkal.runstate)."""
        return {"mean": self.mean, "rho": dict(self.rho), "alpha2": dict(self.alpha2),
                "alpha2_pv": dict(self.alpha2_pv), "resid_ms": dict(self.resid_ms), "calibration": self.calibration}

    @classmethod
    def from_state(cls, state: dict) -> "ResidualModel":
        def table(name):
            return {str(k): float(v) for k, v in state[name].items()}
        return cls(mean=state["mean"].to(F64), rho=table("rho"), alpha2=table("alpha2"),
                   alpha2_pv=table("alpha2_pv"), resid_ms=table("resid_ms"), calibration=state["calibration"])
