"""Command line: `ntkal select | score | evaluate | fit | demo` (options + parser + plan + run, as mace-torch's CLIs).

Every option and input/output file is checked before any model is loaded and before anything is
written; a user error is one line on stderr and exit code 2 (docs/design.md, "Safe on disk").
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from .errors import InputError, NtkalError
from .options import Options, add_arguments, flag


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), like every other ntkal error."""

    def error(self, message):
        self.exit(2, f"ntkal: error: {message}\n")


FILES = {  # file flags: (required, help)
    "model": (True, "pretrained MACE model file (.model)"),
    "train": (True, "labelled training structures (extxyz or ASE .db)"),
    "pool": (True, "candidate pool (extxyz or ASE .db), streamed"),
    "valid": (True, "labelled validation structures (extxyz or ASE .db)"),
    "target": (False, "unlabelled structures where the model will be used: rank candidates by the expected "
                      "reduction of their predictive variance"),
    "pretrain": (False, "a sample of the structures the model was trained on (labels optional, streamed): it "
                        "enters the posterior, so what the model already knows is not novel"),
    "posterior": (False, "a saved posterior (`ntkal fit --out FILE.ntkal`) used instead of fitting on --train and "
                         "--pretrain; the feature and posterior options are then its own"),
}
SELECTION = ("budget", "method", "mode", "shortlist")
MIN_VALID = 3  # evaluate's Spearman and calibration need a few structures
EVALUATE_SKIP = SELECTION + ("kernel", "score", "checkpoint_every")  # options evaluate does not take
FIT_SKIP = SELECTION + ("checkpoint_every",)  # options fit does not take


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = _Parser(prog="ntkal", description="Force-aware NTK active learning for MACE potentials: pick the "
                                               "structures worth a DFT calculation.")
    parser.add_argument("--version", action="version", version=f"ntkal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{select,score,evaluate,fit,demo,md}")
    parser.commands = {}  # name -> its subparser (given_flags)

    def command(name, help, description, files, out, skip=(), defaults=None):
        p = parser.commands[name] = sub.add_parser(name, help=help, description=description)
        for f in files:  # --train is not required where --posterior can stand for it
            p.add_argument(flag(f), required=FILES[f][0] and not (f == "train" and "posterior" in files), default=None,
                           help=FILES[f][1])
        add_arguments(p.add_argument_group("options"), skip=skip, defaults=defaults)
        p.add_argument("--out", **out)
        p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        return p

    command("select", "pick a batch of pool structures to label",
            "Pick --budget pool structures to label; writes them as extxyz (input keys kept, ntkal_* keys added) "
            "and a JSON report OUT.json beside it.", ("model", "train", "pool", "target", "pretrain", "posterior"),
            {"default": None, "help": "output extxyz (default: <pool name>_selected.extxyz here)"})
    command("score", "score every pool structure",
            "Write every pool structure with its score (streamed) and a report OUT.json.",
            ("model", "train", "pool", "target", "pretrain", "posterior"), {"required": True, "help": "output extxyz"},
            SELECTION)
    p = command("evaluate", "how good are the predicted errors on a labelled validation set",
                "Fit on --train, predict the model's errors on the labelled --valid structures with each kernel "
                "and score, and compare with the real errors: Spearman, miscalibration area, 95 %% coverage, "
                "binned RMSE (OUT/evaluate.json, .png); with --posterior, of its kernel only.",
                ("model", "train", "valid", "pretrain", "posterior"),
                {"default": "ntkal-evaluate", "help": "output directory (default ./ntkal-evaluate)"},
                EVALUATE_SKIP)
    p.add_argument("--kernels", default="energy,force,joint", help="comma-separated kernels (default energy,force,joint)")
    p.add_argument("--scores", default="error,pv", help="comma-separated scores (default error,pv)")
    command("fit", "fit the posterior once and save it (FILE.ntkal) for score/select/evaluate --posterior",
            "Fit the posterior on --train (and --pretrain) and save it with the LCMD centres, the score, the "
            "feature settings and a hash of the model's weights (safetensors + JSON, no pickle).",
            ("model", "train", "pretrain"), {"required": True, "help": "output file, name ending in .ntkal"}, FIT_SKIP)
    # 8 probes keep Spearman 0.97 to exact at 0.28x the cost (bench/RESULTS.md, probes)
    command("demo", "select from the shipped Si data with the shipped model",
            "Run `select` on the shipped PyXtal_FF Si pool with the shipped small MACE; the pool is labelled, so "
            "predicted errors are shown beside the real ones.", (),
            {"default": "ntkal-demo", "help": "output directory (default ./ntkal-demo)"},
            defaults={"budget": 20, "force_probes": 8})
    from .dynamics import add_parser as add_md_parser  # ntkal md: its own flags (ntkal/dynamics.py)
    add_md_parser(sub)

    return parser


