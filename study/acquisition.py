"""One round's picks for every method (study/methods.py names them), with the acquisition time it costs.

Feature methods go through ntkal's own row-level selection (`ntkal.select_rows`) on the pretrained
model's cached rows (features.py); the committee is committee.py's.

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

from ntkal import select_rows

from .config import SelectionConfig
from .features import FeatureStore


@dataclass
class Picks:
    """One round's picks of one method and what they cost."""

    positions: np.ndarray                # into the available pool, in pick order
    seconds: float                       # acquisition time charged to this round
    detail: dict = field(default_factory=dict)


def random_picks(n_available: int, budget: int, seed: int, round_index: int, key: str) -> Picks:
    """`budget` uniform draws without replacement, seeded by (seed, round, method key)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng([int(seed), int(round_index), zlib.crc32(key.encode())])
    pos = rng.choice(n_available, size=budget, replace=False)
    return Picks(np.asarray(pos, dtype=np.int64), time.perf_counter() - t0, {})


def _collect(keys: list):
    """on_chunk callback keeping every pool structure's key (for Spearman(score, error) over the pool)."""
    return lambda c, start, atoms, scored: keys.append(scored.key)


def feature_picks(store: FeatureStore, kernel: str, method: str, labelled: Sequence, pool: Sequence,
                  budget: int, sel: SelectionConfig, seed: int, score: str = "pv", pretrain: Sequence = (),
                  shortlist=None, scorer=None, pool_rows: Optional[str] = None) -> Picks:
    """PV (or error-aware, score="error") shortlist + LCMD ('lcmd') or the top of the shortlist ('top') with
    one kernel of the pretrained model; `pretrain`: a pretraining sample entering the posterior; `pool_rows`:
    None (pool and pretraining-sample force rows as `selection.force_probes`), "exact" or "probes"
    (`selection.probe_variant` probes)."""
    exact, probes = pool_rows == "exact", pool_rows == "probes"
    # labelled rows: exact (as shipped), or the pool's kind when selection.labelled_force_rows is "pool"
    lab = {"exact": True} if exact or sel.labelled_force_rows == "exact" else {"exact": False, "probes": probes}
    kw, t_extra = {}, 0.0
    if score == "error":
        train_rows, kw["train_residuals"], t_train = store.residuals(kernel, labelled, **lab)
    else:
        train_rows, t_train = store.rows(kernel, labelled, **lab)
    if len(pretrain):
        kw["pretrain_rows"], kw["pretrain_residuals"], t_extra = store.residuals(kernel, pretrain, exact=exact,
                                                                                 probes=probes)
    rows, t_pool = store.rows(kernel, pool, exact=exact, probes=probes)
    keys: list = []
    res = select_rows(train_rows, rows, budget, method=method, shortlist=shortlist or sel.shortlist,
                      sigma_e2=sel.sigma_e2, sigma_f2=sel.sigma_f2, mode=sel.mode, seed=seed, on_chunk=_collect(keys),
                      score=score, scorer=scorer, **kw)
    detail = {"kernel": kernel, "method": method, "score": score, "labelled_force_rows":
              "exact" if lab["exact"] else "as the pool's", "pool_force_rows":
              f"{sel.probe_variant} probes" if probes else ("exact" if exact or sel.force_probes is None else
                                                            f"{sel.force_probes} probes"),
              "features_labelled_s": t_train,
              "features_pool_s": t_pool, "features_pretrain_s": t_extra, "select_s": res.timings["total"],
              "status": res.status, "shortlist_size": int(len(res.shortlist)),
              "scores": [float(s) for s in res.scores], "pool_scores": np.concatenate(keys).tolist()}
    if score == "error":
        detail["calibration"] = {"rho": res.posterior.residual.rho, "alpha2": res.posterior.residual.alpha2}
    return Picks(np.asarray(res.indices, dtype=np.int64), t_train + t_pool + t_extra + res.timings["total"], detail)


