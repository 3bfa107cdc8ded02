"""How good are the predicted errors? `ntkal evaluate` scores a labelled validation set with every
kernel and score and compares the predicted errors with the model's real ones (docs/design.md,
"Evaluating the uncertainty").

Per structure: the written (calibrated) energy error (meV/atom) and force error (meV/Å) against the real
|E_ref − E|/N and RMS(F_ref − F) (and per atom), as Spearman and the median of written/real; per energy row
and force component: the probability integral transform F(|t|) of t = ε / (its structure's written error)
under the calibrated distribution (docs/design.md, "Calibration"), whose coverage of the central intervals
gives the miscalibration area and the 50/68/95 % coverage. "pv" is the posterior variance alone (μ = 0),
calibrated the same way. Binned: the median real error in bins of predicted error (the reliability plot).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .acquisition.pipeline import Pipeline, featurizer_for
from .acquisition.residuals import residual_rows
from .acquisition.streams import Stream, chunks
from .errors import InputError
from .features.rowblock import ENERGY, FORCE, RowBlock
from .options import KERNELS, SCORES, Options
N_BINS = 8
NO_RATIO_BELOW = 0.1  # meV/Å (meV/atom): real errors below are zero by symmetry (forces of a symmetric cell)


def evaluate(model, train, valid, kernels: Optional[Sequence[str]] = ("energy", "force", "joint"),
             scores: Sequence[str] = SCORES, pretrain=None, progress: bool = False, posterior=None, **options) -> dict:
    """{kernel: {score: {"energy": metrics, "force": metrics}}} on the labelled structures `valid`.
    posterior: a saved posterior (path or ntkal.saved.SavedPosterior) instead of fitting on train/pretrain
    (train=None): only its kernel is evaluated (kernels=None, or kernels holding it)."""
    from .saved import resolve
    options, saved = resolve(posterior, options, train, pretrain)
    if saved is not None:
        kernel = saved.features["kernel"]
        if kernels is not None and kernel not in kernels:
            raise InputError(f"--kernels: the posterior was fitted with kernel {kernel}; with --posterior only its "
                             "kernel is evaluated")
        kernels = [kernel]
    kernels = ("energy", "force", "joint") if kernels is None else kernels
    for what, given, allowed in (("--kernels", kernels, KERNELS), ("--scores", scores, SCORES)):
        bad = [x for x in given if x not in allowed]
        if bad:
            raise InputError(f"{what}: {bad[0]!r} is not one of {', '.join(allowed)}")
    opts = Options.from_kwargs(**{**options, "kernel": "joint", "score": "error"}).validate()
    base = featurizer_for(model, opts)
    src = Stream.of(valid, "valid")
    valid = [a for _, _, chunk in chunks(src, opts.chunk(), set(base.atomic_numbers), labels=True) for a in chunk]  # checked
    if not valid:
        raise InputError("the validation set is empty", path=src.path)
    e, f = base.predict(valid)
    rows = {}  # exact rows of the validation set: the joint rows hold the energy and force kernels' rows
    for kernel in ("joint", "embedding"):
        if kernel in kernels or (kernel == "joint" and {"energy", "force"} & set(kernels)):
            fz = base.with_kernel(kernel, None)
            rows[kernel] = RowBlock.cat([fz(valid[i:i + opts.chunk()]) for i in range(0, len(valid), opts.chunk())])
    out: Dict[str, dict] = {}
    for kernel in kernels:
        pipe = Pipeline(opts, base.with_kernel(kernel, opts.force_probes), progress)
        post = pipe.fit(train, pretrain) if saved is None else pipe.use(saved)
        block = rows["embedding"] if kernel == "embedding" else rows["joint"]
        if kernel in ("energy", "force"):
            block = block.only((FORCE,) if kernel == "force" else (ENERGY,))
        eps = residual_rows(block, valid, e, f, required=True, path=src.path)
        out[kernel] = {s: _metrics(post, block, eps, s) for s in scores}
        res = post.residual
        out[kernel]["calibration"] = {"rho": res.rho, "alpha2": res.alpha2, "alpha2_pv": res.alpha2_pv,
                                      "how": res.calibration}
    return out


def _metrics(post, rows: RowBlock, eps: torch.Tensor, score: str) -> dict:
    """Per part, the written (calibrated) errors against the real RMS errors per structure (and per atom),
    and the components' probability integral transforms under the calibrated distribution."""
    from .posterior.residual import component_scale, raw_levels
    with_mean = score == "error"
    res = post.residual
    err = res.errors(rows, post.predictive(rows, with_mean=with_mean), with_mean)
    real = raw_levels(rows, eps.square(), torch.zeros_like(eps))
    seg, is_f = rows.seg.cpu().numpy(), (rows.kind == FORCE).numpy()
    comp = component_scale(rows, real)  # probe rows to the scale of one component
    out = {}
    for part, mask in (("energy", ~is_f), ("force", is_f)):
        if not mask.any():
            continue
        has = np.isfinite(real[part])
        t = (eps.numpy() * comp)[mask] / err[part][seg[mask]]
        u = err["calibration"].pit(part, t, err[part][seg[mask]])
        out[part] = summary(1e3 * err[part][has], 1e3 * real[part][has], u)
        out[part]["units"] = "meV/atom" if part == "energy" else "meV/A"
        if part == "force" and "atom_force" in real:
            ok = np.isfinite(real["atom_force"]) & np.isfinite(err["atom_force"])
            out["atom_force"] = {k: v for k, v in summary(1e3 * err["atom_force"][ok], 1e3 * real["atom_force"][ok],
                                                          None).items() if k != "bins"}
            out["atom_force"]["units"] = "meV/A"
    return out