# ------------------------------------------------------------------------------------------------
# plan: every check that needs no model, before anything is loaded or written

@dataclass
class Plan:
    command: str
    opts: Options
    inputs: dict = field(default_factory=dict)   # name -> Path (model, train, pool, target, pretrain, valid)
    surveys: dict = field(default_factory=dict)  # name -> ntkal.io.Survey of each structure file
    out: Optional[Path] = None
    plots: dict = field(default_factory=dict)    # name -> Path
    saved: Optional[object] = None               # --posterior: ntkal.saved.SavedPosterior, read and checked

    @property
    def report(self) -> Path:
        return self.out if self.command == "evaluate" else report_path(self.out)

    @property
    def checkpoint(self) -> Path:
        return self.out.with_name(self.out.name + ".ntkal-ckpt")


def report_path(out: Path) -> Path:
    """The JSON report beside an output: its exact name + '.json' (picks.extxyz -> picks.extxyz.json)."""
    return out.with_name(out.name + ".json")


def plan(args) -> Plan:
    """Options checked, inputs present and readable, outputs writable and not someone else's."""
    if args.command == "md":  # ntkal md plans its own inputs and outputs (ntkal/dynamics.py)
        from .dynamics import plan_cli
        return plan_cli(args)
    from .io import check_extxyz_name, check_output_path, survey, writable_folder
    from .runstate import claim
    names = {f.name for f in dataclasses.fields(Options)}
    opts = Options(**{k: v for k, v in vars(args).items() if k in names})
    p = Plan(args.command, opts.validate(target=getattr(args, "target", None) is not None))
    for what in FILES:
        if getattr(args, what, None) is not None:
            path = p.inputs[what] = Path(getattr(args, what)).expanduser()
            if not path.is_file():
                raise InputError(f"{flag(what)}: {'not a file' if path.exists() else 'no such file'}", path=path)
    if p.command in ("select", "score", "evaluate"):
        _posterior_plan(p, args)
    if p.command == "demo":
        from .data import demo_files
        p.inputs = {k: v for k, v in demo_files().items() if k in ("model", "train", "pool")}
    folder = None if args.out is None else Path(args.out).expanduser()
    if p.command in ("demo", "evaluate") and folder.exists() and not folder.is_dir():
        raise InputError(f"--out of {p.command} must be a directory", path=folder)
    if p.command == "demo":
        p.out, p.plots = folder / "selected.extxyz", {"scores": folder / "scores.png", "errors": folder / "errors.png"}
    elif p.command == "evaluate":
        p.out, p.plots = folder / "evaluate.json", {"reliability": folder / "evaluate.png"}
    elif p.command == "fit":
        from .saved import check_out
        p.out = check_out(folder, list(p.inputs.values()))
    else:
        p.out = folder or Path(p.inputs["pool"].name.split(".")[0] + "_selected.extxyz")
        check_extxyz_name(p.out)
    if p.opts.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but no CUDA device is available")
    if p.command != "fit" and (p.command in ("select", "score") or p.out.parent.exists()):  # demo/evaluate: later
        outputs = {"--out": p.out, "report": p.report, **p.plots}
        if p.command != "evaluate":
            outputs["checkpoint folder"] = p.checkpoint
        for what, path in outputs.items():
            if what != "checkpoint folder":
                try:
                    check_output_path(path, list(p.inputs.values()))
                except InputError as exc:
                    raise InputError(f"{what}: {exc}") from None
            claim(path, what)
    writable_folder(p.out.parent)
    for what, path in p.inputs.items():  # every structure file read through once, before the model loads
        if what not in ("model", "posterior"):
            try:
                p.surveys[what] = survey(path, labels=what in ("train", "pretrain", "valid"))
            except InputError as exc:
                raise InputError(f"{flag(what)}: {exc}") from None
            if p.surveys[what].count == 0:
                raise InputError(f"{flag(what)}: the file holds no structures", path=path)
    if "pool" in p.inputs and p.command in ("select", "demo") \
            and p.opts.budget > p.surveys["pool"].count:
        raise InputError(f"--budget {p.opts.budget} is larger than the pool ({p.surveys['pool'].count} structures "
                         f"in {p.inputs['pool']})")
    if p.command == "evaluate" and p.surveys["valid"].count < MIN_VALID:
        raise InputError(f"--valid: {p.surveys['valid'].count} structures; evaluate needs at least {MIN_VALID} "
                         "to rank and calibrate predicted errors", path=p.inputs["valid"])
    return p


