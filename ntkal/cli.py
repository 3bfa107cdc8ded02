"""Command line: `ntkal select | score | demo` (settings dataclass + parser + main, as mace-torch's CLIs)."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

KERNELS = ("embedding", "energy", "force", "joint")


@dataclass
class Settings:
    """Everything a run depends on; written into the JSON report."""

    command: str
    model: Optional[str] = None
    train: Optional[str] = None
    pool: Optional[str] = None
    out: Optional[str] = None
    budget: int = 100
    kernel: str = "joint"
    method: str = "lcmd"
    mode: str = "tp"
    shortlist: Optional[int] = None
    sketch_dim: int = 512
    params: str = "all"
    force_probes: Optional[int] = None
    sigma_e2: float = 1e-2
    sigma_f2: float = 1e-2
    force_reduce: str = "mean"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    chunk_size: int = 64
    progress: bool = True
    debug: bool = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ntkal", description="Force-aware NTK active learning for MACE potentials: pick the structures "
                                  "worth a DFT calculation.")
    parser.add_argument("--version", action="version", version=f"ntkal {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{select,score,demo}")

    def common(p, need_files=True):
        g = p.add_argument_group("features and posterior")
        if need_files:
            p.add_argument("--model", required=True, help="pretrained MACE model file (.model)")
            p.add_argument("--train", required=True, help="labelled training structures (extxyz or ASE .db)")
            p.add_argument("--pool", required=True, help="candidate pool (extxyz or ASE .db), streamed")
        g.add_argument("--kernel", choices=KERNELS, default="joint", help="feature map (default: joint energy-force NTK)")
        g.add_argument("--sketch-dim", type=int, default=512, help="sketch dimension k (default 512)")
        g.add_argument("--params", choices=("readout", "last", "all"), default="all",
                       help="parameters in the NTK (default all)")
        g.add_argument("--force-probes", type=int, default=None,
                       help="Rademacher probes per structure for force rows (default: exact 3N rows)")
        g.add_argument("--sigma-e2", type=float, default=1e-2, help="energy noise variance after scaling")
        g.add_argument("--sigma-f2", type=float, default=1e-2, help="force noise variance after scaling")
        g.add_argument("--force-reduce", choices=("mean", "sum"), default="mean",
                       help="combine a structure's force variances by mean (default) or sum over atoms")
        g.add_argument("--seed", type=int, default=0, help="sketch, probe and tie-break seed")
        g.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
        g.add_argument("--dtype", choices=("float32", "float64"), default="float32")
        g.add_argument("--chunk-size", type=int, default=64, help="structures per featurisation chunk")
        p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
        p.add_argument("--debug", action="store_true", help="show tracebacks")

    def selection(p, budget_default=None):
        if budget_default is None:
            p.add_argument("--budget", type=int, required=True, help="number of structures to pick")
        else:
            p.add_argument("--budget", type=int, default=budget_default, help=f"structures to pick (default {budget_default})")
        p.add_argument("--method", choices=("lcmd", "top", "random"), default="lcmd",
                       help="lcmd: diverse batch from the PV shortlist (default); top: highest PV; random")
        p.add_argument("--mode", choices=("tp", "p"), default="tp",
                       help="LCMD centres: training set + picks (tp, default) or picks in posterior space (p)")
        p.add_argument("--shortlist", type=int, default=None, help="PV shortlist size M (default max(10 B, 2000))")

    p = sub.add_parser("select", help="pick a batch of pool structures to label",
                       description="Pick --budget pool structures to label; writes them as extxyz (input keys kept, "
                                   "ntkal_* keys added) and a JSON report beside it.")
    common(p)
    selection(p)
    p.add_argument("--out", default=None, help="output extxyz (default: <pool name>_selected.extxyz here)")

    p = sub.add_parser("score", help="score every pool structure",
                       description="Write every pool structure with its posterior-variance score (streamed).")
    common(p)
    p.add_argument("--out", required=True, help="output extxyz")

    p = sub.add_parser("demo", help="select from the shipped Si data with the shipped model",
                       description="Run `select` on the shipped PyXtal_FF Si pool with the shipped small MACE.")
    common(p, need_files=False)
    selection(p, budget_default=20)
    p.add_argument("--out", default="ntkal-demo", help="output directory (default ./ntkal-demo)")
    return parser


def _version() -> str:
    from . import __version__
    return __version__


def versions() -> dict:
    from importlib import metadata
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("ntkal", "torch", "triton", "mace-torch", "e3nn", "ase", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def report_path(out: Path) -> Path:
    return out.with_name(out.name.split(".")[0] + ".json")


def _options(s: Settings) -> dict:
    import torch
    return dict(kernel=s.kernel, seed=s.seed, sketch_dim=s.sketch_dim, params=s.params, force_probes=s.force_probes,
                sigma_e2=s.sigma_e2, sigma_f2=s.sigma_f2, force_reduce=s.force_reduce, chunk_size=s.chunk_size,
                dtype=getattr(torch, s.dtype), device=s.device, progress=s.progress)


def _check_inputs(s: Settings):
    from .errors import InputError
    for what in ("model", "train", "pool"):
        path = Path(getattr(s, what))
        if not path.exists():
            raise InputError(f"no such {what} file", path=path)
    if s.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but no CUDA device is available")


def run_select(s: Settings) -> dict:
    """ntkal select: the picks as extxyz plus a JSON report."""
    from .api import select
    from .io import check_output_path, write_extxyz, write_json
    _check_inputs(s)
    inputs = [s.model, s.train, s.pool]
    out = Path(s.out or (Path(s.pool).name.split(".")[0] + "_selected.extxyz"))
    check_output_path(out, inputs)
    check_output_path(report_path(out), inputs)
    opts = _options(s)
    res = select(s.model, s.train, s.pool, s.budget, method=s.method, shortlist=s.shortlist, mode=s.mode, **opts)
    write_extxyz(out, res.atoms, inputs)
    report = {"settings": asdict(s), "versions": versions(), "n_pool": res.n_pool,
              "n_train": res.posterior.n_train, "timings_s": res.timings, "status": res.status,
              "jitter": res.posterior.jitter, "coverage": res.info["featurizer"]["coverage"],
              "posterior": res.posterior.summary(), "featurizer": res.info["featurizer"],
              "shortlist_size": res.info["shortlist_size"],
              "selected": [{"rank": r, "pool_index": int(i), "score": float(sc), "natoms": len(a),
                            "formula": a.get_chemical_formula()}
                           for r, (i, sc, a) in enumerate(zip(res.indices, res.scores, res.atoms))],
              "output": str(out)}
    write_json(report_path(out), report, inputs)
    return {"result": res, "out": out, "report": report_path(out)}


def run_score(s: Settings) -> dict:
    """ntkal score: every pool structure with its score, streamed to extxyz, plus a JSON report."""
    from .api import score
    from .io import check_output_path, write_extxyz, write_json
    _check_inputs(s)
    inputs = [s.model, s.train, s.pool]
    out = Path(s.out)
    check_output_path(out, inputs)
    check_output_path(report_path(out), inputs)
    t0 = time.perf_counter()
    stats = {"n": 0, "sum": 0.0, "max": float("-inf")}

    def counted(it):
        for a in it:
            stats["n"] += 1
            stats["sum"] += a.info["ntkal_score"]
            stats["max"] = max(stats["max"], a.info["ntkal_score"])
            yield a
    write_extxyz(out, counted(score(s.model, s.train, s.pool, **_options(s))), inputs)
    report = {"settings": asdict(s), "versions": versions(), "n_pool": stats["n"],
              "mean_score": stats["sum"] / max(stats["n"], 1), "max_score": stats["max"],
              "timings_s": {"total": time.perf_counter() - t0}, "output": str(out)}
    write_json(report_path(out), report, inputs)
    return {"out": out, "report": report_path(out), "n": stats["n"]}


def run_demo(s: Settings) -> dict:
    """ntkal demo: select on the shipped Si pool with the shipped model; write picks, report and a plot."""
    from .data import demo_files
    from .errors import InputError
    files = demo_files()
    outdir = Path(s.out)
    if outdir.exists() and not outdir.is_dir():
        raise InputError("exists and is not a directory", path=outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    s.model, s.train, s.pool = str(files["model"]), str(files["train"]), str(files["pool"])
    s.out = str(outdir / "selected.extxyz")
    t0 = time.perf_counter()
    done = run_select(s)
    res = done["result"]
    png = outdir / "scores.png"
    plot_scores(res, png)
    print(f"ntkal demo: picked {len(res.indices)} of {res.n_pool} Si structures "
          f"(kernel {s.kernel}, {s.method}) in {time.perf_counter() - t0:.1f} s")
    print(f"{'rank':>4} {'pool':>5} {'formula':>8} {'score':>10} {'max atom var':>12}")
    for r, (i, sc, a, av) in enumerate(zip(res.indices, res.scores, res.atoms, res.atom_variances)):
        mx = "-" if av is None else f"{max(av):.3g}"
        print(f"{r:>4} {int(i):>5} {a.get_chemical_formula():>8} {sc:>10.4g} {mx:>12}")
    print(f"wrote {done['out']}, {done['report']}, {png}")
    return done


def plot_scores(res, path: Path):
    """Histogram of the shortlist's PV scores with the picks marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from .io import atomic_output
    scores = np.asarray(res.shortlist_scores)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.logspace(np.log10(max(scores.min(), 1e-12)), np.log10(scores.max()), 40)
    ax.hist(scores, bins=bins, color="0.7", label=f"shortlisted pool ({len(scores)})")
    ax.hist(res.scores, bins=bins, color="C3", label=f"picked by {res.method} ({len(res.scores)})")
    ax.set_xscale("log")
    ax.set_xlabel("posterior-variance score")
    ax.set_ylabel("structures")
    ax.legend(frameon=False)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    s = Settings(**vars(args))
    from .errors import NtkalError
    try:
        import mace  # noqa: F401  (before e3nn)
        {"select": run_select, "score": run_score, "demo": run_demo}[s.command](s)
    except NtkalError as exc:
        if s.debug:
            raise
        print(f"ntkal: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ntkal: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unexpected failure: one line unless --debug
        if s.debug:
            raise
        print(f"ntkal: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
