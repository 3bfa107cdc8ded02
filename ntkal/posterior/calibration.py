"""Calibration of the predicted errors (docs/design.md, "Calibration"), numpy float64, fitted on cross-fitted
held-out labelled structures.

Two maps per level, both robust to outliers and to the residuals' shape:
- a line in log space, log(real RMS error) ≈ a + b·log(raw predicted RMS error), fitted by least absolute
  deviations: the calibrated error exp(a)·raw^b is the conditional median of the real RMS error, so a
  prediction of 800 means that half the structures predicted at 800 are worse than 800 and half better, at
  every size (the slope b lets the errors of well-known and unknown regions spread as the real ones do);
- the distribution of |t|, t = a residual component ÷ its structure's calibrated error, as quantiles: the
  central p interval of a component is ±σ·Q(p), and F(|t|) is its probability integral transform. With
  enough components the table is kept for the lower and upper half of σ as well, and F(|t|) blends the two by
  log σ: the labelled set's and a pretraining sample's residuals differ in shape, not only in size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

LEVELS = ("energy", "force", "atom_force")  # per structure, per structure (force components), per atom
P_GRID = np.concatenate([np.linspace(0.0, 0.98, 50), [0.99, 0.995, 0.999, 1.0]])
MIN_FOR_SLOPE = 8  # fewer structures than this: a scale only (slope 1)
MIN_PER_HALF = 100  # components per half of σ below which one |t| table serves every σ
SLOPE_RANGE = (0.25, 4.0)
RAW_Q = np.array([0.0, 0.1, 0.5, 0.9, 1.0])
ZERO = 1e-6  # real errors below this (eV/atom, eV/Å) are zero by symmetry (forces of a symmetric cell): no ratio


def lad_line(x: np.ndarray, y: np.ndarray, w: Optional[np.ndarray] = None, iters: int = 100):
    """(a, b) minimising Σ w|y − a − b x| (iteratively reweighted least squares); a scale only (b = 1) for
    fewer than MIN_FOR_SLOPE points or no spread in x."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    w = np.ones_like(x) if w is None else np.asarray(w, dtype=np.float64)
    if len(x) < MIN_FOR_SLOPE or np.ptp(x) < 1e-9:
        return _weighted_median(y - x, w), 1.0
    A = np.stack([np.ones_like(x), x], 1)
    coef = np.linalg.lstsq(A * np.sqrt(w)[:, None], y * np.sqrt(w), rcond=None)[0]
    scale = max(float(np.median(np.abs(y - A @ coef))), 1e-6)
    for _ in range(iters):
        ww = w / np.maximum(np.abs(y - A @ coef), 1e-3 * scale)
        new = np.linalg.lstsq(A * np.sqrt(ww)[:, None], y * np.sqrt(ww), rcond=None)[0]
        if np.allclose(new, coef, rtol=0, atol=1e-10):
            break
        coef = new
    b = float(np.clip(coef[1], *SLOPE_RANGE))
    return _weighted_median(y - b * x, w), b


def _weighted_median(v: np.ndarray, w: np.ndarray) -> float:
    order = np.argsort(v, kind="stable")
    cw = np.cumsum(w[order])
    return float(v[order][np.searchsorted(cw, 0.5 * cw[-1])])


def weighted_quantiles(v: np.ndarray, w: Optional[np.ndarray], probs: np.ndarray) -> np.ndarray:
    """Quantiles of v at probs, each value counted with its weight (equal weights: np.quantile's)."""
    if w is None:
        return np.quantile(v, probs)
    order = np.argsort(v, kind="stable")
    v, w = v[order], w[order]
    cum = (np.cumsum(w) - 0.5 * w) / w.sum()  # midpoints, as np.quantile's "linear" rule for equal weights
    return np.interp(probs, cum, v)


def half_normal_quantiles() -> np.ndarray:
    """Quantiles of |t| for t ~ N(0, 1): the table used when there is nothing to calibrate on."""
    p = torch.as_tensor(0.5 + np.minimum(P_GRID, 1 - 1e-9) / 2, dtype=torch.float64)
    return torch.special.ndtri(p).numpy()


