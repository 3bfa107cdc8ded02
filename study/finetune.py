"""Fine-tune the pretrained model on a labelled set with mace-torch's own trainer.

Two protocols (FinetuneConfig.protocol):
  - "replay": `mace_run_train --foundation_model PRETRAINED --multiheads_finetuning True --pt_train_file
    REPLAY`, what mace recommends for foundation models: a pt_head keeps fitting a sample of the
    pretraining data while the "Default" head learns the labelled set; the fine-tuned model has both
    heads and is evaluated with "Default" (metrics.predict's batches carry head "Default");
  - "naive": `--foundation_model` alone, the one head trained on the labelled set only.
Fixed epochs and seed, the E0s of the pretrained model, every epoch checkpointed so the saved model is
the last epoch's (no early stopping). The validation curve mace logs (results/*_train.txt) is returned.
By default mace's `run_train.run` is called in this interpreter (interpreter and mace start-up is
~5 s a call); its logging handlers, stdout and torch's default dtype are restored after each call.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ntkal import NtkalError

from .config import FinetuneConfig


class FinetuneError(NtkalError):
    """mace_run_train failed; the message ends with the tail of its log."""


@dataclass
class FinetuneResult:
    model_path: Path
    seconds: float
    command: str
    curve: Dict[str, List[dict]]        # per head: [{"epoch", "loss", "rmse_e_per_atom", "rmse_f", ...}]


def foundation_e0s(model_path) -> str:
    """The pretrained model's atomic energies as mace's --E0s dict string ("{14: -4.69, ...}").

    (`--E0s=foundation` fails in mace 0.3.16 for a one-element model: the squeezed tensor is 0-d.)
    """
    import torch

    from ntkal.features import load_model
    model = load_model(model_path, dtype=torch.float64)
    e0 = model.atomic_energies_fn.atomic_energies.detach()
    if e0.ndim > 1:
        e0 = e0.reshape(-1, e0.shape[-1])[0]
    zs = [int(z) for z in model.atomic_numbers]
    return "{" + ", ".join(f"{z}: {float(e):.10f}" for z, e in zip(zs, e0.reshape(-1).tolist())) + "}"


def replay_foundation(model_path, out: Path) -> Path:
    """The pretrained model with its E0 buffer stored 1-d when it has one head: mace 0.3.16's multihead
    path squeezes the [1, n_elements] buffer to 0-d for a one-element model and then indexes it
    (mace/cli/run_train.py, "Atomic energies for multiheads finetuning"); AtomicEnergiesBlock reads both
    shapes alike (torch.atleast_2d, mace/modules/blocks.py). Other models are returned unchanged. The file
    is read and re-saved as it is (ntkal's loader would return a converted copy)."""
    import torch
    model = torch.load(str(model_path), map_location="cpu", weights_only=False)
    e0 = model.atomic_energies_fn.atomic_energies
    if e0.ndim != 2 or e0.shape[0] != 1:
        return Path(model_path)
    model.atomic_energies_fn.atomic_energies = e0.reshape(-1).clone()
    torch.save(model, str(out))
    return Path(out)


def write_train_file(path: Path, structures: Sequence, config_weight: Optional[float] = None) -> None:
    """Plain extxyz with only what mace reads: positions, cell, pbc, REF_energy, REF_forces, and the
    per-structure loss weight `config_weight` when given (mace/data/utils.py reads info["config_weight"];
    mace/cli/fine_tuning_select.py writes --weight_pt there for its replay data)."""
    from ase import Atoms
    from ase.io import write
    out = []
    for a in structures:
        b = Atoms(numbers=a.numbers, positions=a.positions, cell=a.cell, pbc=a.pbc)
        b.info["REF_energy"] = float(a.info["REF_energy"])
        if config_weight is not None:
            b.info["config_weight"] = float(config_weight)
        b.arrays["REF_forces"] = a.arrays["REF_forces"].copy()
        out.append(b)
    write(str(path), out, format="extxyz")


def build_args(cfg: FinetuneConfig, foundation: Path, train: Path, valid: Path, workdir: Path, seed: int,
               e0s: str, name: str = "ft", replay: Optional[Path] = None,
               replay_valid: Optional[Path] = None) -> List[str]:
    """mace_run_train options for one fine-tune (without the executable).

    With `replay` (protocol "replay"), mace's multihead fine-tuning: the pt_head trains on `replay` and
    validates on `replay_valid`; --force_mh_ft_lr keeps cfg.lr (mace would otherwise reset it to 1e-4
    and switch EMA on, mace/cli/run_train.py); --skip_evaluate_heads=train skips mace's closing error
    table over the training loaders (names "train_<head>", mace/tools/tables_utils.py), which the study
    does not read.
    """
    if cfg.protocol == "replay" and replay is None:
        raise ValueError("protocol 'replay' needs the replay file")
    multihead = []
    if cfg.protocol == "replay":
        multihead = ["--multiheads_finetuning=True", f"--pt_train_file={replay}", "--force_mh_ft_lr=True"]
        if replay_valid is not None:
            multihead.append(f"--pt_valid_file={replay_valid}")
    else:
        multihead = ["--multiheads_finetuning=False"]
    ema = [] if cfg.ema_decay is None else ["--ema", f"--ema_decay={cfg.ema_decay}"]
    return [
        f"--name={name}",
        f"--work_dir={workdir}",
        f"--train_file={train}",
        f"--valid_file={valid}",
        "--energy_key=REF_energy",
        "--forces_key=REF_forces",
        f"--foundation_model={foundation}",
        "--foundation_model_elements=True",   # keep every element of the model (a labelled set may lack some)
        f"--E0s={e0s}",
        "--model=ScaleShiftMACE",
        "--device=cpu",
        f"--default_dtype={cfg.dtype}",
        f"--batch_size={cfg.batch_size}",
        f"--valid_batch_size={max(cfg.batch_size, cfg.valid_size)}",
        f"--max_num_epochs={cfg.epochs}",
        f"--lr={cfg.lr}",
        f"--energy_weight={cfg.energy_weight}",
        f"--forces_weight={cfg.forces_weight}",
        f"--seed={seed}",
        "--patience=1000000",
        "--save_all_checkpoints",   # every epoch saved: the loaded 'latest' is the last epoch
        "--keep_checkpoints",
        "--plot=False",
        "--num_workers=0",
        "--pin_memory=False",
        "--save_cpu",
        "--skip_evaluate_heads=train",
        *multihead,
        *ema,
        *cfg.extra_args,
    ]


def mace_run_train_path() -> Path:
    """The mace_run_train script (study.data.train_model's lookup), a FinetuneError when there is none."""
    from .data.train_model import mace_run_train_path as lookup
    try:
        return Path(lookup())
    except FileNotFoundError as exc:
        raise FinetuneError(str(exc)) from None


def finetune(cfg: FinetuneConfig, foundation: Path, train: Sequence, valid: Sequence, workdir: Path,
             seed: int, e0s: str, replay: Optional[Sequence] = None,
             replay_valid: Optional[Sequence] = None) -> FinetuneResult:
    """Fine-tune `foundation` on `train` (validating on `valid`) in `workdir`; the model file is returned.

    `replay` / `replay_valid`: pretraining structures for the pt_head (protocol "replay" only).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    train_file, valid_file = workdir / "train.xyz", workdir / "valid.xyz"
    write_train_file(train_file, train)
    write_train_file(valid_file, valid)
    replay_file = replay_valid_file = None
    if cfg.protocol == "replay":
        if not replay:
            raise FinetuneError("protocol 'replay' needs pretraining structures to replay (none given)")
        replay_file = workdir / "replay.xyz"
        write_train_file(replay_file, replay, config_weight=cfg.replay_weight)
        if replay_valid:
            replay_valid_file = workdir / "replay_valid.xyz"
            write_train_file(replay_valid_file, replay_valid)
        foundation = replay_foundation(foundation, workdir / "foundation.model")
    opts = build_args(cfg, Path(foundation).resolve(), train_file, valid_file, workdir, seed, e0s,
                      replay=replay_file, replay_valid=replay_valid_file)
    command = shlex.join(["mace_run_train"] + opts)
    log = workdir / "mace_stdout.txt"
    t0 = time.perf_counter()
    if cfg.in_process:
        _run_in_process(opts, log)
    else:
        _run_subprocess(opts, log, workdir)
    seconds = time.perf_counter() - t0
    model = workdir / "ft.model"
    if not model.exists():
        raise FinetuneError(f"mace_run_train wrote no model in {workdir}:\n{_tail(log)}")
    return FinetuneResult(model_path=model, seconds=seconds, command=command, curve=validation_curve(workdir))


def validation_curve(workdir: Path) -> Dict[str, List[dict]]:
    """mace's per-epoch validation metrics ({"mode": "eval"} lines of results/*_train.txt), by head;
    epoch None (mace's value before any training) is reported as -1."""
    out: Dict[str, List[dict]] = {}
    for path in sorted((Path(workdir) / "results").glob("*_train.txt")):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("mode") != "eval":
                continue
            keep = {k: rec.get(k) for k in ("loss", "rmse_e_per_atom", "rmse_f", "mae_e_per_atom", "mae_f")}
            keep["epoch"] = -1 if rec.get("epoch") is None else int(rec["epoch"])
            out.setdefault(str(rec.get("head", "Default")), []).append(keep)
    return out


def _tail(log: Path, n: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _run_subprocess(opts: List[str], log: Path, workdir: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(log, "w") as fh:
        proc = subprocess.run([str(mace_run_train_path())] + opts, cwd=workdir, env=env, stdout=fh,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise FinetuneError(f"mace_run_train failed (exit {proc.returncode}):\n{_tail(log)}")


@contextlib.contextmanager
def _no_compiled_copy(run_train):
    """Skip the TorchScript copy mace writes beside the model (`*_compiled.model`, ~1.5 s a call on this
    box): run_train wraps `jit.compile` in try/except and carries on, and the study loads the plain model."""
    class _NoCompile:
        @staticmethod
        def compile(*_args, **_kwargs):
            raise RuntimeError("compiled copy skipped by the study")
    original = run_train.jit
    run_train.jit = _NoCompile
    try:
        yield
    finally:
        run_train.jit = original


def _run_in_process(opts: List[str], log: Path) -> None:
    """mace.cli.run_train.run(args) with its output in `log`; global state it touches is put back."""
    import torch
    from mace.cli import run_train
    from mace.tools import build_default_arg_parser
    args = build_default_arg_parser().parse_args(opts)
    root = logging.getLogger()
    handlers, filters, level = list(root.handlers), list(root.filters), root.level
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    try:
        with open(log, "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh), \
                _no_compiled_copy(run_train):
            run_train.run(args)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise FinetuneError(f"mace run_train failed ({type(exc).__name__}: {exc}):\n{_tail(log)}") from exc
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.filters[:] = filters
        root.setLevel(level)
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