def _posterior_plan(p: Plan, args):
    """--posterior stands for --train/--pretrain (one of --train, --posterior is needed, not both): the state is
    read and checked (format, digest) and the options its fit fixed are taken from it, before the model loads;
    its weights hash is checked right after (_featurizer)."""
    fitted = [f for f in ("train", "pretrain") if f in p.inputs]
    if "posterior" not in p.inputs:
        if "train" not in p.inputs:
            raise InputError("one of --train or --posterior is required")
        return
    if fitted:
        raise InputError(f"--posterior and {flag(fitted[0])} cannot be given together: the posterior holds what "
                         "--train and --pretrain would fit")
    from .saved import load, options_for
    p.saved = load(p.inputs["posterior"])
    given = getattr(args, "given", None)
    if given is None:  # not from main(): options that differ from their defaults count as given
        given = {f.name for f in dataclasses.fields(Options) if getattr(p.opts, f.name) != f.default}
    p.opts = Options(**options_for(p.saved, dataclasses.asdict(p.opts), given, f"--posterior {p.inputs['posterior']}"))
    p.opts.validate(target="target" in p.inputs)


# ------------------------------------------------------------------------------------------------
# run

def _checkpoint(p: Plan):
    from .runstate import Checkpoint, Dist, file_fingerprint
    key = {"command": p.command, "options": p.opts.key(),
           "files": {k: file_fingerprint(v) for k, v in p.inputs.items()}}
    return Checkpoint(p.checkpoint, key, Dist.current(), p.opts.checkpoint_every)


def _featurizer(p: Plan):
    """The model's featurizer; every structure file's elements checked against the model before any work."""
    from .acquisition.pipeline import featurizer_for
    fz = featurizer_for(p.inputs["model"], p.opts)
    for what, found in p.surveys.items():
        try:
            found.check_elements(fz.atomic_numbers, p.inputs[what])
        except InputError as exc:
            raise InputError(f"{flag(what)}: {exc}") from None
    if p.saved is not None:  # the posterior's weights hash, right after the model loads
        p.saved.check(fz, f"--posterior {p.inputs['posterior']}")
    return fz


def _report(p: Plan, body: dict) -> dict:
    from . import __version__
    from .provenance import versions
    return {"written_by": f"ntkal {__version__}", "command": p.command, "output": str(p.out),
            "inputs": {k: str(v) for k, v in p.inputs.items()}, "options": dataclasses.asdict(p.opts),
            "versions": versions(), **body}


