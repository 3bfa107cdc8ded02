"""Fine-tune the pretrained model on a labelled set with mace-torch's own trainer.

`mace_run_train --foundation_model PRETRAINED.model` (naive fine-tuning: no pretraining head, since a
local model has no replay data), fixed epochs and seed, the E0s of the pretrained model, every epoch
checkpointed so the saved model is the last epoch's (no early stopping on a tiny validation set).
By default mace's `run_train.run` is called in this interpreter (interpreter and mace start-up is
~5 s a call); its logging handlers, stdout and torch's default dtype are restored after each call.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

from ..errors import NtkalError
from .config import FinetuneConfig


class FinetuneError(NtkalError):
    """mace_run_train failed; the message ends with the tail of its log."""


@dataclass
class FinetuneResult:
    model_path: Path
    seconds: float
    command: str


def foundation_e0s(model_path) -> str:
    """The pretrained model's atomic energies as mace's --E0s dict string ("{14: -4.69, ...}").

    (`--E0s=foundation` fails in mace 0.3.16 for a one-element model: the squeezed tensor is 0-d.)
    """
    import torch
    model = torch.load(str(model_path), map_location="cpu", weights_only=False)
    e0 = model.atomic_energies_fn.atomic_energies.detach().double()
    if e0.ndim > 1:
        e0 = e0.reshape(-1, e0.shape[-1])[0]
    zs = [int(z) for z in model.atomic_numbers]
    return "{" + ", ".join(f"{z}: {float(e):.10f}" for z, e in zip(zs, e0.reshape(-1).tolist())) + "}"


def write_train_file(path: Path, structures: Sequence) -> None:
    """Plain extxyz with only what mace reads: positions, cell, pbc, REF_energy, REF_forces."""
    from ase import Atoms
    from ase.io import write
    out = []
    for a in structures:
        b = Atoms(numbers=a.numbers, positions=a.positions, cell=a.cell, pbc=a.pbc)
        b.info["REF_energy"] = float(a.info["REF_energy"])
        b.arrays["REF_forces"] = a.arrays["REF_forces"].copy()
        out.append(b)
    write(str(path), out, format="extxyz")


def build_args(cfg: FinetuneConfig, foundation: Path, train: Path, valid: Path, workdir: Path, seed: int,
               e0s: str, name: str = "ft") -> List[str]:
    """mace_run_train options for one fine-tune (without the executable)."""
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
        "--default_dtype=float64",
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
        *cfg.extra_args,
    ]


def mace_run_train_path() -> Path:
    """The mace_run_train script (ntkal.data.train_model's lookup), a FinetuneError when there is none."""
    from ..data.train_model import mace_run_train_path as lookup
    try:
        return Path(lookup())
    except FileNotFoundError as exc:
        raise FinetuneError(str(exc)) from None


def finetune(cfg: FinetuneConfig, foundation: Path, train: Sequence, valid: Sequence, workdir: Path,
             seed: int, e0s: str) -> FinetuneResult:
    """Fine-tune `foundation` on `train` (validating on `valid`) in `workdir`; the model file is returned."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    train_file, valid_file = workdir / "train.xyz", workdir / "valid.xyz"
    write_train_file(train_file, train)
    write_train_file(valid_file, valid)
    opts = build_args(cfg, Path(foundation).resolve(), train_file, valid_file, workdir, seed, e0s)
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
    return FinetuneResult(model_path=model, seconds=seconds, command=command)


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


def _run_in_process(opts: List[str], log: Path) -> None:
    """mace.cli.run_train.run(args) with its output in `log`; global state it touches is put back."""
    import torch
    from mace.cli.run_train import run
    from mace.tools import build_default_arg_parser
    args = build_default_arg_parser().parse_args(opts)
    root = logging.getLogger()
    handlers, filters, level = list(root.handlers), list(root.filters), root.level
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    try:
        with open(log, "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            run(args)
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
