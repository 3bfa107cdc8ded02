"""Probe-count study: how many Rademacher force probes keep the exact force-NTK ranking of the pool.

For m in (1, 2, 4, 8, 16): the Spearman correlation of probe-mode force scores with exact-mode force
scores over the shipped demo pool (one posterior, fitted on exact rows), the overlap of the top-B
sets, and the featurisation cost per structure relative to exact mode, in one run on one machine.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def run(pool_size: int = 600, sketch_dim: int = 512, budget: int = 20, probes=(1, 2, 4, 8, 16), seed: int = 0):
    import ase.io
    from scipy.stats import spearmanr

    import ntkal
    from ntkal.data import demo_files
    from ntkal.io import iter_chunks

    files = demo_files()
    train = ase.io.read(files["train"], ":")
    pool = ase.io.read(files["pool"], f":{pool_size}")
    fz = ntkal.MACEFeaturizer(str(files["model"]), kernel="force", sketch_dim=sketch_dim, seed=seed)
    post = ntkal.fit(fz, train)

    def scores(f):
        t = time.perf_counter()
        out = np.concatenate([post.score(f(c)).numpy() for c in iter_chunks(pool, 64)])
        return out, (time.perf_counter() - t) / len(pool)

    exact, t_exact = scores(fz)
    top_exact = set(np.argsort(-exact)[:budget])
    rows = [{"m": "exact", "spearman": 1.0, "top_overlap": 1.0, "s_per_structure": t_exact, "cost_vs_exact": 1.0}]
    for m in probes:
        est, t = scores(fz.with_kernel("force", force_probes=m))
        rows.append({"m": m, "spearman": float(spearmanr(est, exact).statistic),
                     "top_overlap": len(top_exact & set(np.argsort(-est)[:budget])) / budget,
                     "s_per_structure": t, "cost_vs_exact": t / t_exact})
    return {"pool_size": len(pool), "n_train": len(train), "sketch_dim": sketch_dim, "budget": budget,
            "mean_atoms": float(np.mean([len(a) for a in pool])), "rows": rows}


def labelled(pool_size: int = 600, sketch_dim: int = 512, budget: int = 20, probes=(2, 4, 8, 16), seed: int = 0):
    """Probe rows for the LABELLED set (--train-force-probes): the pool's error and PV scores (joint kernel,
    pool rows by 8 probes) against those of a posterior fitted on exact labelled rows, and the labelled
    set's featurisation time."""
    from scipy.stats import spearmanr

    from ntkal.acquisition.pipeline import Pipeline, featurizer_for
    from ntkal.acquisition.scorers import ErrorScorer, PVScorer
    from ntkal.data import demo_files
    from ntkal.io import read_structures
    from ntkal.options import Options
    files = demo_files()
    train, pool = list(read_structures(files["train"])), list(read_structures(files["pool"]))[:pool_size]
    opts0 = Options(kernel="joint", sketch_dim=sketch_dim, force_probes=8, seed=seed, score="error").validate()
    fz = featurizer_for(files["model"], opts0)
    rows = fz(pool)
    out, ref = [], None
    for m in (None,) + tuple(probes):
        opts = Options(**{**opts0.__dict__, "train_force_probes": m}).validate()
        pipe = Pipeline(opts, fz)
        t = time.perf_counter()
        post = pipe.fit(train)
        fit_s = time.perf_counter() - t
        err, pv = ErrorScorer(post)(rows).key, PVScorer(post)(rows).key
        ref = ref or (err, pv, fit_s)
        out.append({"m": "exact" if m is None else m, "fit_s": fit_s, "fit_vs_exact": fit_s / ref[2],
                    "spearman_error": float(spearmanr(err, ref[0]).statistic),
                    "spearman_pv": float(spearmanr(pv, ref[1]).statistic),
                    "top_overlap_error": len(set(np.argsort(-err)[:budget]) & set(np.argsort(-ref[0])[:budget])) / budget,
                    "alpha2_force": post.residual.alpha2.get("force")})
    return {"pool_size": len(pool), "n_train": len(train), "mean_atoms_train": float(np.mean([len(a) for a in train])),
            "budget": budget, "rows": out}


def table(res) -> str:
    if "spearman_error" in res["rows"][0]:
        lines = ["| labelled-set probes m | fit s (vs exact) | Spearman(error score) vs exact | Spearman(PV) vs exact | "
                 f"top-{res['budget']} overlap (error) | α² force |", "|---|---|---|---|---|---|"]
        for r in res["rows"]:
            lines.append(f"| {r['m']} | {r['fit_s']:.2f} ({r['fit_vs_exact']:.2f}) | {r['spearman_error']:.3f} | "
                         f"{r['spearman_pv']:.3f} | {r['top_overlap_error']:.2f} | {r['alpha2_force']:.3g} |")
        return "\n".join(lines)
    lines = ["| probes m | Spearman vs exact | top-%d overlap | s / structure | cost vs exact |" % res["budget"],
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['m']} | {r['spearman']:.3f} | {r['top_overlap']:.2f} | {r['s_per_structure']:.3f} | "
                     f"{r['cost_vs_exact']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.bench_probes", description=__doc__.splitlines()[0])
    p.add_argument("--pool-size", type=int, default=600)
    from ntkal.options import SKETCH_DIM
    p.add_argument("--sketch-dim", type=int, default=SKETCH_DIM)
    p.add_argument("--budget", type=int, default=20)
    p.add_argument("--labelled", action="store_true", help="probe rows for the labelled set instead of the pool")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    res = (labelled if a.labelled else run)(a.pool_size, a.sketch_dim, a.budget)
    print(table(res))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
