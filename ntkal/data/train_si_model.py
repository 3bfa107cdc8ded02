"""Train the shipped small Si MACE model with mace-torch's own trainer.

Usage::

    python -m ntkal.data.train_si_model            # writes si_mace.model + si_mace.json

Runs the ``mace_run_train`` console script (found next to ``sys.executable``) on
``si_pretrain.extxyz.gz`` in a temporary working directory, copies the plain
torch-saved ``.model`` (not the TorchScript-compiled one) to ``si_mace.model`` and
records the command, timing, parameter count, mace's final error table and the
errors of the model on ``si_train`` and ``si_pool`` in ``si_mace.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

DATA_DIR = pathlib.Path(__file__).resolve().parent
NAME = "si"


def mace_run_train_path() -> pathlib.Path:
    exe = pathlib.Path(sys.executable).parent / "mace_run_train"
    if not exe.exists():
        found = shutil.which("mace_run_train")
        if found is None:
            raise FileNotFoundError(f"mace_run_train not found next to {sys.executable} or on PATH")
        exe = pathlib.Path(found)
    return exe


def build_args(train_file: str, args) -> list[str]:
    """mace_run_train options (without the executable)."""
    opts = [
        f"--name={NAME}",
        f"--train_file={train_file}",
        f"--valid_fraction={args.valid_fraction}",
        "--energy_key=REF_energy",
        "--forces_key=REF_forces",
        "--E0s=average",
        "--device=cpu",
        "--default_dtype=float64",
        f"--model={args.model}",
        "--hidden_irreps=16x0e+16x1o",
        "--MLP_irreps=16x0e",
        "--r_max=5.0",
        "--num_interactions=2",
        "--correlation=3",
        "--max_L=1",
        # max_ell=2 instead of the default 3: the symmetric-contraction U-matrix
        # buffers of max_ell=3 make the saved model ~7 MB; with 2 it is ~1 MB.
        f"--max_ell={args.max_ell}",
        "--num_radial_basis=8",
        f"--batch_size={args.batch_size}",
        f"--valid_batch_size={args.batch_size}",
        f"--max_num_epochs={args.epochs}",
        f"--lr={args.lr}",
        "--forces_weight=100.0",
        "--energy_weight=1.0",
        "--ema",
        "--ema_decay=0.99",
        f"--seed={args.seed}",
        "--plot=False",
        "--num_workers=0",
        "--pin_memory=False",
    ]
    if args.stage_two_start is not None and args.stage_two_start < args.epochs:
        opts += [
            "--stage_two",
            f"--start_stage_two={args.stage_two_start}",
            "--stage_two_energy_weight=1000.0",
            "--stage_two_forces_weight=100.0",
            "--stage_two_lr=0.001",
        ]
    return opts


_ROW = re.compile(r"\|\s*(train|valid)_(\w+)\s*\|\s*([-\d.eE+]+)\s*\|\s*([-\d.eE+]+)\s*\|\s*([-\d.eE+]+)\s*\|")


def parse_error_tables(log_text: str) -> list[dict]:
    """Parse mace's 'Error-table on TRAIN and VALID' blocks (PerAtomRMSE)."""
    tables, cur = [], None
    stage = "stage_one"
    for line in log_text.splitlines():
        if "Loaded Stage two model" in line:
            stage = "stage_two"
        elif "Loaded Stage one model" in line:
            stage = "stage_one"
        if "Error-table on TRAIN and VALID" in line:
            cur = {"stage": stage}
            tables.append(cur)
            continue
        m = _ROW.search(line)
        if m and cur is not None:
            cur[m.group(1)] = {
                "rmse_e_per_atom_meV": float(m.group(3)),
                "rmse_f_meV_per_A": float(m.group(4)),
                "relative_f_rmse_percent": float(m.group(5)),
            }
    return tables


