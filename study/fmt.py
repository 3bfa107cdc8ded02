"""Numbers as the report and the verdicts print them: "–" for what is missing, mean ± sd, mean [interval]."""
from __future__ import annotations

import math

from .stats import mean_sd, resolved


def num(x, digits=1) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def pct(x) -> str:
    """A share as "86 %" ("–" when missing or not finite)."""
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.0f} %"


def msd(values, digits=1) -> str:
    """mean ± sd over the values (the mean alone for one value)."""
    s = mean_sd(values)
    if s["n"] == 0:
        return "–"
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}" if s["n"] > 1 else f"{s['mean']:.{digits}f}"


def ci(d: dict, digits=1) -> str:
    """A paired difference as "mean [lo, hi]" (the mean and n when there is no interval)."""
    if d.get("n", 0) == 0:
        return "–"
    if not math.isfinite(d.get("lo", math.nan)):
        return f"{d['mean']:+.{digits}f} (n = {d['n']})"
    return f"{d['mean']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]"


def side(d: dict) -> str:
    return {-1: "lower", 1: "higher", None: "not resolved"}[resolved(d)]
