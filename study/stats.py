"""What scipy lacks for the study's comparisons: paired differences over seeds with Student-t intervals,
their sign, the variance-ratio interval, and labels-to-reach along a learning curve.

Seeds are the replicates: seed s of every method shares the initial labelled set, the pool draw and the
fine-tune seed, so a method is compared with another by the per-seed differences d_s and a Student-t
interval over seeds (n - 1 degrees of freedom). With 3 seeds t_0.975 = 4.30: only large, consistent
gaps resolve, which is what the verdicts say.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np
from scipy import stats


def _clean(values) -> np.ndarray:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    return v[np.isfinite(v)]


def mean_sd(values) -> Dict[str, float]:
    """{"mean", "sd" (n - 1 denominator; 0 for one value), "n"} of the finite values; NaNs when there is none."""
    v = _clean(values)
    if len(v) == 0:
        return {"mean": math.nan, "sd": math.nan, "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def t_interval(values, level: float = 0.95) -> Dict[str, float]:
    """mean_sd and the mean's two-sided Student-t interval {"lo", "hi"} (NaN for fewer than two values)."""
    out = mean_sd(values)
    if out["n"] < 2:
        return {**out, "lo": math.nan, "hi": math.nan}
    lo, hi = stats.t.interval(level, out["n"] - 1, loc=out["mean"], scale=out["sd"] / math.sqrt(out["n"]))
    return {**out, "lo": float(lo), "hi": float(hi)}


def paired_difference(a: Dict[int, float], b: Dict[int, float], level: float = 0.95) -> Dict[str, float]:
    """t_interval of a[s] - b[s] over the seeds s both have (dicts seed -> value)."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds if a[s] is not None and b[s] is not None]
    return {**t_interval(d, level), "seeds": seeds}


def resolved(interval: Dict[str, float], at: float = 0.0) -> Optional[int]:
    """-1 if the interval lies below `at`, +1 above it, None if it includes `at` (or is undefined)."""
    lo, hi = interval.get("lo", math.nan), interval.get("hi", math.nan)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return -1 if hi < at else (1 if lo > at else None)


def variance_ratio(a, b, level: float = 0.95) -> Dict[str, float]:
    """var(a) / var(b) over seeds and its F interval (independent normal samples): {"ratio", "lo", "hi"}."""
    a, b = _clean(a), _clean(b)
    vb = float(b.var(ddof=1)) if len(b) > 1 else 0.0
    if len(a) < 2 or vb == 0:
        return {"ratio": math.nan, "lo": math.nan, "hi": math.nan}
    r, d1, d2 = float(a.var(ddof=1)) / vb, len(a) - 1, len(b) - 1
    return {"ratio": r, "lo": r / float(stats.f.ppf(0.5 + level / 2, d1, d2)),
            "hi": r / float(stats.f.ppf(0.5 - level / 2, d1, d2))}


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