def _parse_e0s(text: str) -> dict:
    """'{14: -4.69}' or '{np.int64(14): np.float64(-4.69)}' -> {"14": -4.69}."""
    import ast

    text = re.sub(r"np\.\w+\(([^()]*)\)", r"\1", text)
    return {str(k): float(v) for k, v in ast.literal_eval(text).items()}


def parse_epoch_lines(log_text: str) -> list[dict]:
    pat = re.compile(r"Epoch (\d+):.*?loss=([-\d.eE+]+), RMSE_E_per_atom=\s*([-\d.]+) meV, RMSE_F=\s*([-\d.]+) meV")
    out = []
    for line in log_text.splitlines():
        m = pat.search(line)
        if m:
            out.append({"epoch": int(m.group(1)), "loss": float(m.group(2)),
                        "rmse_e_per_atom_meV": float(m.group(3)), "rmse_f_meV_per_A": float(m.group(4))})
    return out


def evaluate(model_path: pathlib.Path, path: pathlib.Path) -> dict:
    """Energy/force errors of the saved model on an extxyz file (REF_ labels)."""
    import mace  # noqa: F401  (must precede e3nn, see research/deps.md section 3)
    from ase.io import read
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=str(model_path), device="cpu", default_dtype="float64")
    images = read(str(path), ":")
    de, df, e_ref_pa, f_ref = [], [], [], []
    for a in images:
        a = a.copy()
        a.calc = calc
        n = len(a)
        e = a.get_potential_energy()
        f = a.get_forces()
        de.append((e - a.info["REF_energy"]) / n)
        e_ref_pa.append(a.info["REF_energy"] / n)
        df.append((f - a.arrays["REF_forces"]).ravel())
        f_ref.append(a.arrays["REF_forces"].ravel())
    de, df = np.array(de), np.concatenate(df)
    e_ref_pa, f_ref = np.array(e_ref_pa), np.concatenate(f_ref)
    return {
        "n_structures": len(images),
        "n_atoms": int(sum(len(a) for a in images)),
        "energy_mae_per_atom_meV": 1000 * float(np.abs(de).mean()),
        "energy_rmse_per_atom_meV": 1000 * float(np.sqrt((de**2).mean())),
        "energy_mean_error_per_atom_meV": 1000 * float(de.mean()),
        "force_mae_meV_per_A": 1000 * float(np.abs(df).mean()),
        "force_rmse_meV_per_A": 1000 * float(np.sqrt((df**2).mean())),
        # trivial baselines for scale: constant E/atom (set mean), zero forces
        "baseline_energy_mae_per_atom_meV": 1000 * float(np.abs(e_ref_pa - e_ref_pa.mean()).mean()),
        "baseline_force_mae_meV_per_A": 1000 * float(np.abs(f_ref).mean()),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrain", default=str(DATA_DIR / "si_pretrain.extxyz.gz"))
    p.add_argument("--out-model", default=str(DATA_DIR / "si_mace.model"))
    p.add_argument("--out-json", default=str(DATA_DIR / "si_mace.json"))
    p.add_argument("--model", default="ScaleShiftMACE", choices=["MACE", "ScaleShiftMACE"])
    p.add_argument("--epochs", type=int, default=120)
    p.add_argument("--stage-two-start", type=int, default=90,
                   help="epoch at which mace's stage two (higher energy weight, lower lr) starts")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--max-ell", type=int, default=2)
    p.add_argument("--valid-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    # One thread: on a shared 2-core machine, 2 OpenMP threads competing with other
    # processes slowed an epoch from ~3 s to 30 s or more (spinning barriers).
    p.add_argument("--threads", type=int, default=1,
                   help="OMP/MKL threads for the training process")
    p.add_argument("--workdir", default=None, help="keep mace's files here instead of a temp dir")
    args = p.parse_args(argv)

    exe = mace_run_train_path()
    workdir_ctx = (tempfile.TemporaryDirectory(prefix="ntkal_si_train_") if args.workdir is None
                   else None)
    workdir = pathlib.Path(workdir_ctx.name if workdir_ctx else args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        # mace reads the training file with ase; give it a plain .xyz copy
        train_xyz = workdir / "si_pretrain.xyz"
        with gzip.open(args.pretrain, "rb") as src, open(train_xyz, "wb") as dst:
            shutil.copyfileobj(src, dst)

        opts = build_args(train_xyz.name, args)
        cmd = [str(exe)] + opts
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        print("running in", workdir, ":\n ", shlex.join(["mace_run_train"] + opts), flush=True)
        t0 = time.perf_counter()
        with open(workdir / "mace_stdout.txt", "w") as log:
            proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        train_time = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = (workdir / "mace_stdout.txt").read_text()[-5000:]
            raise RuntimeError(f"mace_run_train failed (rc={proc.returncode}):\n{tail}")
        print(f"training took {train_time:.0f} s", flush=True)

        stage_two = workdir / f"{NAME}_stagetwo.model"
        src_model = stage_two if stage_two.exists() else workdir / f"{NAME}.model"
        log_text = (workdir / "logs" / f"{NAME}_run-{args.seed}.log").read_text()
        tables = parse_error_tables(log_text)
        epochs = parse_epoch_lines(log_text)
        e0 = re.search(r"Atomic Energies used \(z: eV\) for head Default: (\{.*\})", log_text)
        avg_nn = re.search(r"Average number of neighbors: ([\d.]+)", log_text)
        n_valid = re.search(r"train=(\d+), valid=(\d+)", log_text)

        out_model = pathlib.Path(args.out_model)
        shutil.copyfile(src_model, out_model)
    finally:
        if workdir_ctx is not None:
            workdir_ctx.cleanup()

    import mace  # noqa: F401  (before anything touching e3nn)
    import torch

    torch.set_num_threads(args.threads)
    model = torch.load(str(out_model), weights_only=False, map_location="cpu")
    n_params = int(sum(p.numel() for p in model.parameters()))

    evals = {name: evaluate(out_model, DATA_DIR / f"si_{name}.extxyz.gz") for name in ("train", "pool")}

    final = tables[-1] if tables else {}
    info = {
        "command": shlex.join(["mace_run_train"] + opts),
        "launched_by": "python -m ntkal.data.train_si_model " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "env": {"OMP_NUM_THREADS": args.threads, "MKL_NUM_THREADS": args.threads},
        "training_data": "si_pretrain.extxyz.gz",
        "n_train_valid": [int(n_valid.group(1)), int(n_valid.group(2))] if n_valid else None,
        "mace_torch_version": mace.__version__,
        "torch_version": torch.__version__,
        "model_class": type(model).__name__,
        "saved_from": src_model.name,
        "n_parameters": n_params,
        "model_file_bytes": out_model.stat().st_size,
        "training_time_s": round(train_time, 1),
        "cpu_threads": args.threads,
        "E0s_eV": _parse_e0s(e0.group(1)) if e0 else None,
        "avg_num_neighbors": float(avg_nn.group(1)) if avg_nn else None,
        "final_error_table": final,
        "final_valid_rmse_e_per_atom_meV": final.get("valid", {}).get("rmse_e_per_atom_meV"),
        "final_valid_rmse_f_meV_per_A": final.get("valid", {}).get("rmse_f_meV_per_A"),
        "all_error_tables": tables,
        "n_epochs_logged": len(epochs),
        "last_epoch_log": epochs[-1] if epochs else None,
        "eval_si_train": evals["train"],
        "eval_si_pool": evals["pool"],
        "units": "meV/atom for energies, meV/A for forces",
    }
    pathlib.Path(args.out_json).write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: info[k] for k in ("n_parameters", "training_time_s", "final_error_table",
                                           "eval_si_train", "eval_si_pool")}, indent=2))


if __name__ == "__main__":
    main()
