"""`ntkal md` and ntkal.md: molecular dynamics with ntkal.Calculator, keeping the frames whose predicted error
passes a threshold (docs/design.md, "During MD").

CURATOR's low/high scheme: every starting structure runs one trajectory (Langevin NVT, or Langevin NPT with
ASE's LangevinBAOAB barostat for 3-D periodic cells); a frame whose predicted force error (meV/Å) is above
`lower` is written to an extxyz pool, at most one frame every `every` steps; a trajectory stops when the
error passes `upper` (that frame is written too, marked ntkal_md_stop="upper"). Thresholds act only on
steps whose error was computed at that step (with error_every=k: every k-th step). The pool is streamed to a
temporary file and moved into place at the end; beside it OUT.json (frames visited, kept and why, stop
reasons, steps per second) and OUT.png (predicted force error against time, thresholds drawn). Memory stays
flat: frames are written as they come, the plotted series are thinned as they grow.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import InputError
from .options import Options, _bad, _number, flag

ENSEMBLES = ("nvt", "npt")
SERIES_POINTS = 2000  # at most this many points per trajectory in the plot (thinned by halves)


@dataclass
class MDSettings:
    """The settings of an MD run, each with its flag (--temperature, ...) and check (validate)."""

    ensemble: str = "nvt"
    temperature: float = 300.0          # K
    timestep: float = 1.0               # fs
    friction: float = 0.01              # 1/fs (Langevin)
    steps: int = 1000                   # per trajectory
    pressure: Optional[float] = None    # GPa, npt only (default 0)
    lower: float = 0.0                  # meV/Å: write frames with a predicted force error above it
    upper: Optional[float] = None       # meV/Å: stop a trajectory above it
    every: int = 10                     # at most one written frame every this many steps
    error_every: int = 1                # compute the error every this many steps
    force_probes: Optional[int] = 8     # probe rows per step (None: exact 3N rows)
    seed: int = 0

    def validate(self) -> "MDSettings":
        """InputError naming the flag of the first bad setting."""
        if self.ensemble not in ENSEMBLES:
            _bad("ensemble", f"must be one of {', '.join(ENSEMBLES)}, got {self.ensemble!r}")
        for name, lo, strict in (("temperature", 0.0, False), ("timestep", 0.0, True), ("friction", 0.0, True),
                                 ("lower", 0.0, False)):
            v = getattr(self, name)
            if not _number(v) or v < lo or (strict and v == lo):
                _bad(name, f"must be a number {'>' if strict else '>='} {lo:g}, got {v!r}")
        for name in ("steps", "every", "error_every", "seed") + (("force_probes",) if self.force_probes is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or (name != "seed" and v < 1):
                _bad(name, f"must be {'an integer' if name == 'seed' else 'a positive integer'}, got {v!r}")
        if self.upper is not None and not (_number(self.upper) and self.upper > self.lower):
            _bad("upper", f"must be a number above --lower ({self.lower:g}), got {self.upper!r}")
        if self.pressure is not None:
            if self.ensemble != "npt":
                _bad("pressure", "needs --ensemble npt")
            if not _number(self.pressure):
                _bad("pressure", f"must be a number (GPa), got {self.pressure!r}")
        return self


# ------------------------------------------------------------------------------------------------
# plan: every check that needs no model

@dataclass
class MDPlan:
    command: str
    opts: Options                  # device, threads (main() sets the threads from it)
    settings: MDSettings
    inputs: dict                   # model, posterior, structures: Paths (structures may be a list of Atoms)
    starts: list                   # the starting structures
    out: Path
    report: Path
    plot: Path
    saved: object = None           # the SavedPosterior (read before the model loads)
    dtype: Optional[str] = None


def plan(model, posterior, structures, out, settings: MDSettings, device: Optional[str] = None,
         threads: int = 1, dtype: Optional[str] = None, command: str = "md") -> MDPlan:
    """Settings, input files, the starting structures (read, non-empty, periodic for npt), the outputs (an
    extxyz name, beside it .json and .png, none of them an input or a file ntkal did not write) and the
    saved posterior (readable, with a residual model and force rows): all before the model loads."""
    from .io import check_extxyz_name, check_output_path, read_structures, writable_folder
    from .runstate import claim
    settings.validate()
    opts = Options(device=device or "cpu", threads=threads).validate()
    inputs = {}
    for what, value in (("model", model), ("posterior", posterior), ("structures", structures)):
        if isinstance(value, (str, Path)):
            path = inputs[what] = Path(value).expanduser()
            if not path.is_file():
                raise InputError(f"{flag(what)}: {'not a file' if path.exists() else 'no such file'}", path=path)
    if out is None:
        raise InputError("--out is required (the extxyz pool of kept frames)")
    out = Path(out).expanduser()
    check_extxyz_name(out)
    report, png = out.with_name(out.name + ".json"), out.with_name(out.name + ".png")
    for what, path in (("--out", out), ("report", report), ("plot", png)):
        try:
            check_output_path(path, list(inputs.values()))
        except InputError as exc:
            raise InputError(f"{what}: {exc}") from None
        claim(path, what)
    if opts.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but no CUDA device is available")
    writable_folder(out.parent)
    try:
        starts = list(read_structures(structures)) if "structures" in inputs else [a.copy() for a in structures]
    except InputError as exc:
        raise InputError(f"--structures: {exc}") from None
    if not starts:
        raise InputError("--structures: the file holds no structures", path=inputs.get("structures"))
    if settings.ensemble == "npt":
        for i, a in enumerate(starts):
            if not (np.all(a.pbc) and a.cell.rank == 3):
                raise InputError("--ensemble npt needs a 3-D periodic cell", path=inputs.get("structures"), index=i)
    saved = None
    if "posterior" in inputs:
        from .saved import load
        saved = load(inputs["posterior"])
        check_posterior(saved.posterior, saved.features.get("kernel"), f"--posterior {inputs['posterior']}")
    return MDPlan(command, opts, settings, inputs, starts, out, report, png, saved, dtype)


def check_posterior(post, kernel: Optional[str], what: str = "the posterior"):
    """InputError unless the posterior predicts force errors: a residual model and force rows."""
    from .calculator import NO_RESIDUALS
    if post.residual is None:
        raise InputError(f"{what}: {NO_RESIDUALS}")
    if kernel not in ("force", "joint") or "force" not in post.kinds:
        raise InputError(f"{what}: kernel {kernel!r} has no force rows; --lower/--upper are predicted force errors, "
                         "so fit with --kernel joint (or force)")


# ------------------------------------------------------------------------------------------------
# run

class Series:
    """(time, value) points of one trajectory, at most SERIES_POINTS: when full, every other point is dropped
    and only every stride-th point is taken after (memory flat in the run length)."""

    def __init__(self, cap: int = SERIES_POINTS):
        self.cap, self.stride, self.n, self.t, self.v = cap, 1, 0, [], []

    def add(self, t: float, v: float):
        if self.n % self.stride == 0:
            self.t.append(t)
            self.v.append(v)
            if len(self.t) >= self.cap:
                self.t, self.v, self.stride = self.t[::2], self.v[::2], 2 * self.stride
        self.n += 1


def make_dynamics(atoms, s: MDSettings, rng):
    """Langevin NVT (ase.md.langevin) or Langevin NPT (ase.md.langevinbaoab, hydrostatic, --pressure GPa)."""
    from ase import units
    if s.ensemble == "nvt":
        from ase.md.langevin import Langevin
        return Langevin(atoms, s.timestep * units.fs, temperature_K=s.temperature, friction=s.friction / units.fs,
                        rng=rng)
    from ase.md.langevinbaoab import LangevinBAOAB
    return LangevinBAOAB(atoms, s.timestep * units.fs, temperature_K=s.temperature,
                         externalstress=-(s.pressure or 0.0) * units.GPa, hydrostatic=True,
                         T_tau=units.fs / s.friction, rng=rng)


def frames(calc, starts, s: MDSettings, summary: dict, series: list, progress: bool = False):
    """The MD run: yields the frames to keep, annotated, as they come; fills `summary` (per trajectory) and
    `series` (one Series per trajectory)."""
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from tqdm.auto import tqdm
    from .calculator import ATOM_FORCE_ERROR, ENERGY_ERROR, ERROR_AGE, FORCE_ERROR
    bar = tqdm(total=len(starts) * (s.steps + 1), desc="md", unit="step", disable=not progress, smoothing=0.1)
    written = 0
    try:
        for i, start in enumerate(starts):
            atoms = start.copy()
            atoms.calc = calc
            calc.reset()  # a new trajectory: its first step computes the error
            rng = np.random.default_rng([s.seed, i])
            if s.temperature > 0:
                MaxwellBoltzmannDistribution(atoms, temperature_K=s.temperature, rng=rng)
                Stationary(atoms)
            dyn = make_dynamics(atoms, s, rng)
            traj = {"index": i, "formula": start.get_chemical_formula(), "natoms": len(start), "steps": 0,
                    "stop": "steps", "stop_step": None, "visited": 0, "kept": 0, "above_lower_too_soon": 0,
                    "below_lower": 0, "max_force_error": 0.0}
            line = Series()
            series.append(line)
            last, t0 = None, time.perf_counter()
            for _ in dyn.irun(s.steps):
                step = dyn.nsteps
                traj["steps"] = step
                bar.update(1)
                res = calc.results
                if not np.isfinite(res["energy"]) or not np.all(np.isfinite(res["forces"])):
                    traj["stop"], traj["stop_step"] = "non-finite energy or forces", step
                    break
                if res[ERROR_AGE] != 0:
                    continue
                err = float(res[FORCE_ERROR])
                traj["visited"] += 1
                traj["max_force_error"] = max(traj["max_force_error"], err)
                line.add(step * s.timestep, err)
                bar.set_postfix(traj=i, force_error=f"{err:.0f} meV/Å", refresh=False)
                stop = s.upper is not None and err > s.upper
                if stop or (err > s.lower and (last is None or step - last >= s.every)):
                    frame = _frame(atoms, res, i, step, s, written, stop, (ENERGY_ERROR, FORCE_ERROR),
                                   ATOM_FORCE_ERROR)
                    written += 1
                    traj["kept"] += 1
                    last = step
                    yield frame
                elif err > s.lower:
                    traj["above_lower_too_soon"] += 1
                else:
                    traj["below_lower"] += 1
                if stop:
                    traj["stop"], traj["stop_step"] = "upper", step
                    break
            wall = time.perf_counter() - t0
            traj["wall_s"] = wall
            traj["steps_per_s"] = traj["steps"] / wall if wall > 0 else None
            summary["trajectories"].append(traj)
    finally:
        bar.close()


def _frame(atoms, res, traj: int, step: int, s: MDSettings, index: int, stop: bool, names, atom_name):
    """A copy of the MD frame without the start's labels, annotated with the ntkal_* keys."""
    frame = atoms.copy()  # no calculator
    for key in [k for k in frame.info if k.startswith(("REF_", "ntkal_"))]:
        del frame.info[key]
    for key in [k for k in frame.arrays if k.startswith(("REF_", "ntkal_"))]:
        del frame.arrays[key]
    frame.info.update({n: float(res[n]) for n in names if n in res})
    frame.info.update({"ntkal_pool_index": index, "ntkal_md_trajectory": traj, "ntkal_md_step": step,
                       "ntkal_md_time_fs": step * s.timestep})
    if stop:
        frame.info["ntkal_md_stop"] = "upper"
    if atom_name in res:
        frame.arrays[atom_name] = np.asarray(res[atom_name], dtype=np.float64)
    return frame


