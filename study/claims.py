"""The config's claims judged on the records: each claim per (dataset, scenario) cell, then over its cells.

Per cell, on the final errors of the primary split, for each of the claim's quantities:
  lower          method - against (paired over seeds, 95 % t-interval) below 0: held; above 0: did not hold;
  lowest         method - every other method below 0; any of them above 0: did not hold;
  non_inferior   method - against below threshold x against's mean error: held; its lower end above: did
                 not hold;
  less_variable  F-interval of var(against) / var(method) over seeds above threshold: held; below: did not hold;
  reaches        method's mean curve reaches against's final mean error with <= threshold x against's
                 labels and method - against below 0: held; otherwise did not hold;
  labels         the labels method needs to reach against's final mean error, reported without a verdict;
  resolves       the cell's best rail (rails.py) − against below 0: held (the cell has resolving power);
  closes_gap     method's gap closure (against − method) / (against − best rail), Fieller 95 % interval, above
                 threshold: held; below it: did not hold; a cell without resolving power is left out (and said).
Otherwise "not resolved". With `cheaper`, method's fresh acquisition seconds per round must be lower too. Over the cells with records of both methods: "did not hold" when more cells did
not hold than (cells - needed) allows, "held" when `needed` cells held (default: every cell), else
"not resolved"; "not tested" without such cells.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .fmt import ci, msd, num, pct
from .methods import ORACLES
from .rails import gap_closure, resolving
from .records import Records
from .stats import mean_sd, resolved, variance_ratio

LABELS = {"e_mae": "E MAE", "f_mae": "F MAE", "e_rmse": "E RMSE", "f_rmse": "F RMSE"}
UNITS = {"e": "meV/atom", "f": "meV/Å"}
CHEAP = (("pick_pool_error_ratio_e", "picks / pool pretrained E error"),
         ("pick_pool_error_ratio_f", "picks / pool pretrained F error"),
         ("picks_target_share", "target share of picks"),
         ("spearman_score_error_e", "Spearman(score, E error)"),
         ("spearman_score_error_f", "Spearman(score, F error)"))
_SIGN = {-1: "held", 1: "did not hold", None: "not resolved"}


@dataclass
class Claim:
    """One statement the study tests (a `claims:` entry of the config): `method` against `against` on the
    primary split of the cells it names, judged per cell by `test` (this module's docstring says how)."""

    id: str
    text: str                           # the statement, as the report prints it
    test: str                           # a key of TESTS (below)
    method: str = "random"              # (resolves: unused; the rails are compared with `against`)
    against: str = "random"             # the method compared with ("lowest": every other method)
    scenarios: Optional[List[str]] = None   # None: every scenario
    datasets: Optional[List[str]] = None    # None: every dataset
    quantities: List[str] = field(default_factory=lambda: ["f_mae"])
    threshold: Optional[float] = None   # non_inferior: margin as a share of `against`'s error; less_variable:
                                        # the variance ratio to exceed; reaches: the largest share of labels
    cheaper: bool = False               # also fewer fresh acquisition seconds per round than `against`
    needed: Optional[int] = None        # cells that must hold (None: every cell with records)
    rails: Optional[List[str]] = None   # resolves / closes_gap: the oracles (None: the study's `rails`)


@dataclass
class Verdict:
    """A claim's state over its cells ("held", "did not hold", "not resolved", "not tested"; None for a
    test without a verdict), one text per cell, and explanatory lines where it did not hold."""

    state: Optional[str]
    cells: List[str]
    notes: List[str] = field(default_factory=list)


def _overall(states: List[str]) -> str:
    if "did not hold" in states:
        return "did not hold"
    return "held" if all(s == "held" for s in states) else "not resolved"


def _final(rec: Records, method: str, key: str) -> List[float]:
    return list(rec.final(method, rec.primary, key).values())


def _lower(c: Claim, rec: Records, q: str):
    d = rec.difference(c.method, c.against, q)
    return _SIGN[resolved(d)], f"{LABELS[q]}: {c.method} − {c.against} = {ci(d)}"


def _lowest(c: Claim, rec: Records, q: str):
    worse, unresolved = [], []
    for m in (m for m in rec.methods if m != c.method):
        d = rec.difference(c.method, m, q)
        r = resolved(d)
        if r == 1:
            worse.append(f"{m} ({c.method} − {m} = {ci(d)})")
        elif r is None:
            unresolved.append(m)
    if worse:
        return "did not hold", f"{LABELS[q]}: significantly lower error than {c.method}: " + "; ".join(worse)
    if unresolved:
        return "not resolved", f"{LABELS[q]}: interval includes 0 against " + ", ".join(unresolved)
    return "held", f"{LABELS[q]}: {c.method}'s paired difference to every other method is below 0"


def _non_inferior(c: Claim, rec: Records, q: str):
    d = rec.difference(c.method, c.against, q)
    margin = c.threshold * rec.final_mean(c.against, q)
    return _SIGN[resolved(d, at=margin)], f"{LABELS[q]}: {c.method} − {c.against} = {ci(d)} (margin {num(margin)})"


def _less_variable(c: Claim, rec: Records, q: str):
    vr = variance_ratio(_final(rec, c.against, q), _final(rec, c.method, q))
    state = "held" if vr["lo"] > c.threshold else ("did not hold" if vr["hi"] < c.threshold else "not resolved")
    return state, (f"var({c.against})/var({c.method}) of the final {LABELS[q]} = {num(vr['ratio'], 2)} "
                   f"[{num(vr['lo'], 2)}, {num(vr['hi'], 2)}]")


def _reaches(c: Claim, rec: Records, q: str):
    if not rec.has_curve(c.method, c.against):
        return "not resolved", f"{LABELS[q]}: {c.method} has no learning curve here (fine-tuned after the last round only)"
    _, ratio, _ = rec.reach(c.method, q, c.against)
    d = rec.difference(c.method, c.against, q)
    met = ratio is not None and ratio <= c.threshold and resolved(d) == -1
    return ("held" if met else "did not hold"), (
        f"{LABELS[q]}: labels ratio {'not reached' if ratio is None else f'{100 * ratio:.0f} %'}, "
        f"{c.method} − {c.against} = {ci(d)} → {'met' if met else 'not met'}")


def _labels(c: Claim, rec: Records, q: str):
    _, ratio, _ = rec.reach(c.method, q, c.against)
    return None, f"{LABELS[q]} " + ("not reached" if ratio is None else
                                    f"{100 * ratio:.0f} % of {c.against}'s labels ({100 * (ratio - 1):+.0f} %)")


NO_POWER = "no resolving power"


def _resolves(c: Claim, rec: Records, q: str):
    got = resolving(rec, c.rails or ORACLES, q, c.against)
    if got["resolves"] is None:
        return "not resolved", f"{LABELS[q]}: no records of the rails and {c.against}"
    return ("held" if got["resolves"] else NO_POWER), f"{LABELS[q]}: {got['rail']} − {c.against} = {ci(got['difference'])}"


def _closes_gap(c: Claim, rec: Records, q: str):
    got = resolving(rec, c.rails or ORACLES, q, c.against)
    if not got["resolves"]:
        return NO_POWER, (f"{LABELS[q]}: no resolving power (best rail {got['rail']} − {c.against} = "
                          f"{ci(got['difference'])})")
    g = gap_closure(rec, c.method, got["rail"], q, c.against)
    lo, hi = g["lo"], g["hi"]
    state = ("held" if lo >= c.threshold else "did not hold" if hi < c.threshold else "not resolved") \
        if math.isfinite(lo) else "not resolved"
    return state, (f"{LABELS[q]}: gap closure against {got['rail']} {pct(g['ratio'])} "
                   f"[{pct(lo)}, {pct(hi)}] (threshold {100 * c.threshold:g} %)")


def _cheaper(c: Claim, rec: Records):
    fresh, reuse = rec.acquisition(c.method)
    fresh_ref, _ = rec.acquisition(c.against)
    return ("held" if mean_sd(fresh)["mean"] < mean_sd(fresh_ref)["mean"] else "did not hold"), (
        f"acquisition per round: {c.method} {msd(fresh)} s fresh ({msd(reuse)} s with pool features reused) "
        f"vs {c.against} {msd(fresh_ref)} s")


def _cell(c: Claim, rec: Records):
    """(state, texts) of the claim on one cell: every quantity's test, and the cost when `cheaper`; a
    closes_gap cell where no quantity has resolving power is NO_POWER (left out of the count)."""
    got = [TESTS[c.test](c, rec, q) for q in c.quantities] + ([_cheaper(c, rec)] if c.cheaper else [])
    states = [s for s, _ in got]
    if c.test == "closes_gap":
        states = [s for s in states if s != NO_POWER] or [NO_POWER]
        return (NO_POWER if states == [NO_POWER] else _overall(states)), [t for _, t in got]
    if c.test == "resolves":
        return ("held" if "held" in states else NO_POWER if NO_POWER in states else "not resolved"), [t for _, t in got]
    return (None if c.test == "labels" else _overall(states)), [t for _, t in got]


TESTS = {"lower": _lower, "lowest": _lowest, "non_inferior": _non_inferior, "less_variable": _less_variable,
         "reaches": _reaches, "labels": _labels, "resolves": _resolves, "closes_gap": _closes_gap}


def describe(c: Claim) -> str:
    """How the claim is judged, from its fields (for the report)."""
    m, a, t = f"`{c.method}`", f"`{c.against}`", c.threshold
    how = {"lower": lambda: f"the paired difference {m} − {a} below 0",
           "lowest": lambda: f"the paired difference of {m} to every other method below 0",
           "non_inferior": lambda: f"the interval of {m} − {a} below {100 * t:g} % of {a}'s mean error",
           "less_variable": lambda: f"the F-interval of var({a}) / var({m}) of the final error over seeds above {t:g}",
           "reaches": lambda: f"{a}'s final mean error reached with ≤ {100 * t:g} % of {a}'s labels, "
                              f"and {m} − {a} below 0",
           "labels": lambda: f"labels {m} needs to reach {a}'s final mean error",
           "resolves": lambda: f"the best rail ({', '.join(c.rails or ORACLES)}) − {a} below 0",
           "closes_gap": lambda: f"the Fieller 95 % interval of {m}'s gap closure ({a} − {m}) / ({a} − best rail) "
                                 f"above {100 * t:g} %, on the cells with resolving power"}[c.test]()
    where = (f"{' and '.join(c.scenarios) + ' pools' if c.scenarios else 'every pool'} of "
             f"{', '.join(c.datasets) if c.datasets else 'every dataset'}")
    need = "" if c.test == "labels" else (f"; at least {c.needed} cells" if c.needed else "; every cell")
    how += ", and fewer fresh acquisition seconds per round" if c.cheaper else ""
    return f"{how}; {', '.join(LABELS[q] for q in c.quantities)}; {where}{need}"


def judge(c: Claim, recs: Dict[tuple, Records]) -> Verdict:
    """The claim on every (dataset, scenario) cell it names that has records of its methods."""
    cells = [(d, s, rec) for (d, s), rec in recs.items()
             if rec and (c.datasets is None or d in c.datasets) and (c.scenarios is None or s in c.scenarios)
             and c.method in rec.by_method and (c.test == "lowest" or c.against in rec.by_method)]
    if not cells:
        return Verdict(None if c.test == "labels" else "not tested",
                       [f"no records of `{c.method}` and `{c.against}` in the cells it names"])
    judged = [(d, s, rec, *_cell(c, rec)) for d, s, rec in cells]
    texts = [f"{d}/{s}: " + "; ".join(parts) for d, s, _, _, parts in judged]
    if c.test == "labels":
        return Verdict(None, texts)
    states = [state for _, _, _, state, _ in judged]
    if c.test == "closes_gap":      # judged only where the scenario can answer
        states = [st for st in states if st != NO_POWER]
        if not states:
            return Verdict("not tested", texts + ["no cell has resolving power"])
    if c.test == "resolves":        # a cell without power does not fail the claim unless too few have it
        held = states.count("held")
        need = min(c.needed or len(states), len(states))
        return Verdict("held" if held >= need else "did not hold",
                       [f"resolving power on {held} of {len(states)} cells: " + texts[0]] + texts[1:])
    need = min(c.needed or len(states), len(states))
    failed, held = states.count("did not hold"), states.count("held")
    state = "did not hold" if failed > len(states) - need else ("held" if held >= need else "not resolved")
    texts[0] = f"held on {held} of {len(states)} cells: " + texts[0] if len(states) > 1 else texts[0]
    notes = [] if state == "held" or c.test != "reaches" else \
        [best_method(c, rec, d, s) for d, s, rec, cell_state, _ in judged if cell_state != "held"]
    return Verdict(state, texts, notes)


def best_method(c: Claim, rec: Records, dataset: str, scenario: str) -> str:
    """Where `c.method` fell short: the method with the lowest mean final error (the claim's first
    quantity) and the cheap metrics of both, i.e. what the picks looked like."""
    q = c.quantities[0]
    means = {m: rec.final_mean(m, q) for m in rec.methods}
    means = {m: v for m, v in means.items() if math.isfinite(v)}
    if not means:
        return f"- {dataset}/{scenario}: no final errors."
    top = min(means, key=means.get)
    delta = "" if top == c.against else f", {top} − {c.against} {ci(rec.difference(top, c.against, q))}"

    def cheap(m):
        return ", ".join(f"{label} {msd(rec.cheap(m, k), 2)}" for k, label in CHEAP if rec.cheap(m, k)) or "–"
    return (f"- {dataset}/{scenario}: lowest mean final {LABELS[q]}: `{top}` ({means[top]:.1f} {UNITS[q[0]]}{delta}); "
            f"its cheap metrics: {cheap(top)}; `{c.method}`'s: {cheap(c.method)}.")