def summary(predicted: np.ndarray, real: np.ndarray, u) -> dict:
    """Spearman, the median and spread of predicted/real, and from the components' probability integral
    transforms u (F(|t|), uniform when calibrated): miscalibration area, coverage at 50/68/95 %; the binned
    reliability curve."""
    from scipy.stats import spearmanr
    ratio = predicted / np.where(real >= NO_RATIO_BELOW, real, np.nan)
    ratio = ratio[np.isfinite(ratio)]
    out = {"n": int(len(predicted)),
           "spearman": float(spearmanr(predicted, real)[0]) if len(predicted) > 2 else None,
           "median_ratio": float(np.median(ratio)) if len(ratio) else None,
           "ratio_q10_q90": [float(np.quantile(ratio, 0.1)), float(np.quantile(ratio, 0.9))] if len(ratio) else None,
           "rms_predicted": float(np.sqrt(np.mean(predicted ** 2))), "rmse_real": float(np.sqrt(np.mean(real ** 2)))}
    if u is not None:
        levels = np.linspace(0.01, 0.99, 99)
        observed = np.array([(u <= p).mean() for p in levels])
        out.update({"n_components": int(len(u)), "miscalibration_area": float(np.abs(observed - levels).mean()),
                    "coverage_50": float((u <= 0.5).mean()), "coverage_68": float((u <= 0.6827).mean()),
                    "coverage_95": float((u <= 0.95).mean())})
    order = np.argsort(predicted, kind="stable")
    bins = [b for b in np.array_split(order, min(N_BINS, len(order))) if len(b)]
    out["bins"] = [{"median_predicted": float(np.median(predicted[b])), "median_real": float(np.median(real[b])),
                    "n": int(len(b))} for b in bins]
    return out


def plot(results: dict, path, title: str = ""):
    """Reliability plot: the median real RMS error in bins of predicted error, per kernel, score and part."""
    from .io.write import figure, save_png
    parts = ("energy", "force")
    kernels = list(results)
    fig, axes = figure(len(parts), len(kernels), figsize=(3.2 * len(kernels), 5.6), squeeze=False)
    for j, kernel in enumerate(kernels):
        for i, part in enumerate(parts):
            ax = axes[i, j]
            lo, hi = np.inf, 0.0
            for c, score in enumerate(s for s in results[kernel] if s in SCORES):
                m = results[kernel][score].get(part)
                if m is None:
                    continue
                x = [b["median_predicted"] for b in m["bins"]]
                y = [b["median_real"] for b in m["bins"]]
                lo, hi = min(lo, *x, *y), max(hi, *x, *y)
                ax.plot(x, y, "o-", color=f"C{c}", ms=3,
                        label=f"{score} (ρ_s {m['spearman']:.2f}, cov95 {m['coverage_95']:.2f})")
            if hi > 0:
                ax.plot([lo, hi], [lo, hi], color="0.6", lw=0.8)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.legend(fontsize=6, frameon=False)
            ax.set_title(f"{kernel}: {part}", fontsize=8)
            unit = "meV/atom" if part == "energy" else "meV/Å"
            ax.set_xlabel(f"predicted error ({unit})", fontsize=7)
            ax.set_ylabel(f"median real RMS error ({unit})", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    save_png(fig, path)