def run(p: MDPlan, model, progress: bool = False, featurizer=None, posterior=None) -> dict:
    """Run the plan: the calculator, every trajectory, the pool, OUT.json and OUT.png. Returns the summary."""
    from . import __version__
    from .calculator import Calculator
    from .io import write_extxyz, write_json
    from .provenance import versions
    s = p.settings
    if featurizer is not None:
        calc = Calculator(featurizer, posterior, force_probes=s.force_probes, error_every=s.error_every)
    else:
        calc = Calculator(model, p.saved, force_probes=s.force_probes, error_every=s.error_every,
                          device=p.opts.device, dtype=p.dtype)
    check_posterior(calc.posterior, calc.featurizer.kernel)
    fz = calc.featurizer
    for i, a in enumerate(p.starts):
        try:
            fz.check_elements([a])
        except InputError as exc:
            raise InputError(f"--structures: {exc}", path=p.inputs.get("structures"), index=i) from None
    summary = {"trajectories": []}
    series: list = []
    t0 = time.perf_counter()
    inputs = [v for v in p.inputs.values()]
    n = write_extxyz(p.out, frames(calc, p.starts, s, summary, series, progress), inputs)
    wall = time.perf_counter() - t0
    if n == 0:  # an empty extxyz is no pool (select refuses it) and would not be recognised as ntkal's
        p.out.unlink(missing_ok=True)
    steps = sum(t["steps"] for t in summary["trajectories"])
    body = {"written_by": f"ntkal {__version__}", "command": p.command, "output": str(p.out) if n else None,
            "inputs": {k: str(v) for k, v in p.inputs.items()}, "settings": dataclasses.asdict(s),
            "device": p.opts.device, "threads": p.opts.threads,
            "calculator": {"kernel": fz.kernel, "sketch_dim": fz.sketch_dim, "force_probes": fz.force_probes,
                           "impl": fz.impl, "dtype": str(fz.dtype).replace("torch.", ""),
                           "error_every": calc.error_every, "calls": calc.n_calls, "errors_computed": calc.n_evaluated},
            "frames_written": n, "steps": steps, "wall_s": wall, "steps_per_s": steps / wall if wall > 0 else None,
            "stops": {r: sum(t["stop"] == r for t in summary["trajectories"])
                      for r in sorted({t["stop"] for t in summary["trajectories"]})},
            "trajectories": summary["trajectories"], "plot": str(p.plot), "versions": versions()}
    plot(series, s, p.plot, f"{len(p.starts)} trajector{'y' if len(p.starts) == 1 else 'ies'}, {s.ensemble} "
                            f"{s.temperature:g} K")
    write_json(p.report, body, inputs)
    calc.close()
    return body