@dataclass
class Calibration:
    """Per level the log-space line (a, b) and per part ("energy", "force") the quantiles of |t| at P_GRID."""

    line: Dict[str, List[float]] = field(default_factory=dict)
    abs_t: Dict[str, np.ndarray] = field(default_factory=dict)
    # per part: the |t| quantiles of the components below / above the weighted median σ, and the weighted
    # median log σ of each half (where each table holds alone)
    halves: Dict[str, dict] = field(default_factory=dict)
    n: Dict[str, int] = field(default_factory=dict)  # calibration structures (atoms for atom_force) per level
    # per level the raw predictions the line was fitted on, at RAW_Q: beyond them the line is an extrapolation
    raw_q: Dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def fit(cls, raw: Dict[str, np.ndarray], real: Dict[str, np.ndarray], t: Dict[str, tuple],
            weight: Optional[Dict[str, np.ndarray]] = None) -> "Calibration":
        """raw / real: per level the held-out raw predicted and real RMS errors (same units); t: per part
        (components at component scale, their structure's raw prediction, and optionally their weights);
        weight: per level the structures' (atoms') weights (default equal)."""
        out = cls()
        weight = weight or {}
        for level in LEVELS:
            if level not in raw:
                continue
            ok = (raw[level] > 0) & (real[level] > ZERO) & np.isfinite(raw[level]) & np.isfinite(real[level])
            if ok.sum() == 0:
                continue
            w = weight.get(level)
            out.line[level] = list(lad_line(np.log(raw[level][ok]), np.log(real[level][ok]),
                                            None if w is None else w[ok]))
            out.n[level] = int(ok.sum())
            out.raw_q[level] = np.quantile(raw[level][ok], RAW_Q)
        for part, (tt, raw_s, *w) in t.items():
            if part not in out.line or len(tt) == 0:
                continue
            sigma = out.apply(part, raw_s)
            wt = w[0] if w else np.ones_like(tt)
            out.abs_t[part] = weighted_quantiles(np.abs(tt) / sigma, w[0] if w else None, P_GRID)
            log_s = np.log(np.maximum(sigma, 1e-300))
            upper = log_s > _weighted_median(log_s, wt)
            if min(upper.sum(), (~upper).sum()) >= MIN_PER_HALF:
                out.halves[part] = {
                    "q": np.stack([weighted_quantiles(np.abs(tt[m]) / sigma[m], wt[m], P_GRID) for m in (~upper, upper)]),
                    "log_sigma": np.array([_weighted_median(log_s[m], wt[m]) for m in (~upper, upper)])}
        return out

    def apply(self, level: str, raw: np.ndarray) -> np.ndarray:
        """The calibrated error (median of the real RMS error) for raw predicted RMS errors."""
        a, b = self.line.get(level, (0.0, 1.0))
        raw = np.asarray(raw, dtype=np.float64)
        return np.exp(a) * np.power(np.maximum(raw, 0.0), b)

    def pit(self, part: str, t: np.ndarray, sigma: Optional[np.ndarray] = None) -> np.ndarray:
        """F(|t|): the smallest central interval level that holds a component with |t| = |residual| / σ;
        given each component's σ, the two halves' F blended by log σ (a mixture: still a distribution)."""
        def cdf(q):
            return np.interp(np.abs(t), np.maximum.accumulate(q), P_GRID, left=0.0, right=1.0)  # ties at the ends
        halves = self.halves.get(part)
        if halves is None or sigma is None:
            q = self.abs_t.get(part)
            return cdf(half_normal_quantiles() if q is None else q)
        lo, hi = halves["log_sigma"]
        w = np.clip((np.log(np.maximum(sigma, 1e-300)) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
        return (1 - w) * cdf(halves["q"][0]) + w * cdf(halves["q"][1])

    # --- plain state ------------------------------------------------------------------------------
    def to_state(self) -> dict:
        return {"line": {k: [float(v) for v in ab] for k, ab in self.line.items()},
                "abs_t": {k: np.asarray(v, dtype=np.float64) for k, v in self.abs_t.items()},
                "halves": {k: {n: np.asarray(a, dtype=np.float64) for n, a in h.items()} for k, h in self.halves.items()},
                "n": dict(self.n), "raw_q": {k: np.asarray(v, dtype=np.float64) for k, v in self.raw_q.items()}}

    @classmethod
    def from_state(cls, state: Optional[dict]) -> "Calibration":
        if not state:
            return cls()
        return cls(line={str(k): [float(v) for v in ab] for k, ab in state["line"].items()},
                   abs_t={str(k): np.asarray(v, dtype=np.float64) for k, v in state["abs_t"].items()},
                   halves={str(k): {n: np.asarray(a, dtype=np.float64) for n, a in h.items()}
                           for k, h in state.get("halves", {}).items()},
                   n={str(k): int(v) for k, v in state["n"].items()},
                   # states saved before raw_q was kept have none
                   raw_q={str(k): np.asarray(v, dtype=np.float64) for k, v in state.get("raw_q", {}).items()})
