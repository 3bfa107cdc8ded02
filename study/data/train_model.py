"""Train the shipped small MACE models (si, oc20, t1x) with mace-torch's own trainer.

Usage::

    python -m study.data.train_model --dataset oc20     # writes oc20_mace.model + oc20_mace.json
    python -m study.data.train_si_model                 # the same with --dataset si (alias)

Runs the ``mace_run_train`` console script (found next to ``sys.executable``) on
``<dataset>_pretrain.extxyz.gz`` in a temporary working directory, copies the plain
torch-saved ``.model`` (not the TorchScript-compiled one) to ``<dataset>_mace.model`` and
records the command, timing, parameter count, mace's final error table and the errors of the
model on every other ``<dataset>_*.extxyz.gz`` split (``eval_<dataset>_<split>``, with per-region
errors where the structures carry ``info["region"]``) in ``<dataset>_mace.json``.

Every model is the same tiny ScaleShiftMACE (16x0e+16x1o, max_ell 2, 2 interactions, float64).
The element table is passed explicitly (``--atomic_numbers``) as the union of the elements of
all the dataset's splits, so an element outside the pretrain set would still get an embedding
(the shipped pretrain sets do hold every element; E0s are mace's least-squares "average").
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from ntkal.data import DATA_DIR

# per-dataset defaults; epoch counts keep training within ~15 min at one CPU thread
DATASETS = {
    "si": {"epochs": 120, "stage_two_start": 90, "r_max": 5.0},
    "oc20": {"epochs": 60, "stage_two_start": 45, "r_max": 5.0},
    "t1x": {"epochs": 100, "stage_two_start": 75, "r_max": 5.0},
}


def mace_run_train_path() -> pathlib.Path:
    exe = pathlib.Path(sys.executable).parent / "mace_run_train"
    if not exe.exists():
        found = shutil.which("mace_run_train")
        if found is None:
            raise FileNotFoundError(f"mace_run_train not found next to {sys.executable} or on PATH")
        exe = pathlib.Path(found)
    return exe


def split_files(dataset: str, folder: pathlib.Path = DATA_DIR) -> dict[str, pathlib.Path]:
    """{split: path} of every ``<dataset>_<split>.extxyz.gz`` in `folder`."""
    prefix, suffix = f"{dataset}_", ".extxyz.gz"
    return {p.name[len(prefix):-len(suffix)]: p for p in sorted(folder.glob(f"{prefix}*{suffix}"))}


def dataset_elements(paths) -> list[int]:
    """Sorted atomic numbers occurring in any of the files."""
    from ase.io import iread

    zs = set()
    for path in paths:
        for atoms in iread(str(path), ":"):
            zs.update(int(z) for z in atoms.numbers)
    return sorted(zs)


def build_args(name: str, train_file: str, args, zs=None) -> list[str]:
    """mace_run_train options (without the executable)."""
    opts = [
        f"--name={name}",
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
        f"--r_max={args.r_max}",
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
    if zs is not None:
        opts.append(f"--atomic_numbers={list(zs)}")
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


def _errors(de, df, e_ref_pa, f_ref) -> dict:
    """Error summary (meV/atom, meV/A) with trivial baselines: constant E/atom (set mean), zero forces."""
    de, df = np.array(de), np.concatenate(df)
    e_ref_pa, f_ref = np.array(e_ref_pa), np.concatenate(f_ref)
    return {
        "n_structures": len(de),
        "n_atoms": int(len(df) // 3),
        "energy_mae_per_atom_meV": 1000 * float(np.abs(de).mean()),
        "energy_rmse_per_atom_meV": 1000 * float(np.sqrt((de**2).mean())),
        "energy_mean_error_per_atom_meV": 1000 * float(de.mean()),
        "force_mae_meV_per_A": 1000 * float(np.abs(df).mean()),
        "force_rmse_meV_per_A": 1000 * float(np.sqrt((df**2).mean())),
        "baseline_energy_mae_per_atom_meV": 1000 * float(np.abs(e_ref_pa - e_ref_pa.mean()).mean()),
        "baseline_force_mae_meV_per_A": 1000 * float(np.abs(f_ref).mean()),
    }


def evaluate(model_path: pathlib.Path, path: pathlib.Path) -> dict:
    """Energy/force errors of the saved model on an extxyz file (REF_ labels), also per info["region"]."""
    import mace  # noqa: F401  (must precede e3nn: docs/design.md, Imports)
    from ase.io import read
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=str(model_path), device="cpu", default_dtype="float64")
    rows = {}  # group -> (de, df, e_ref_pa, f_ref)
    for a in read(str(path), ":"):
        region = a.info.get("region")
        a = a.copy()
        a.calc = calc
        n = len(a)
        vals = ((a.get_potential_energy() - a.info["REF_energy"]) / n,
                (a.get_forces() - a.arrays["REF_forces"]).ravel(),
                a.info["REF_energy"] / n, a.arrays["REF_forces"].ravel())
        for group in ("all",) + ((f"region_{region}",) if region is not None else ()):
            for store, v in zip(rows.setdefault(group, ([], [], [], [])), vals):
                store.append(v)
    out = _errors(*rows.pop("all"))
    if rows:
        out["by_region"] = {g[len("region_"):]: _errors(*r) for g, r in sorted(rows.items())}
    return out


def main(argv=None, default_dataset: str | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=sorted(DATASETS), default=default_dataset,
                   required=default_dataset is None)
    p.add_argument("--data-dir", default=str(DATA_DIR), help="folder with <dataset>_<split>.extxyz.gz")
    p.add_argument("--out-model", default=None, help="default <data-dir>/<dataset>_mace.model")
    p.add_argument("--out-json", default=None, help="default <data-dir>/<dataset>_mace.json")
    p.add_argument("--model", default="ScaleShiftMACE", choices=["MACE", "ScaleShiftMACE"])
    p.add_argument("--epochs", type=int, default=None, help="default per dataset (DATASETS)")
    p.add_argument("--stage-two-start", type=int, default=None,
                   help="epoch at which mace's stage two (higher energy weight, lower lr) starts")
    p.add_argument("--r-max", type=float, default=None)
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
    name = args.dataset
    for key, value in DATASETS[name].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    data_dir = pathlib.Path(args.data_dir)
    splits = split_files(name, data_dir)
    if "pretrain" not in splits:
        raise FileNotFoundError(f"no {name}_pretrain.extxyz.gz in {data_dir}")
    zs = dataset_elements(splits.values())

    exe = mace_run_train_path()
    workdir_ctx = (tempfile.TemporaryDirectory(prefix=f"ntkal_{name}_train_") if args.workdir is None
                   else None)
    workdir = pathlib.Path(workdir_ctx.name if workdir_ctx else args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out_model = pathlib.Path(args.out_model or data_dir / f"{name}_mace.model")
    out_json = pathlib.Path(args.out_json or data_dir / f"{name}_mace.json")
    try:
        # mace reads the training file with ase; give it a plain .xyz copy
        train_xyz = workdir / f"{name}_pretrain.xyz"
        with gzip.open(splits["pretrain"], "rb") as src, open(train_xyz, "wb") as dst:
            shutil.copyfileobj(src, dst)

        opts = build_args(name, train_xyz.name, args, zs=zs)
        cmd = [str(exe)] + opts
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        print("running in", workdir, ":\n ", shlex.join(["mace_run_train"] + opts), flush=True)
        t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(workdir / "mace_stdout.txt", "w") as log:
            proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        train_time = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        train_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        if proc.returncode != 0:
            tail = (workdir / "mace_stdout.txt").read_text()[-5000:]
            raise RuntimeError(f"mace_run_train failed (rc={proc.returncode}):\n{tail}")
        print(f"training took {train_time:.0f} s wall, {train_cpu:.0f} s CPU", flush=True)

        stage_two = workdir / f"{name}_stagetwo.model"
        src_model = stage_two if stage_two.exists() else workdir / f"{name}.model"
        log_text = (workdir / "logs" / f"{name}_run-{args.seed}.log").read_text()
        tables = parse_error_tables(log_text)
        epochs = parse_epoch_lines(log_text)
        e0 = re.search(r"Atomic Energies used \(z: eV\) for head Default: (\{.*\})", log_text)
        avg_nn = re.search(r"Average number of neighbors: ([\d.]+)", log_text)
        n_valid = re.search(r"train=(\d+), valid=(\d+)", log_text)
        shutil.copyfile(src_model, out_model)
    finally:
        if workdir_ctx is not None:
            workdir_ctx.cleanup()

    import mace  # noqa: F401  (before anything touching e3nn)
    import torch

    torch.set_num_threads(args.threads)
    model = torch.load(str(out_model), weights_only=False, map_location="cpu")
    n_params = int(sum(p.numel() for p in model.parameters()))

    t0 = time.perf_counter()
    evals = {split: evaluate(out_model, path) for split, path in splits.items() if split != "pretrain"}
    eval_time = time.perf_counter() - t0

    launcher = "study.data.train_si_model" if default_dataset == "si" else "study.data.train_model"
    final = tables[-1] if tables else {}
    info = {
        "command": shlex.join(["mace_run_train"] + opts),
        "launched_by": f"python -m {launcher} " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "env": {"OMP_NUM_THREADS": args.threads, "MKL_NUM_THREADS": args.threads},
        "training_data": splits["pretrain"].name,
        "n_train_valid": [int(n_valid.group(1)), int(n_valid.group(2))] if n_valid else None,
        "mace_torch_version": mace.__version__,
        "torch_version": torch.__version__,
        "model_class": type(model).__name__,
        "saved_from": src_model.name,
        "n_parameters": n_params,
        "model_file_bytes": out_model.stat().st_size,
        "training_time_s": round(train_time, 1),  # wall clock, on a shared machine
        "training_cpu_time_s": round(train_cpu, 1),
        "eval_time_s": round(eval_time, 1),
        "cpu_threads": args.threads,
        "atomic_numbers": [int(z) for z in model.atomic_numbers],
        "E0s_eV": _parse_e0s(e0.group(1)) if e0 else None,
        "avg_num_neighbors": float(avg_nn.group(1)) if avg_nn else None,
        "final_error_table": final,
        "final_valid_rmse_e_per_atom_meV": final.get("valid", {}).get("rmse_e_per_atom_meV"),
        "final_valid_rmse_f_meV_per_A": final.get("valid", {}).get("rmse_f_meV_per_A"),
        "all_error_tables": tables,
        "n_epochs_logged": len(epochs),
        "last_epoch_log": epochs[-1] if epochs else None,
        **{f"eval_{name}_{split}": ev for split, ev in evals.items()},
        "units": "meV/atom for energies, meV/A for forces",
    }
    out_json.write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: info[k] for k in ("n_parameters", "training_time_s", "final_error_table")}, indent=2))
    for split, ev in evals.items():
        print(f"{split}: E MAE {ev['energy_mae_per_atom_meV']:.1f} meV/atom (const {ev['baseline_energy_mae_per_atom_meV']:.1f}), "
              f"F MAE {ev['force_mae_meV_per_A']:.1f} meV/A (zero {ev['baseline_force_mae_meV_per_A']:.1f})")


if __name__ == "__main__":
    main()
