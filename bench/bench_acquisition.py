"""acquisition: what each method picks from a biased pool (no fine-tune): the pretrained model's error on
the picks ÷ the pool's, the target-region share of the picks, and Spearman(score, error) over the pool.

The pool is what a fine-tuning user holds after running the foundation model's own MD: 80 % from the
region the model was pretrained on, 20 % from the target region where it is wrong; a small labelled seed
comes from the target region. Per dataset (the shipped si / oc20 / t1x sets and their pretrained models):
- pretraining region: oc20 / t1x pool structures with region "base"; si: one half of si_pretrain (Si4/Si6
  cells), the other half being the --pretrain sample (a user's pretraining sample and MD pool differ);
- target region: oc20 / t1x pool structures with region "target"; si: the si_pool cells (Si8/Si16);
- methods: pv / error (ntkal's scores, shortlist + LCMD), each also +pretrain; mean (the error score's
  posterior mean alone, no variance: an ablation); target (--target); committee (4 fine-tuned members);
  llpr (readout-only posterior); oracle (the B largest real errors: the ceiling of the ratio);
- labelled seed: `--seed-size` target-region structures of the train split; pretrain sample: `--pretrain-size`
  pretraining-region structures disjoint from the pool; unlabelled target sample (--target): 50.
Every draw redraws pool, seed, samples and (for the committee) the fine-tune seeds. Features of the ONE
pretrained model are computed once per structure (ntkal.experiment.features.FeatureStore).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from . import utils


def add_args(p: argparse.ArgumentParser):
    p.add_argument("--datasets", default="si,oc20,t1x")
    p.add_argument("--draws", type=int, default=3, help="independent pool/seed draws per dataset (default 3)")
    p.add_argument("--pool-base", type=int, default=600, help="pretraining-region structures in the pool (at most)")
    p.add_argument("--budget", type=int, default=40)
    p.add_argument("--seed-size", type=int, default=12, help="labelled target-region structures")
    p.add_argument("--pretrain-size", type=int, default=200)
    p.add_argument("--sketch-dim", type=int, default=256)
    p.add_argument("--force-probes", type=int, default=8)
    p.add_argument("--shortlists", default="1,2,3,5,default",
                   help="shortlist sizes to sweep for the error score, as multiples of the budget ('default': "
                        "ntkal's current default)")
    p.add_argument("--methods", default="oracle,random,pv,pv+pretrain,error,error+pretrain,target,committee,llpr",
                   help="pv / error / mean (the error score's posterior mean alone), each optionally +pretrain")
    p.add_argument("--sweep-kernels", default="", help="kernels whose shortlist size is swept (--shortlists)")
    p.add_argument("--committee-size", type=int, default=4)
    p.add_argument("--committee-epochs", type=int, default=20)


def regions(name: str, rng):
    """(pretraining-region structures, target-region structures, seed candidates, pretrain-sample candidates)."""
    from ntkal.data import dataset_files
    from ntkal.io import read_structures
    files = dataset_files(name)

    def tagged(split):
        out = []
        for i, a in enumerate(read_structures(files[split])):
            a.info["exp_id"] = f"{split}:{i}"
            out.append(a)
        return out
    pool, train = tagged("pool"), tagged("train")
    if name == "si":
        pre = tagged("pretrain")
        perm = rng.permutation(len(pre))
        half = len(pre) // 2
        return [pre[i] for i in perm[:half]], pool, train, [pre[i] for i in perm[half:]]
    base = [a for a in pool if a.info.get("region") != "target"]
    target = [a for a in pool if a.info.get("region") == "target"]
    seed = [a for a in train if a.info.get("region") == "target"]
    return base, target, seed, tagged("pretrain")


def errors_of(store, structures):
    """Per structure: the pretrained model's RMS force-component error (meV/Å) and |energy error| (meV/atom)."""
    e, f = store.predictions(structures)
    fe = np.array([1e3 * np.sqrt(np.mean((a.arrays["REF_forces"] - fi) ** 2)) for a, fi in zip(structures, f)])
    ee = np.array([1e3 * abs(a.info["REF_energy"] - ei) / len(a) for a, ei in zip(structures, e)])
    return fe, ee


