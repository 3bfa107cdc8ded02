"""The study's statistics: mean ± sd, paired differences with t-intervals, labels-to-reach, Spearman.

Seeds are the replicates: seed s of every method shares the initial labelled set, the pool draw and the
fine-tune seed, so a method is compared with random by the per-seed differences d_s and a Student-t
interval over seeds (n - 1 degrees of freedom). With 3 seeds t_0.975 = 4.30: only large, consistent
gaps resolve, which is what the verdicts say.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np


def _clean(values) -> np.ndarray:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    return v[np.isfinite(v)]


def mean_sd(values) -> Dict[str, float]:
    """{"mean", "sd" (n - 1 denominator; 0 for one value), "n"}; NaNs when there is no value."""
    v = _clean(values)
    if len(v) == 0:
        return {"mean": math.nan, "sd": math.nan, "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def t_interval(values, level: float = 0.95) -> Dict[str, float]:
    """Mean and its two-sided Student-t interval over the values: {"mean", "lo", "hi", "sd", "n"}
    (lo = hi = NaN for fewer than two values)."""
    from scipy.stats import t
    out = mean_sd(values)
    n = out["n"]
    if n < 2:
        return {**out, "lo": math.nan, "hi": math.nan}
    half = float(t.ppf(0.5 + level / 2, n - 1)) * out["sd"] / math.sqrt(n)
    return {**out, "lo": out["mean"] - half, "hi": out["mean"] + half}


def paired_difference(a: Dict[int, float], b: Dict[int, float], level: float = 0.95) -> Dict[str, float]:
    """t_interval of a[s] - b[s] over the seeds s both have (dicts seed -> value)."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds if a[s] is not None and b[s] is not None]
    return {**t_interval(d, level), "seeds": seeds}


def resolved(interval: Dict[str, float]) -> Optional[int]:
    """-1 if the interval lies below 0, +1 above 0, None if it includes 0 (or is undefined)."""
    lo, hi = interval.get("lo", math.nan), interval.get("hi", math.nan)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    if hi < 0:
        return -1
    if lo > 0:
        return 1
    return None


def labels_to_reach(n_labels: Sequence[float], errors: Sequence[float], threshold: float) -> Optional[float]:
    """Labels at which the learning curve first reaches `threshold` (linear interpolation between the
    rounds that bracket the crossing); None when it never does."""
    ns = np.asarray(n_labels, dtype=np.float64)
    es = np.asarray(errors, dtype=np.float64)
    order = np.argsort(ns, kind="stable")
    ns, es = ns[order], es[order]
    for i, (n, e) in enumerate(zip(ns, es)):
        if not math.isfinite(e):
            continue
        if e <= threshold:
            if i == 0 or not math.isfinite(es[i - 1]):
                return float(n)
            n0, e0 = ns[i - 1], es[i - 1]
            return float(n0 + (n - n0) * (e0 - threshold) / (e0 - e)) if e0 != e else float(n)
    return None


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    from scipy.stats import rankdata
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("spearman needs two 1-d arrays of equal length")
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 2:
        return math.nan
    rx, ry = rankdata(x[keep]), rankdata(y[keep])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else math.nan


def variance_ratio(a, b, level: float = 0.95) -> Dict[str, float]:
    """var(a) / var(b) over seeds and its F interval (independent normal samples): {"ratio", "lo", "hi"}."""
    from scipy.stats import f
    a, b = _clean(a), _clean(b)
    if len(a) < 2 or len(b) < 2:
        return {"ratio": math.nan, "lo": math.nan, "hi": math.nan}
    va, vb = float(a.var(ddof=1)), float(b.var(ddof=1))
    if vb == 0:
        return {"ratio": math.nan, "lo": math.nan, "hi": math.nan}
    r = va / vb
    d1, d2 = len(a) - 1, len(b) - 1
    return {"ratio": r, "lo": r / float(f.ppf(0.5 + level / 2, d1, d2)), "hi": r / float(f.ppf(0.5 - level / 2, d1, d2))}