def target_picks(store: FeatureStore, kernel: str, labelled: Sequence, pool: Sequence, target: Sequence,
                 budget: int, sel: SelectionConfig) -> Picks:
    """Greedy expected reduction of the target set's predictive variance (exact rows for the candidates)."""
    train_rows, t_train = store.rows(kernel, labelled, exact=True)
    pool_rows, t_pool = store.rows(kernel, pool, exact=False)
    target_rows, t_target = store.rows(kernel, target, exact=True)
    cand_s, cand_wall = [], []

    def exact_rows(idx):
        t0 = time.perf_counter()
        rows, s = store.rows(kernel, [pool[i] for i in idx], exact=True)
        cand_s.append(s)  # what a fresh featurisation costs (the store may have them cached)
        cand_wall.append(time.perf_counter() - t0)
        return rows
    keys: list = []
    res = select_rows(train_rows, pool_rows, budget, method="greedy", shortlist=min(max(sel.target_shortlist, budget),
                      len(pool)), sigma_e2=sel.sigma_e2, sigma_f2=sel.sigma_f2, target_rows=target_rows,
                      exact_rows=exact_rows, on_chunk=_collect(keys))
    t = res.info["target"]
    select_s = res.timings["total"] - sum(cand_wall)
    detail = {"kernel": kernel, "method": "greedy+target", "features_labelled_s": t_train, "features_pool_s": t_pool,
              "features_target_s": t_target, "features_candidates_exact_s": sum(cand_s),
              "select_s": select_s, "shortlist_size": int(len(res.shortlist)),
              "target_variance_before": t["variance_before"], "target_variance_after": t["variance_after"],
              "reductions": [float(c.values["target_reduction"]) for c in res.picks],
              "pool_scores": np.concatenate(keys).tolist()}
    return Picks(np.asarray(res.indices, dtype=np.int64), t_train + t_pool + t_target + sum(cand_s) + select_s, detail)


#: the diverse oracle's candidates: the DIVERSE_CANDIDATES x B largest real errors (docs/design.md, "The study")
DIVERSE_CANDIDATES = 3


def oracle_picks(kind: str, real_error: np.ndarray, store: FeatureStore, labelled: Sequence, pool: Sequence,
                 budget: int) -> Picks:
    """A rail that reads the pool's reference labels. "top": the `budget` largest real force errors (of the
    pretrained model every selector sees). "diverse": greedy k-centre (farthest point) on the model's
    invariant descriptors (the embedding kernel's mean node features) among the 3 x budget largest real
    errors, the labelled set as the first centres: right about the errors and spread over them, the best a
    selector that ranks by error could hope for (a top-error batch stacks one extreme kind)."""
    t0 = time.perf_counter()
    err = np.asarray(real_error, dtype=np.float64)
    if err.shape != (len(pool),):
        raise ValueError(f"oracle_picks: {err.shape} real errors for a pool of {len(pool)}")
    order = np.argsort(-err, kind="stable")
    if kind == "top":
        pos = order[:budget]
        return Picks(np.asarray(pos, dtype=np.int64), time.perf_counter() - t0,
                     {"oracle": "top", "mean_real_error_f": float(err[pos].mean())})
    if kind != "diverse":
        raise ValueError(f"unknown oracle {kind!r}")
    cand = order[:min(len(pool), DIVERSE_CANDIDATES * budget)]
    x = store.rows("embedding", [pool[i] for i in cand])[0].rows.double().numpy()
    centres = store.rows("embedding", list(labelled))[0].rows.double().numpy() if len(labelled) else x[:0]
    d = (np.min(((x[:, None, :] - centres[None, :, :]) ** 2).sum(-1), axis=1) if len(centres)
         else np.full(len(cand), np.inf))
    picked = []
    for _ in range(min(budget, len(cand))):
        # ties (no centre yet) go to the larger real error: `cand` is in descending error order
        j = int(np.argmax(np.where(np.isin(np.arange(len(cand)), picked), -np.inf, d)))
        picked.append(j)
        d = np.minimum(d, ((x - x[j]) ** 2).sum(-1))
    pos = cand[picked]
    return Picks(np.asarray(pos, dtype=np.int64), time.perf_counter() - t0,
                 {"oracle": "diverse", "candidates": int(len(cand)), "mean_real_error_f": float(err[pos].mean())})
