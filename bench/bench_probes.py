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
    import torch
    from scipy.stats import spearmanr

    import ntkal
    from ntkal.data import demo_files
    from ntkal.io import iter_chunks

    files = demo_files()
    train = ase.io.read(files["train"], ":")
    pool = ase.io.read(files["pool"], f":{pool_size}")
    fz = ntkal.MACEFeaturizer(str(files["model"]), kernel="force", sketch_dim=sketch_dim, seed=seed)
    post = ntkal.Posterior.fit(fz, train)

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


def table(res) -> str:
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
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    res = run(a.pool_size, a.sketch_dim, a.budget)
    print(table(res))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
