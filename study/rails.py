"""Rails: what a scenario can resolve, and how much of the random-to-oracle gap a method closes.

A scenario *has resolving power* for a quantity when its best rail (the oracle with the lowest mean final
error) beats random with a paired 95 % t-interval below 0. A method's *gap closure* is
(random − method) / (random − best rail) of the final errors, the ratio of two paired mean differences;
its interval is Fieller's (exact for normal per-seed differences, unbounded when the gap itself is not
resolved), so a closure is never quoted from a scenario whose gap is noise.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np
from scipy import stats

from .records import Records
from .stats import resolved


def best_rail(rec: Records, rails: Sequence[str], key: str) -> Optional[str]:
    """The rail with records and the lowest mean final error on the primary split (None without any)."""
    means = {r: rec.final_mean(r, key) for r in rails if r in rec.by_method}
    means = {r: m for r, m in means.items() if math.isfinite(m)}
    return min(means, key=means.get) if means else None


def resolving(rec: Records, rails: Sequence[str], key: str, against: str = "random") -> dict:
    """{"rail", "difference" (rail − random interval), "resolves" (True / False / None without records)}."""
    rail = best_rail(rec, rails, key)
    if rail is None or against not in rec.by_method:
        return {"rail": rail, "difference": {}, "resolves": None}
    d = rec.difference(rail, against, key)
    return {"rail": rail, "difference": d, "resolves": resolved(d) == -1}


def fieller(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Dict[str, float]:
    """mean(a) / mean(b) for paired samples and its Fieller interval {"ratio", "lo", "hi", "n"}; lo/hi are NaN
    when mean(b) is not resolved from 0 at `level` (the interval is then unbounded)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = len(a)
    if n != len(b) or n < 2:
        return {"ratio": math.nan, "lo": math.nan, "hi": math.nan, "n": n}
    ma, mb = a.mean(), b.mean()
    ratio = ma / mb if mb != 0 else math.nan
    cov = np.cov(np.vstack([a, b]), ddof=1) / n
    t2 = float(stats.t.ppf(0.5 + level / 2, n - 1)) ** 2
    qa = mb * mb - t2 * cov[1, 1]
    qb = ma * mb - t2 * cov[0, 1]
    qc = ma * ma - t2 * cov[0, 0]
    disc = qb * qb - qa * qc
    if qa <= 0 or disc < 0:
        return {"ratio": float(ratio), "lo": math.nan, "hi": math.nan, "n": n}
    root = math.sqrt(disc)
    return {"ratio": float(ratio), "lo": float((qb - root) / qa), "hi": float((qb + root) / qa), "n": n}


def gap_closure(rec: Records, method: str, rail: str, key: str, against: str = "random") -> Dict[str, float]:
    """(against − method) / (against − rail) of the final errors, paired over the seeds all three have."""
    fa, fm, fr = (rec.final(m, rec.primary, key) for m in (against, method, rail))
    seeds = sorted(set(fa) & set(fm) & set(fr))
    out = fieller([fa[s] - fm[s] for s in seeds], [fa[s] - fr[s] for s in seeds])
    return {**out, "seeds": seeds}