def plot(series, s: MDSettings, path: Path, title: str):
    """Predicted force error against time per trajectory, with --lower and --upper."""
    from .io.write import figure, save_png
    fig, ax = figure(figsize=(6, 3.5))
    for i, line in enumerate(series):
        ax.plot(np.asarray(line.t) / 1000.0, line.v, lw=0.8, label=f"trajectory {i}" if len(series) <= 8 else None)
    if s.lower > 0:
        ax.axhline(s.lower, color="0.4", ls="--", lw=0.8, label=f"--lower {s.lower:g}")
    if s.upper is not None:
        ax.axhline(s.upper, color="C3", ls="--", lw=0.8, label=f"--upper {s.upper:g}")
    ax.set_xlabel("time (ps)")
    ax.set_ylabel("predicted force error (meV/Å)")
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, fontsize=7)
    save_png(fig, path)


def md(model, posterior, structures, out, *, progress: bool = False, device: Optional[str] = None,
       dtype: Optional[str] = None, threads: Optional[int] = None, **settings) -> dict:
    """MD from each starting structure with ntkal.Calculator; the frames whose predicted force error passes
    `lower` written to the extxyz `out` (at most one every `every` steps), a trajectory stopped above `upper`;
    OUT.json (returned) and OUT.png beside it.

    model: a MACE .model path or nn.Module, or a MACEFeaturizer (then posterior is the ntkal.Posterior fitted
    with it); posterior: a saved posterior (`ntkal fit --out state.ntkal`) or a SavedPosterior; structures: an
    extxyz / ASE .db path or a list of ase.Atoms. settings: those of MDSettings (ensemble, temperature K,
    timestep fs, friction 1/fs, steps, pressure GPa, lower / upper meV/Å, every, error_every, force_probes,
    seed). Everything is checked before the model loads (InputError naming the flag)."""
    from .features import MACEFeaturizer
    from .posterior import Posterior
    names = {f.name for f in dataclasses.fields(MDSettings)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise TypeError(f"unknown setting {unknown[0]!r} (known: {', '.join(sorted(names))})")
    s = MDSettings(**settings)
    if isinstance(model, MACEFeaturizer):
        if not isinstance(posterior, Posterior):
            raise InputError("with a MACEFeaturizer as the model, posterior must be the ntkal.Posterior fitted with it")
        check_posterior(posterior, model.kernel)
        p = plan(None, None, structures, out, s, str(model.device), threads or 1, command="ntkal.md")
        return run(p, None, progress, featurizer=model, posterior=posterior)
    saved_obj = None
    if not isinstance(posterior, (str, Path)):
        from .saved import SavedPosterior
        if not isinstance(posterior, SavedPosterior):
            raise InputError(f"posterior must be a saved posterior's path or a SavedPosterior, got "
                             f"{type(posterior).__name__}")
        check_posterior(posterior.posterior, posterior.features.get("kernel"))
        saved_obj, posterior = posterior, None
    p = plan(model if isinstance(model, (str, Path)) else None, posterior, structures, out, s, device,
             threads or 1, dtype, command="ntkal.md")
    if saved_obj is not None:
        p.saved = saved_obj
    if threads:
        import torch
        torch.set_num_threads(threads)
    return run(p, model, progress)


# ------------------------------------------------------------------------------------------------
# command line (ntkal/cli.py calls these)

def add_parser(sub):
    """The `ntkal md` subparser."""
    d = MDSettings()
    p = sub.add_parser("md", help="MD with the model, keeping frames whose predicted error passes a threshold",
                       description="Langevin MD (NVT, or NPT for periodic cells) from every structure of --structures "
                                   "with ntkal.Calculator: frames whose predicted force error passes --lower are "
                                   "written to --out (at most one every --every steps), a trajectory stops above "
                                   "--upper; OUT.json (summary) and OUT.png (error against time) beside it.")
    p.add_argument("--model", required=True, help="pretrained MACE model file (.model)")
    p.add_argument("--posterior", required=True, help="saved posterior (`ntkal fit --out state.ntkal`, joint or "
                                                      "force kernel, fitted on labelled structures)")
    p.add_argument("--structures", required=True, help="starting structures (extxyz or ASE .db): one trajectory each")
    p.add_argument("--out", required=True, help="output extxyz pool of the kept frames (for ntkal select --pool)")
    p.add_argument("--ensemble", choices=ENSEMBLES, default=d.ensemble, help="nvt: Langevin (default); npt: Langevin "
                                                                             "with a hydrostatic barostat (LangevinBAOAB)")
    p.add_argument("--temperature", type=float, default=d.temperature, help=f"K (default {d.temperature:g})")
    p.add_argument("--timestep", type=float, default=d.timestep, help=f"fs (default {d.timestep:g})")
    p.add_argument("--friction", type=float, default=d.friction, help=f"Langevin friction, 1/fs (default {d.friction:g})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"steps per trajectory (default {d.steps})")
    p.add_argument("--pressure", type=float, default=None, help="GPa, with --ensemble npt (default 0)")
    p.add_argument("--lower", type=float, default=d.lower, help="write frames whose predicted force error (meV/Å) "
                                                                 "is above this (default 0: every --every steps)")
    p.add_argument("--upper", type=float, default=None, help="stop a trajectory when the predicted force error "
                                                             "(meV/Å) is above this (default: never)")
    p.add_argument("--every", type=int, default=d.every, help=f"at most one written frame every N steps (default {d.every})")
    p.add_argument("--error-every", type=int, default=d.error_every, help="compute the error every N steps (default 1)")
    p.add_argument("--force-probes", type=int, default=d.force_probes, help=f"probe rows per step (default {d.force_probes})")
    p.add_argument("--seed", type=int, default=d.seed, help="velocities and Langevin noise")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def plan_cli(args) -> MDPlan:
    names = {f.name for f in dataclasses.fields(MDSettings)}
    s = MDSettings(**{k: v for k, v in vars(args).items() if k in names})
    return plan(args.model, args.posterior, args.structures, args.out, s, args.device, args.threads)


def run_cli(p: MDPlan, args) -> dict:
    body = run(p, p.inputs["model"], args.progress)
    stops = ", ".join(f"{n} {r}" for r, n in body["stops"].items())
    print(f"ntkal md: {len(body['trajectories'])} trajectories, {body['steps']} steps "
          f"({body['steps_per_s']:.1f} steps/s), {body['frames_written']} frames kept; stopped by: {stops}")
    print(f"wrote {body['output'] or '(no frames kept: no pool)'}, {p.report}, {p.plot}")
    return body


__all__ = ["MDSettings", "md", "plan", "run", "frames"]
