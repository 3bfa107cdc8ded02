"""Calibration of the written errors on every shipped test split (`ntkal evaluate`'s metrics).

Per dataset (si, oc20, t1x) the posterior is fitted once on the shipped train split, with and without the
shipped pretraining sample (labelled, so its residuals enter the calibration), as `ntkal evaluate` fits it;
every test split (id and ood) is then scored with exact rows and compared with the model's real errors:
miscalibration area and 50/68/95 % coverage of the components, median and 10-90 % range of per-structure
predicted/real, Spearman. Goals (issue 17): area ≤ 0.05, median ratio in [0.7, 1.4], 95 % coverage in
[0.93, 0.97].
"""
from __future__ import annotations

import time

from ntkal.data import DATASET_SPLITS, dataset_files

from . import utils

GOALS = {"miscalibration_area": (0.0, 0.05), "median_ratio": (0.7, 1.4), "coverage_95": (0.93, 0.97)}


def add_args(p):
    p.add_argument("--datasets", default="si,oc20,t1x")
    p.add_argument("--kernels", default="joint", help="comma-separated kernels (energy, force, joint)")
    p.add_argument("--force-probes", type=int, default=8, help="probe rows of the pretraining sample")
    p.add_argument("--sketch-dim", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="si only, 12 structures per split, sketch 64 (CI)")


def run(a, argv) -> dict:
    from ntkal.acquisition.pipeline import Pipeline, featurizer_for
    from ntkal.acquisition.residuals import residual_rows
    from ntkal.evaluate import _metrics
    from ntkal.features.rowblock import ENERGY, FORCE, RowBlock
    from ntkal.io import read_structures
    from ntkal.options import Options
    datasets = ["si"] if a.quick else a.datasets.split(",")
    sketch = 64 if a.quick else a.sketch_dim
    results = []
    for name in datasets:
        files = dataset_files(name)
        limit = 12 if a.quick else None
        train = list(read_structures(files["train"]))[:limit]
        pretrain = list(read_structures(files["pretrain"]))[:limit and 3 * limit]
        opts = Options(kernel="joint", score="error", sketch_dim=sketch, force_probes=a.force_probes).validate()
        base = featurizer_for(files["model"], opts)
        tests = {}
        for split in (s for s in DATASET_SPLITS[name] if s.startswith("test")):
            valid = list(read_structures(files[split]))[:limit]
            e, f = base.predict(valid)
            exact = base.with_kernel("joint", None)
            tests[split] = (valid, e, f, RowBlock.cat([exact(valid[i:i + 32]) for i in range(0, len(valid), 32)]))
        for kernel in a.kernels.split(","):
            for with_pre in (False, True):
                t = time.perf_counter()
                post = Pipeline(opts, base.with_kernel(kernel, a.force_probes)).fit(train, pretrain if with_pre else None)
                fit_s = time.perf_counter() - t
                for split, (valid, e, f, rows) in tests.items():
                    block = rows if kernel == "joint" else rows.only((FORCE,) if kernel == "force" else (ENERGY,))
                    eps = residual_rows(block, valid, e, f, required=True)
                    m = _metrics(post, block, eps, "error")
                    reach = _reach(post, block, eps)
                    for part, metrics in m.items():
                        results.append({"dataset": name, "split": split, "kernel": kernel, "pretrain": with_pre,
                                        "part": part, "fit_s": fit_s, "calibration": post.residual.calibration,
                                        **{k: v for k, v in metrics.items() if k != "bins"}, **reach.get(part, {})})
    return utils.record("calibration", argv, results, goals=GOALS)


def _reach(post, rows, eps) -> dict:
    """Per level: the calibration line (a, b), the raw predictions it was fitted on (quantiles, meV), this split's
    median raw prediction, the share of its structures beyond the largest fitted one (where the line
    extrapolates) and the median real / raw here: whether the written errors of a split are read off the line or
    extrapolated from it."""
    import numpy as np
    import torch

    from ntkal.posterior.residual import raw_levels
    err = post.residual.errors(rows, post.predictive(rows, with_mean=True), True)
    real = raw_levels(rows, eps.square(), torch.zeros_like(eps))
    cal, out = err["calibration"], {}
    for level in ("energy", "force"):
        raw, ok = err["raw"].get(level), np.isfinite(real.get(level, np.array([])))
        if raw is None or level not in cal.line or not ok.any() or level not in cal.raw_q:
            continue
        raw, rl = raw[ok], real[level][ok]
        q = cal.raw_q[level]
        pos = (raw > 0) & (rl > 0)
        out[level] = {"line": cal.line[level], "calib_raw_q_mev": (1e3 * q).tolist(),
                      "raw_median_mev": 1e3 * float(np.median(raw)),
                      "share_beyond_calib_max": float(np.mean(raw > q[-1])),
                      "median_real_over_raw": float(np.median(rl[pos] / raw[pos])) if pos.any() else None}
    return out


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def table(doc) -> str:
    lines = ["| dataset | split | kernel | --pretrain | part | n | Spearman | median pred/real | 10-90 % | "
             "miscal. area | cov 50 | cov 68 | cov 95 | line slope b | raw median / fitted median | beyond fitted max | "
             "real/raw here |", "|" + "---|" * 17]
    for r in doc["results"]:
        q = r.get("ratio_q10_q90") or [None, None]
        lines.append(f"| {r['dataset']} | {r['split']} | {r['kernel']} | {'yes' if r['pretrain'] else 'no'} | "
                     f"{r['part']} | {r['n']} | {_fmt(r['spearman'], '.2f')} | {_fmt(r['median_ratio'], '.2f')} | "
                     f"{_fmt(q[0], '.2f')}–{_fmt(q[1], '.2f')} | {_fmt(r.get('miscalibration_area'))} | "
                     f"{_fmt(r.get('coverage_50'), '.2f')} | {_fmt(r.get('coverage_68'), '.2f')} | "
                     f"{_fmt(r.get('coverage_95'), '.3f')} | {_fmt((r.get('line') or [None, None])[1], '.2f')} | "
                     f"{_fmt(r['raw_median_mev'] / r['calib_raw_q_mev'][2] if r.get('calib_raw_q_mev') else None, '.2f')} | "
                     f"{_fmt(r.get('share_beyond_calib_max'), '.2f')} | {_fmt(r.get('median_real_over_raw'), '.2f')} |")
    return "\n".join(lines)