def run_select(p: Plan, args, on_chunk=None) -> dict:
    """ntkal select: the picks as extxyz plus a JSON report."""
    from .acquisition.pipeline import Pipeline
    from .io import write_extxyz, write_json
    fz = _featurizer(p)
    with _checkpoint(p) as ckpt:
        res = Pipeline(p.opts, fz, args.progress, ckpt).select(p.inputs.get("train"), p.inputs["pool"],
                                                               p.inputs.get("target"), on_chunk=on_chunk,
                                                               pretrain=p.inputs.get("pretrain"), posterior=p.saved)
        if ckpt.dist.rank == 0:
            inputs = list(p.inputs.values())
            write_extxyz(p.out, res.atoms, inputs)
            write_json(p.report, _report(p, {
                "n_pool": res.n_pool, "n_train": res.posterior.n_train, "score": res.info["score"],
                "timings_s": res.timings, "status": res.status, "method": res.method, "jitter": res.posterior.jitter,
                "coverage": res.info["featurizer"]["coverage"], "posterior": res.posterior.summary(),
                "featurizer": res.info["featurizer"], "shortlist_size": res.info["shortlist_size"],
                "world_size": res.info["world_size"], "target": res.info.get("target"),
                "selected": [{"rank": r, "pool_index": int(c.index), "formula": a.get_chemical_formula(),
                              "natoms": len(a), **{k: float(v) for k, v in c.values.items()}}
                             for r, (c, a) in enumerate(zip(res.picks, res.atoms))]}), inputs)
    return {"result": res, "out": p.out, "report": p.report}


def run_evaluate(p: Plan, args) -> dict:
    """ntkal evaluate: predicted vs real errors on a labelled validation set (JSON + reliability plot)."""
    from .evaluate import evaluate, plot
    from .io import write_json
    opts = {k: v for k, v in dataclasses.asdict(p.opts).items() if k not in EVALUATE_SKIP}
    kernels = None if p.saved is not None and "kernels" not in getattr(args, "given", {"kernels"}) \
        else args.kernels.split(",")  # with --posterior: its kernel
    results = evaluate(p.inputs["model"], p.inputs.get("train"), p.inputs["valid"], kernels,
                       args.scores.split(","), p.inputs.get("pretrain"), args.progress, p.saved, **opts)
    p.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(p.out, _report(p, {"results": results}), list(p.inputs.values()))
    plot(results, p.plots["reliability"], f"{p.inputs['valid'].name}: real vs predicted errors")
    for kernel, by_score in results.items():
        for score, parts in by_score.items():
            if score == "calibration":
                continue
            line = "  ".join(f"{part} Spearman {m['spearman']:.2f} "
                             f"median pred/real {m['median_ratio'] or float('nan'):.2f}"
                             + (f" cov95 {m['coverage_95']:.2f} miscal {m['miscalibration_area']:.3f}"
                                if "coverage_95" in m else "") for part, m in parts.items())
            print(f"{kernel:>9} {score:>5}: {line}")
    print(f"wrote {p.out}, {p.plots['reliability']}")
    return {"results": results}


