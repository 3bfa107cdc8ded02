"""One round's picks for every method, with the acquisition time it costs.

Methods: "random"; "embedding" / "energy" / "force" / "joint" (PV shortlist + LCMD, ntkal's
`select_rows` on the pretrained model's cached rows); "top" (top-PV of `selection.top_kernel`, no
LCMD: the ablation); "committee" (committee.py); "<kernel>+target" (shortlist ranked by the expected
reduction of the target set's predictive variance, then greedy variance reduction on exact rows,
as `ntkal select --target` does).

Acquisition seconds = what a fresh selection call would spend at that round beyond the fine-tune every
method does anyway: for feature methods, featurising the labelled set (exact rows), the pool (probe
rows) and any target / greedy-candidate structures (recorded per structure in the FeatureStore) plus
posterior, scoring and selection; for the committee, fine-tuning its extra members plus every member's
predictions on the labelled set and the pool plus LCMD.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..posterior import Posterior
from ..select import select_rows
from .config import SelectionConfig
from .features import FeatureStore


@dataclass
class Picks:
    positions: np.ndarray                # into the available pool, in pick order
    seconds: float                       # acquisition time charged to this round
    detail: dict = field(default_factory=dict)


def parse_method(method: str):
    """(base, kernel, with_target): 'joint+target' -> ('joint', 'joint', True); 'top' -> ('top', None, False)."""
    with_target = method.endswith("+target")
    base = method[: -len("+target")] if with_target else method
    kernel = base if base in ("embedding", "energy", "force", "joint") else None
    return base, kernel, with_target


def random_picks(n_available: int, budget: int, seed: int, round_index: int, key: str) -> Picks:
    t0 = time.perf_counter()
    rng = np.random.default_rng([int(seed), int(round_index), zlib.crc32(key.encode())])
    pos = rng.choice(n_available, size=budget, replace=False)
    return Picks(np.asarray(pos, dtype=np.int64), time.perf_counter() - t0, {})


def feature_picks(store: FeatureStore, kernel: str, method: str, labelled: Sequence, pool: Sequence,
                  budget: int, sel: SelectionConfig, seed: int) -> Picks:
    """PV shortlist + LCMD ('lcmd') or top-PV ('top') with one kernel of the pretrained model."""
    train_rows, t_train = store.rows(kernel, labelled, exact=True)
    pool_rows, t_pool = store.rows(kernel, pool, exact=False)
    res = select_rows(train_rows, pool_rows, budget, method=method, shortlist=sel.shortlist,
                      sigma_e2=sel.sigma_e2, sigma_f2=sel.sigma_f2, mode=sel.mode, seed=seed)
    detail = {"kernel": kernel, "method": method, "features_labelled_s": t_train, "features_pool_s": t_pool,
              "select_s": res.timings["total"], "status": res.status, "shortlist_size": int(len(res.shortlist)),
              "scores": [float(s) for s in res.scores]}
    return Picks(np.asarray(res.indices, dtype=np.int64), t_train + t_pool + res.timings["total"], detail)


def target_picks(store: FeatureStore, kernel: str, labelled: Sequence, pool: Sequence, target: Sequence,
                 budget: int, sel: SelectionConfig) -> Picks:
    """Greedy expected reduction of the target set's predictive variance (exact rows for the candidates)."""
    from ..target import TargetScorer, greedy_select, target_matrix
    train_rows, t_train = store.rows(kernel, labelled, exact=True)
    pool_rows, t_pool = store.rows(kernel, pool, exact=False)
    target_rows, t_target = store.rows(kernel, target, exact=True)
    t0 = time.perf_counter()
    post = Posterior.from_rows(train_rows, sel.sigma_e2, sel.sigma_f2)
    scorer = TargetScorer(post, target_matrix(post, target_rows))
    red = scorer.reduction(pool_rows).numpy()
    m = min(max(sel.target_shortlist, budget), len(pool))
    order = np.lexsort((np.arange(len(pool)), -red))[:m]
    t_rank = time.perf_counter() - t0
    cand_rows, t_cand = store.rows(kernel, [pool[i] for i in order], exact=True)
    t0 = time.perf_counter()
    picks, reds = greedy_select(post, scorer.C_T, cand_rows, budget)
    t_greedy = time.perf_counter() - t0
    before = scorer.target_variance()
    detail = {"kernel": kernel, "method": "greedy+target", "features_labelled_s": t_train, "features_pool_s": t_pool,
              "features_target_s": t_target, "features_candidates_exact_s": t_cand,
              "select_s": t_rank + t_greedy, "shortlist_size": int(m), "target_variance_before": float(before),
              "target_variance_after": float(before - reds.sum()), "reductions": [float(r) for r in reds]}
    seconds = t_train + t_pool + t_target + t_cand + t_rank + t_greedy
    return Picks(np.asarray(order[picks], dtype=np.int64), seconds, detail)
