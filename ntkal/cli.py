"""Command line: `ntkal select | score | demo` (settings dataclass + parser + main, as mace-torch's CLIs)."""
from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
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
    method: Optional[str] = None
    target: Optional[str] = None
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
    memory_gb: Optional[float] = None
    threads: int = 1
    checkpoint_every: float = 60.0
    progress: bool = True
    debug: bool = False
    config: Optional[str] = None  # experiment: study YAML (default: the packaged study.yaml)
    quick: bool = False  # experiment: smoke-sized run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ntkal", description="Force-aware NTK active learning for MACE potentials: pick the structures "
                                  "worth a DFT calculation.")
    parser.add_argument("--version", action="version", version=f"ntkal {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{select,score,demo,experiment}")

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
        g.add_argument("--threads", type=int, default=1,
                       help="torch intra-op threads (default 1: the per-structure ops are small, and extra "
                            "threads stall on a busy machine; use torchrun processes for more cores)")
        g.add_argument("--dtype", choices=("float32", "float64"), default="float32")
        g.add_argument("--chunk-size", type=int, default=64, help="structures per featurisation chunk")
        g.add_argument("--memory-gb", type=float, default=None,
                       help="size chunks for this memory budget instead of --chunk-size")
        p.add_argument("--checkpoint-every", type=float, default=60.0,
                       help="seconds between checkpoints of the pool scan (rerun the same command to resume)")
        p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
        p.add_argument("--debug", action="store_true", help="show tracebacks")

    def selection(p, budget_default=None):
        if budget_default is None:
            p.add_argument("--budget", type=int, required=True, help="number of structures to pick")
        else:
            p.add_argument("--budget", type=int, default=budget_default, help=f"structures to pick (default {budget_default})")
        p.add_argument("--method", choices=("lcmd", "top", "random", "greedy"), default=None,
                       help="lcmd: diverse batch from the shortlist (default without --target); top: highest "
                            "score; random; greedy: sequential target-variance reduction (default with --target)")
        p.add_argument("--mode", choices=("tp", "p"), default="tp",
                       help="LCMD centres: training set + picks (tp, default) or picks in posterior space (p)")
        p.add_argument("--shortlist", type=int, default=None, help="PV shortlist size M (default max(10 B, 2000))")

    p = sub.add_parser("select", help="pick a batch of pool structures to label",
                       description="Pick --budget pool structures to label; writes them as extxyz (input keys kept, "
                                   "ntkal_* keys added) and a JSON report beside it.")
    common(p)
    selection(p)
    p.add_argument("--out", default=None, help="output extxyz (default: <pool name>_selected.extxyz here)")
    p.add_argument("--target", default=None,
                   help="unlabelled structures where the model will be used: rank candidates by the expected "
                        "reduction of their predictive variance")

    p = sub.add_parser("score", help="score every pool structure",
                       description="Write every pool structure with its posterior-variance score (streamed).")
    common(p)
    p.add_argument("--out", required=True, help="output extxyz")
    p.add_argument("--target", default=None,
                   help="also write each structure's expected reduction of the target's variance")

    p = sub.add_parser("demo", help="select from the shipped Si data with the shipped model",
                       description="Run `select` on the shipped PyXtal_FF Si pool with the shipped small MACE.")
    common(p, need_files=False)
    selection(p, budget_default=20)
    p.add_argument("--out", default="ntkal-demo", help="output directory (default ./ntkal-demo)")
    p.set_defaults(force_probes=8)  # 8 probes keep Spearman 0.97 to exact at 0.28x the cost (bench/RESULTS.md)

    p = sub.add_parser("experiment", help="active-learning study: select, label, fine-tune, evaluate",
                       description="Rounds of select -> label -> mace_run_train --foundation_model fine-tune -> "
                                   "evaluate, for every method, dataset and seed of the config; writes results/*.json, "
                                   "figures/*.png and results.md under --out (rerun to resume).")
    p.add_argument("config", nargs="?", default=None, help="study YAML (default: the packaged study.yaml)")
    p.add_argument("--quick", action="store_true", help="smoke run: the config's `quick:` sizes")
    p.add_argument("--out", default="ntkal-experiment", help="output directory (default ./ntkal-experiment)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
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
                sigma_e2=s.sigma_e2, sigma_f2=s.sigma_f2, force_reduce=s.force_reduce, chunk_size=_chunk_size(s),
                dtype=getattr(torch, s.dtype), device=s.device, progress=s.progress)


def _chunk_size(s: Settings) -> int:
    from .api import chunk_size_for
    if s.memory_gb is not None:
        return chunk_size_for(s.memory_gb, s.sketch_dim)
    if s.chunk_size < 1:
        from .errors import InputError
        raise InputError("--chunk-size must be at least 1")
    return s.chunk_size


def _checkpoint(s: Settings, out: Path):
    """The resumable-state folder beside the output, keyed by the inputs and every setting that matters."""
    from .runstate import Checkpoint, Dist, file_fingerprint
    skip = {"out", "progress", "debug", "checkpoint_every", "memory_gb"}
    key = {k: v for k, v in asdict(s).items() if k not in skip}
    key["chunk_size"] = _chunk_size(s)
    key["files"] = [file_fingerprint(p) for p in _inputs(s)]
    ck = Checkpoint(out.with_name(out.name + ".ntkal-ckpt"), key, Dist.current(), s.checkpoint_every)
    ck.prepare()
    return ck


def _inputs(s: Settings) -> list:
    return [p for p in (s.model, s.train, s.pool, s.target) if p is not None]