def run_score(p: Plan, args) -> dict:
    """ntkal score: every pool structure with its score, streamed to extxyz, plus a JSON report.

    Each scored chunk is first written as its own part file (named with the run key) in the checkpoint
    folder, so a killed run resumes where it stopped and torchrun ranks write their own chunks; rank 0
    then joins the parts.
    """
    import shutil
    from .acquisition.pipeline import Pipeline
    from .api import scored_atoms
    from .io import atomic_output, write_extxyz, write_json
    from .io.read import file_kind, open_text
    t0 = time.perf_counter()
    inputs = list(p.inputs.values())
    fz = _featurizer(p)
    with _checkpoint(p) as ckpt:
        pipe = Pipeline(p.opts, fz, args.progress, ckpt)
        post = pipe.fit(p.inputs["train"], p.inputs.get("pretrain")) if p.saved is None else pipe.use(p.saved)
        done = ckpt.parts_done()
        for c, start, atoms, _, scored in pipe.scored_chunks(p.inputs["pool"], pipe.scorer(post, p.inputs.get("target")),
                                                             skip=done):
            write_extxyz(ckpt.part(c), scored_atoms(start, atoms, scored), inputs, verify=False)
            ckpt.seal(ckpt.part(c))
            ckpt.saved = True
        ckpt.dist.barrier()
        n_chunks = -(-pipe.n_pool // p.opts.chunk())
        if ckpt.dist.rank == 0:
            parts = [ckpt.part(c) for c in range(n_chunks)]
            missing = [c for c, part in enumerate(parts) if not ckpt.sealed(part)]
            if missing:  # a part removed or changed while the run went on: never join it
                raise NtkalError(f"score parts missing or changed for chunks {missing[:5]} in {ckpt.folder}; "
                                 "run the same command again to redo them")
            with atomic_output(p.out, inputs) as tmp, open_text(tmp, "w", file_kind(p.out)[1]) as fh:
                for part in parts:
                    with open(part, encoding="utf-8") as src:
                        shutil.copyfileobj(src, fh)
            write_json(p.report, _report(p, {
                "n_pool": pipe.n_pool, "n_train": post.n_train, "resumed_chunks": len(done),
                "posterior": post.summary(), "featurizer": fz.settings(), "world_size": ckpt.dist.world,
                "timings_s": {"total": time.perf_counter() - t0}}), inputs)
    return {"out": p.out, "report": p.report, "n": pipe.n_pool}


def run_fit(p: Plan, args) -> dict:
    """ntkal fit: the posterior fitted once and saved (ntkal.saved) for score/select/evaluate --posterior."""
    from .acquisition.pipeline import Pipeline
    from .saved import build, save
    fz = _featurizer(p)
    pipe = Pipeline(p.opts, fz, args.progress)
    post = pipe.fit(p.inputs["train"], p.inputs.get("pretrain"))
    saved = build(pipe, post, p.inputs)
    save(p.out, saved, list(p.inputs.values()))
    s = post.summary()
    pretrain = f" and a pretraining sample of {p.surveys['pretrain'].count}" if "pretrain" in p.inputs else ""
    print(f"ntkal fit: posterior of {post.n_train} labelled structures{pretrain} (kernel {fz.kernel}, sketch "
          f"{fz.sketch_dim}, params {fz.params}, score {pipe.score}, jitter {s['jitter']:g}); calibration: "
          f"{s['calibration'] or 'none (no labelled residuals)'}; model weights {saved.model_hash[:12]}…; wrote "
          f"{p.out} ({p.out.stat().st_size} bytes). Use it with `ntkal score|select|evaluate --posterior {p.out}`.")
    return {"out": p.out, "saved": saved}


def run_demo(p: Plan, args) -> dict:
    """ntkal demo: select on the shipped Si pool with the shipped model; the pool is labelled, so each pick's
    predicted force error is printed beside the real one, and the whole pool's are plotted."""
    import numpy as np
    p.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seen = []
    done = run_select(p, args, on_chunk=lambda c, start, atoms, scored: seen.append(scored.values))
    res = done["result"]
    plot_scores(res, p.plots["scores"])
    real = real_force_errors(p.inputs["model"], p.inputs["pool"], p.opts)
    print(f"ntkal demo: picked {len(res.indices)} of {res.n_pool} Si structures "
          f"(kernel {p.opts.kernel}, score {res.info['score']}, {res.method}) in {time.perf_counter() - t0:.1f} s")
    print(f"{'rank':>4} {'pool':>5} {'formula':>8} {'score':>10} {'predicted F err':>16} {'real F err':>11} "
          f"{'pred/real':>9}")
    for r, (c, a) in enumerate(zip(res.picks, res.atoms)):
        pred = c.values.get("force_error")
        print(f"{r:>4} {int(c.index):>5} {a.get_chemical_formula():>8} {c.values['score']:>10.4g} "
              f"{'-' if pred is None else f'{pred:.0f} meV/A':>16} {real[c.index]:>6.0f} meV/A "
              f"{'-' if pred is None else f'{pred / max(real[c.index], 1e-9):.2f}':>9}")
    print(f"real force error (RMS per structure, meV/A): picks {np.mean(real[res.indices]):.0f}, "
          f"pool {np.mean(real):.0f} (x{np.mean(real[res.indices]) / np.mean(real):.2f})")
    if seen and "force_error" in seen[0]:
        predicted = np.concatenate([v["force_error"] for v in seen])
        from .evaluate import NO_RATIO_BELOW
        ok = real >= NO_RATIO_BELOW
        print(f"predicted/real force error per structure (the predicted error is the median real error of "
              f"structures so predicted): median {np.median(predicted[ok] / real[ok]):.2f} over the pool, "
              f"{np.median(predicted[res.indices] / np.maximum(real[res.indices], 1e-9)):.2f} over the picks")
        plot_errors(predicted, real, res.indices, p.plots["errors"])
    print(f"wrote {done['out']}, {done['report']}, " + ", ".join(str(x) for x in p.plots.values() if x.exists()))
    return done


def real_force_errors(model, pool, opts):
    """RMS force-component error (meV/Å) of the model on every labelled pool structure, in pool order."""
    import numpy as np
    from .acquisition.pipeline import featurizer_for
    from .io import read_structures
    atoms = list(read_structures(pool))
    _, forces = featurizer_for(model, opts).predict(atoms)
    return np.array([1e3 * np.sqrt(np.mean((a.arrays["REF_forces"] - f) ** 2)) for a, f in zip(atoms, forces)])


def plot_errors(predicted, real, picks, path: Path):
    """Predicted vs real force error of every pool structure, picks marked."""
    from scipy.stats import spearmanr
    from .io.write import figure, save_png
    fig, ax = figure(figsize=(4.5, 4))
    ax.scatter(predicted, real, s=6, color="0.6", label=f"pool (Spearman {spearmanr(predicted, real)[0]:.2f})")
    ax.scatter(predicted[picks], real[picks], s=14, color="C3", label=f"picked ({len(picks)})")
    lo, hi = 1.0, max(predicted.max(), real.max())  # below 1 meV/Å: symmetric cells with zero forces
    ax.plot([lo, hi], [lo, hi], color="0.3", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 2 * hi)
    ax.set_ylim(lo, 2 * hi)
    ax.set_xlabel("predicted force error (meV/Å)")
    ax.set_ylabel("real force error of the model (meV/Å)")
    ax.legend(frameon=False, fontsize=8)
    save_png(fig, path)


def plot_scores(res, path: Path):
    """Histogram of the shortlist's scores with the picks marked."""
    import numpy as np
    from .io.write import figure, save_png
    scores = np.asarray(res.shortlist_scores)
    fig, ax = figure(figsize=(6, 3.5))
    bins = np.logspace(np.log10(max(scores.min(), 1e-12)), np.log10(scores.max()), 40)
    ax.hist(scores, bins=bins, color="0.7", label=f"shortlisted pool ({len(scores)})")
    ax.hist(res.scores, bins=bins, color="C3", label=f"picked by {res.method} ({len(res.scores)})")
    ax.set_xscale("log")
    ax.set_xlabel(f"{res.info['score']} score")
    ax.set_ylabel("structures")
    ax.legend(frameon=False)
    save_png(fig, path)


def _import_quietly():
    """Import mace and e3nn without their import-time noise (mace prints a line about cuequivariance,
    e3nn warns about torch.load), so an error stays one line."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        import mace  # noqa: F401  (before e3nn)
        import mace.tools  # noqa: F401
        import e3nn.o3  # noqa: F401




_UNSET = object()


def given_flags(argv: Optional[List[str]] = None) -> set:
    """The dests of the options given on the command line, not left at their defaults (argv parsed once more,
    every default replaced by a marker). A setting --posterior fixes may be given only with the state's value."""
    parser = build_parser()
    names = {f.name for f in dataclasses.fields(Options)} | set(FILES) | {"kernels", "scores", "out"}
    for sub in parser.commands.values():
        sub.set_defaults(**{name: _UNSET for name in names})
    return {k for k, v in vars(parser.parse_args(argv)).items() if v is not _UNSET and k in names}


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed as one line
        return int(exc.code or 0)
    args.given = given_flags(argv)
    try:
        p = plan(args)
        _import_quietly()
        import torch
        torch.set_num_threads(p.opts.threads)
        from .runstate import init_distributed
        init_distributed()
        if p.command == "md":
            from .dynamics import run_cli
            run_cli(p, args)
            return 0
        {"select": run_select, "score": run_score, "demo": run_demo, "evaluate": run_evaluate,
         "fit": run_fit}[p.command](p, args)
    except NtkalError as exc:
        if args.debug:
            raise
        print(f"ntkal: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ntkal: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unexpected failure: one line unless --debug
        if args.debug:
            raise
        print(f"ntkal: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
