"""Does one round of labelled frames from the model's own MD put ntkal's MD error on the right scale?
`python -m bench.md_refit`.

Round 1: the shipped oc20 model runs Langevin MD (bench/bench_md.py's set-up: 800 K, bottom layer fixed) from
each start; every `--harvest-every`-th frame is labelled with EMT (what `ntkal md --every k` and a DFT code
would give). Round 2: fresh MD from the same starts with other seeds; every frame labelled with EMT. Two
posteriors of the joint kernel (exact force rows in the fit): "before" on the train split + a pretraining sample
(as `ntkal fit --pretrain`), "after" on the same plus the round-1 harvest; and "recalibrated": before's errors
mapped by a line in log space fitted on the harvest alone (calibration.lad_line: the harvest as a calibration
set, not in the posterior; a power law of before's calibrated power law). Per frame of round 2 each gives the
force error ntkal.Calculator writes (8 probe rows, ntkal_force_error); against the real RMS force error: the
median predicted / real in and out of region, the Spearman within each run and over all frames, and the share
of frames really above a threshold that each flags at its own number. Repeated over MD seeds (`--seeds`).
"""
from __future__ import annotations

import argparse
import sys
import time

import mace  # noqa: F401  (before e3nn: docs/design.md, Imports)
import numpy as np
import torch