def _check_inputs(s: Settings):
    from .errors import InputError
    for what in ("model", "train", "pool", "target"):
        if getattr(s, what) is None:
            continue
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
    inputs = _inputs(s)
    out = Path(s.out or (Path(s.pool).name.split(".")[0] + "_selected.extxyz"))
    check_output_path(out, inputs)
    check_output_path(report_path(out), inputs)
    from .runstate import Dist
    opts = _options(s)
    ckpt = _checkpoint(s, out)
    res = select(s.model, s.train, s.pool, s.budget, method=s.method, shortlist=s.shortlist, mode=s.mode,
                 checkpoint=ckpt, target=s.target, **opts)
    if Dist.current().rank != 0:
        return {"result": res, "out": out, "report": report_path(out)}
    write_extxyz(out, res.atoms, inputs)
    report = {"settings": asdict(s), "versions": versions(), "n_pool": res.n_pool,
              "n_train": res.posterior.n_train, "timings_s": res.timings, "status": res.status,
              "jitter": res.posterior.jitter, "coverage": res.info["featurizer"]["coverage"],
              "posterior": res.posterior.summary(), "featurizer": res.info["featurizer"],
              "shortlist_size": res.info["shortlist_size"],
              "method": res.method, "target": res.info.get("target"),
              "selected": [{"rank": r, "pool_index": int(i), "score": float(sc), "natoms": len(a),
                            "formula": a.get_chemical_formula(),
                            "target_reduction": a.info.get("ntkal_target_reduction")}
                           for r, (i, sc, a) in enumerate(zip(res.indices, res.scores, res.atoms))],
              "world_size": res.info["world_size"], "output": str(out)}
    write_json(report_path(out), report, inputs)
    ckpt.clear()
    return {"result": res, "out": out, "report": report_path(out)}


def run_score(s: Settings) -> dict:
    """ntkal score: every pool structure with its score, streamed to extxyz, plus a JSON report.

    Each scored chunk is first written as its own part file in the checkpoint folder (so a killed run
    resumes where it stopped, and torchrun ranks write their own chunks); rank 0 then joins the parts.
    """
    from .api import annotate, featurizer_for, fit_posterior, scan_pool, target_scorer
    from .io import atomic_output, check_output_path, write_extxyz, write_json
    from .runstate import Dist
    _check_inputs(s)
    inputs = _inputs(s)
    out = Path(s.out)
    check_output_path(out, inputs)
    check_output_path(report_path(out), inputs)
    t0 = time.perf_counter()
    opts = _options(s)
    ckpt = _checkpoint(s, out)
    fz = featurizer_for(s.model, s.kernel, s.sketch_dim, s.params, s.force_probes, s.seed, "auto",
                        opts["dtype"], s.device)
    post = fit_posterior(fz, s.train, s.sigma_e2, s.sigma_f2, s.force_reduce, opts["chunk_size"], s.progress, ckpt)
    scorer = target_scorer(fz, post, s.target, opts["chunk_size"])[0] if s.target else None
    done = {int(p.stem.split("-")[1]) for p in ckpt.folder.glob("part-*.extxyz")}

    def write_part(c, start, chunk, scores, atom_var, red):
        write_extxyz(ckpt.part(c), (annotate(a, start + j, scores[j], atom_var[j], reduction=red[j])
                                    for j, a in enumerate(chunk)), inputs, verify=False)

    _, _, n_pool = scan_pool(fz, post, s.pool, 0, opts["chunk_size"], 0, s.seed, s.progress, None,
                               on_chunk=write_part, skip_chunks=done, scorer=scorer)
    Dist.current().barrier()
    n_chunks = -(-n_pool // opts["chunk_size"])
    if Dist.current().rank != 0:
        return {"out": out, "report": report_path(out), "n": n_pool}
    missing = [c for c in range(n_chunks) if not ckpt.part(c).exists()]
    if missing:
        raise RuntimeError(f"score parts missing for chunks {missing[:5]}")
    with atomic_output(out, inputs) as tmp:
        with _open_output(tmp) as fh:
            for c in range(n_chunks):
                with open(ckpt.part(c), "rb") as part:
                    shutil.copyfileobj(part, fh)
    report = {"settings": asdict(s), "versions": versions(), "n_pool": n_pool, "n_train": post.n_train,
              "resumed_chunks": len(done), "posterior": post.summary(), "featurizer": fz.settings(), "world_size": Dist.current().world,
              "timings_s": {"total": time.perf_counter() - t0}, "output": str(out)}
    write_json(report_path(out), report, inputs)
    ckpt.clear()
    return {"out": out, "report": report_path(out), "n": n_pool}


def _open_output(path: Path):
    """A binary writer for `path`, compressing by its suffix (.gz, .bz2, .xz) as the readers expect."""
    import bz2
    import gzip
    import lzma
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(Path(path).suffix, open)
    return opener(path, "wb")


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
          f"(kernel {s.kernel}, {res.method}) in {time.perf_counter() - t0:.1f} s")
    print(f"{'rank':>4} {'pool':>5} {'formula':>8} {'score':>10} {'max atom var':>12}")
    for r, (i, sc, a, av) in enumerate(zip(res.indices, res.scores, res.atoms, res.atom_variances)):
        mx = "-" if av is None else f"{max(av):.3g}"
        print(f"{r:>4} {int(i):>5} {a.get_chemical_formula():>8} {sc:>10.4g} {mx:>12}")
    print(f"wrote {done['out']}, {done['report']}, {png}")
    return done


def run_experiment(s: Settings) -> dict:
    """ntkal experiment: the active-learning study (ntkal/experiment), then its report."""
    from .experiment.cli import run
    return run(s.config, s.quick, Path(s.out))


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
        import torch
        torch.set_num_threads(max(1, s.threads))
        from .runstate import init_distributed
        init_distributed()
        {"select": run_select, "score": run_score, "demo": run_demo, "experiment": run_experiment}[s.command](s)
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