def spearman(x, y):
    from scipy.stats import spearmanr
    return float(spearmanr(x, y)[0]) if x is not None and len(x) > 2 else None


def run_dataset(name, a, methods, shortlists, log):
    from ntkal.acquisition.scorers import ErrorScorer
    from ntkal.data import dataset_files
    from ntkal.options import KERNELS
    from study import acquisition
    from study.config import SelectionConfig
    from study.features import FeatureStore
    model = dataset_files(name)["model"]
    sel = SelectionConfig(sketch_dim=a.sketch_dim, force_probes=a.force_probes, target_shortlist=max(60, a.budget))
    store = FeatureStore(model, sel)
    rows = []
    for d in range(a.draws):
        rng = np.random.default_rng([d, 7])
        base, target, seed_pool, pre_pool = regions(name, rng)
        n_base = min(a.pool_base, len(base))
        n_target = min(n_base // 4, len(target) - 50)
        pb = [base[i] for i in rng.choice(len(base), n_base, replace=False)]
        tperm = rng.permutation(len(target))
        pt, tsample = [target[i] for i in tperm[:n_target]], [target[i] for i in tperm[n_target:n_target + 50]]
        combined = pb + pt
        pool = [combined[i] for i in rng.permutation(len(combined))]
        is_target = np.array([x.info["exp_id"] in {t.info["exp_id"] for t in pt} for x in pool])
        labelled = [seed_pool[i] for i in rng.choice(len(seed_pool), min(a.seed_size, len(seed_pool)), replace=False)]
        taken = {x.info["exp_id"] for x in pool}
        pre_c = [x for x in pre_pool if x.info["exp_id"] not in taken]
        pretrain = [pre_c[i] for i in rng.choice(len(pre_c), min(a.pretrain_size, len(pre_c)), replace=False)]
        fe, ee = errors_of(store, pool)
        budget = min(a.budget, len(pool) // 4)

        def record(method, kernel, picks, seconds, shortlist=None):
            pos = picks.positions
            scores = picks.detail.get("pool_scores")
            rows.append({"dataset": name, "draw": d, "method": method, "kernel": kernel, "shortlist": shortlist,
                         "pool": len(pool), "budget": budget, "f_ratio": float(fe[pos].mean() / fe.mean()),
                         "e_ratio": float(ee[pos].mean() / ee.mean()), "target_share": float(is_target[pos].mean()),
                         "pool_target_share": float(is_target.mean()), "f_picks_meV_A": float(fe[pos].mean()),
                         "f_pool_meV_A": float(fe.mean()), "f_target_meV_A": float(fe[is_target].mean()),
                         "spearman_f": spearman(scores, fe), "spearman_e": spearman(scores, ee),
                         "seconds": float(seconds), "calibration": picks.detail.get("calibration")})
            log(f"[{name} draw {d}] {method:<15} {kernel or '':<9} M={shortlist or '-':<5} F ratio "
                f"{rows[-1]['f_ratio']:.2f} target {rows[-1]['target_share']:.2f} Spearman F "
                f"{rows[-1]['spearman_f'] if rows[-1]['spearman_f'] is None else round(rows[-1]['spearman_f'], 2)}")
        for method in methods:
            t0 = time.perf_counter()
            if method == "random":
                record(method, None, acquisition.random_picks(len(pool), budget, d, 0, name), 0.0)
            elif method == "oracle":  # the B structures with the largest real force error: the ceiling
                record(method, None, acquisition.Picks(np.argsort(-fe, kind="stable")[:budget], 0.0, {}), 0.0)
            elif method.split("+")[0] in ("pv", "error", "mean"):
                score = method.split("+")[0]
                pre = pretrain if method.endswith("+pretrain") else ()
                scorer = (lambda post: ErrorScorer(post, variance=False)) if score == "mean" else None
                for kernel in KERNELS:
                    sizes = shortlists if kernel in a.sweep_kernels.split(",") else ["default"]
                    for m in sizes:
                        t0 = time.perf_counter()
                        mm = None if m == "default" else max(int(m) * budget, budget)
                        picks = acquisition.feature_picks(store, kernel, "lcmd", labelled, pool, budget, sel, d,
                                                          score="pv" if score == "pv" else "error", pretrain=pre,
                                                          shortlist=mm, scorer=scorer)
                        record(method, kernel, picks, time.perf_counter() - t0, m)
            elif method == "target":
                record(method, "joint", acquisition.target_picks(store, "joint", labelled, pool, tsample, budget, sel),
                       time.perf_counter() - t0)
            elif method == "llpr":
                record(method, "readout", acquisition.feature_picks(store, "readout", "lcmd", labelled, pool, budget,
                                                                    sel, d), time.perf_counter() - t0)
            elif method == "committee":
                record(method, None, committee_picks(model, labelled, pool, budget, d, a), time.perf_counter() - t0)
    return rows


def committee_picks(model, labelled, pool, budget, draw, a):
    """4 members fine-tuned (naive protocol) from the pretrained model on the seed with different seeds."""
    from study.acquisition import Picks
    from study.committee import committee_select, member_seeds
    from study.config import FinetuneConfig
    from study.finetune import finetune, foundation_e0s
    cfg = FinetuneConfig(protocol="naive", epochs=a.committee_epochs, batch_size=4, lr=1e-3, energy_weight=10.0,
                         forces_weight=100.0, valid_size=2)
    e0s = foundation_e0s(model)
    with tempfile.TemporaryDirectory(prefix="ntkal-bench-committee-") as tmp:
        paths = [finetune(cfg, model, labelled, labelled[:2], Path(tmp) / f"m{j}", s, e0s).model_path
                 for j, s in enumerate(member_seeds(draw, a.committee_size))]
        pos, info = committee_select(paths, labelled, pool, budget, draw)
    return Picks(pos, 0.0, info)


def run(a, argv) -> dict:
    methods = a.methods.split(",")
    shortlists = a.shortlists.split(",")
    rows = []
    for name in a.datasets.split(","):
        rows += run_dataset(name, a, methods, shortlists, lambda msg: print(msg, flush=True))
    return utils.record("acquisition", argv, rows, settings=vars(a) | {"json": None})


def summary(rows):
    """mean ± sd over draws per (dataset, method, kernel, shortlist)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["method"], r["kernel"], r["shortlist"]), []).append(r)
    out = []
    for (ds, method, kernel, m), rs in groups.items():
        row = {"dataset": ds, "method": method, "kernel": kernel or "-", "shortlist": m or "-", "draws": len(rs)}
        for key in ("f_ratio", "e_ratio", "target_share", "spearman_f", "spearman_e"):
            v = np.array([r[key] for r in rs if r[key] is not None], dtype=float)
            row[key] = "-" if len(v) == 0 else f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0:.2f}"
        out.append(row)
    return out


COLUMNS = ["dataset", "method", "kernel", "shortlist", "draws", "f_ratio", "e_ratio", "target_share", "spearman_f",
           "spearman_e"]
HEADERS = ["dataset", "method", "kernel", "shortlist (x B)", "draws", "F error picks/pool", "E error picks/pool",
           "target share", "Spearman(score, F err)", "Spearman(score, E err)"]


def table(doc) -> str:
    rows = doc["results"]
    pools = {r["dataset"]: (r["pool"], r["budget"], r["pool_target_share"], r["f_pool_meV_A"], r["f_target_meV_A"])
             for r in rows}
    lines = [utils.header(doc)]
    for ds, (n, b, share, f_pool, f_t) in pools.items():
        lines.append(f"- {ds}: pool {n} ({share:.0%} target region), budget {b}; pretrained force error: pool mean "
                     f"{f_pool:.0f} meV/Å, target-region mean {f_t:.0f} meV/Å (last draw)")
    lines.append("")
    lines.append(utils.markdown_table(summary(rows), COLUMNS, HEADERS))
    return "\n".join(lines)