VARIANTS = ("before", "after", "recalibrated")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.md_refit", description=__doc__.splitlines()[0])
    ap.add_argument("--starts", default="test_id:4,test_ood_ads:2,test_ood_metal:2",
                    help="split:count of MD starts (bench_md.md_starts)")
    ap.add_argument("--md-steps", type=int, default=30)
    ap.add_argument("--harvest-every", type=int, default=10, help="round 1: label every k-th frame (not frame 0)")
    ap.add_argument("--temperature", type=float, default=800.0)
    ap.add_argument("--seeds", type=int, default=5, help="independent repeats (round 1 and 2 MD seeds)")
    ap.add_argument("--threshold", type=float, default=250.0, help="meV/Å: real errors above it are to be flagged")
    ap.add_argument("--pretrain-size", type=int, default=100)
    ap.add_argument("--n-train", type=int, default=None, help="the first n of the train split (default all 24)")
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--sketch-dim", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import ntkal
    from ntkal.acquisition.scorers import ErrorScorer
    from ntkal.posterior.calibration import lad_line

    from . import bench_md as bm
    from . import utils
    files, train, pre = bm.oc20_sets(a.pretrain_size, a.n_train)
    fz = bm.featurizer(files["model"], "joint", a.sketch_dim, "float64")
    fz_md = fz.with_kernel("joint", a.probes)  # the calculator's probe rows (ntkal/calculator.py)
    plain = bm.plain_calculator(files["model"])
    starts = bm.md_starts(a.starts)
    t0 = time.perf_counter()
    before = ErrorScorer(ntkal.fit(fz, train, pretrain=pre or None))
    fit_s = time.perf_counter() - t0
    results = []
    for seed in range(a.seeds):
        harvest = [f for f in trajectories(bm, plain, starts, a, 1000 * seed + 100) if f["t"] % a.harvest_every == 0
                   and f["t"] > 0]
        labelled = [f["labelled"] for f in harvest]
        after = ErrorScorer(ntkal.fit(fz, train + labelled, pretrain=pre or None))
        h_pred = before(fz_md([f["atoms"] for f in harvest])).values["force_error"]
        line = lad_line(np.log(h_pred), np.log([f["real_f"] for f in harvest]))
        frames = trajectories(bm, plain, starts, a, 1000 * seed + 500)
        rows = fz_md([f["atoms"] for f in frames])
        for name, sc in (("before", before), ("after", after)):
            for f, v in zip(frames, sc(rows).values["force_error"]):
                f[f"pred_{name}"] = float(v)
        for f in frames:
            f["pred_recalibrated"] = float(np.exp(line[0]) * f["pred_before"] ** line[1])
            del f["atoms"], f["labelled"]
        results.append({"seed": seed, "n_harvest": len(labelled), "recalibration_line": list(line),
                        "metrics": metrics(frames, a.threshold), "frames": frames})
        print(f"seed {seed}: {len(labelled)} harvested, {len(frames)} frames scored "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    summary = summarise(results)
    doc = utils.record("md_refit", sys.argv[1:] if argv is None else argv, results, prog="python -m bench.md_refit",
                       summary=summary, n_train=len(train), n_pretrain=len(pre), fit_before_s=fit_s,
                       wall_s=time.perf_counter() - t0,
                       settings={"temperature_K": a.temperature, "md_steps": a.md_steps, "starts": a.starts,
                                 "friction": "0.02 in ASE's time unit (about 0.002/fs; bench_md.langevin)",
                                 "harvest_every": a.harvest_every, "kernel": "joint", "probes": a.probes,
                                 "sketch_dim": a.sketch_dim, "threshold_meV_A": a.threshold})
    print(table(summary))
    if a.json:
        utils.write_json(a.json, doc)
    return 0


def trajectories(bm, calc, starts, a, seed0: int) -> list:
    """One MD run per start with the plain model (its forces are the Calculator's: tests/test_md.py); every
    frame with its EMT-labelled copy and the model's real RMS force error (meV/Å)."""
    frames = []
    for si, s in enumerate(starts):
        atoms = bm.fix_bottom_layer(s.copy())
        atoms.calc = calc
        dyn = bm.langevin(atoms, a.temperature, 1.0, seed=seed0 + si)
        for t in range(a.md_steps + 1):
            forces = atoms.get_forces(apply_constraint=False)
            snap = atoms.copy()
            snap.calc = None
            lab = bm.emt_label(snap)
            frames.append({"run": si, "t": t, "in_region": bool(s.info["in_region"]), "atoms": snap, "labelled": lab,
                           "real_f": 1e3 * float(np.sqrt(np.mean((lab.arrays["REF_forces"] - forces) ** 2)))})
            if t < a.md_steps:
                dyn.step()
    return frames


def metrics(frames, threshold: float) -> dict:
    """Per variant: median predicted / real force error in and out of region, Spearman (median within runs,
    all frames) and, of the frames really above `threshold`, the share whose prediction is above it too."""
    from scipy.stats import spearmanr
    real = np.array([f["real_f"] for f in frames])
    inr = np.array([f["in_region"] for f in frames])
    run = np.array([f["run"] for f in frames])
    out = {"real_median": float(np.median(real)), "frames": len(frames), "above": int((real > threshold).sum())}
    for name in VARIANTS:
        pred = np.array([f[f"pred_{name}"] for f in frames])
        ratio = pred / real
        per_run = [spearmanr(pred[run == r], real[run == r])[0] for r in np.unique(run)]
        above = real > threshold
        out[name] = {"ratio_in": float(np.median(ratio[inr])) if inr.any() else None,
                     "ratio_out": float(np.median(ratio[~inr])) if (~inr).any() else None,
                     "spearman_all": float(spearmanr(pred, real)[0]),
                     "spearman_run_median": float(np.nanmedian(per_run)),
                     "recall": float((pred[above] > threshold).mean()) if above.any() else None,
                     "precision": float(above[pred > threshold].mean()) if (pred > threshold).any() else None}
    return out


def summarise(results) -> list:
    """Per variant and metric: the mean over seeds with a 95 % t-interval (and the per-seed values)."""
    from scipy import stats
    rows = []
    for name in VARIANTS:
        for key in ("ratio_in", "ratio_out", "spearman_run_median", "spearman_all", "recall", "precision"):
            v = np.array([r["metrics"][name][key] for r in results if r["metrics"][name][key] is not None], float)
            row = {"variant": name, "metric": key, "per_seed": v.tolist(), "mean": float(v.mean()) if len(v) else None}
            if len(v) > 1:
                half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
                row["ci95"] = [row["mean"] - half, row["mean"] + half]
            rows.append(row)
    return rows


def table(summary) -> str:
    from .utils import markdown_table
    rows = [dict(r, ci95=(f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if "ci95" in r else "–")) for r in summary]
    return markdown_table(rows, ["variant", "metric", "mean", "ci95"])


if __name__ == "__main__":
    raise SystemExit(main())
