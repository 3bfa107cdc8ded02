"""`python -m bench end2end`: a large on-disk pool streamed through `ntkal score` (subprocess).

The pool is generated from the shipped Si pool (600 PyXtal_FF structures, 4-16 atoms): structure i is
shipped structure i mod 600 with its cell strained by a random symmetric strain (|e| ~ 1 %, positions
follow the cell) and positions rattled by N(0, 0.03 Å); labels dropped (an unlabelled pool); seeded
by i, written as plain extxyz and cached in --workdir. Then
  python -m ntkal score --model <shipped> --train <shipped si_train> --pool <pool> --out <tmp> --kernel K
runs in a fresh process per pool size; reported: wall time, structures/s (over the whole run and over
the report's own timing, which excludes interpreter start-up), and the child's peak RSS (os.wait4),
which should not grow with the pool size (streaming).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from . import utils


def _ints(text: str):
    return [int(x) for x in str(text).replace(" ", "").split(",") if x]


def _frame(atoms) -> str:
    cell = atoms.cell[:]
    lat = " ".join(f"{v:.10f}" for v in cell.reshape(-1))
    pbc = " ".join("T" if p else "F" for p in atoms.pbc)
    lines = [str(len(atoms)), f'Lattice="{lat}" Properties=species:S:1:pos:R:3 pbc="{pbc}"']
    for s, (x, y, z) in zip(atoms.get_chemical_symbols(), atoms.positions):
        lines.append(f"{s} {x:.10f} {y:.10f} {z:.10f}")
    return "\n".join(lines) + "\n"


def make_pool(path: Path, n: int, seed: int = 0, dataset: str = "si") -> Path:
    """Write n rattled/strained copies of a shipped pool's structures to path (extxyz); return path."""
    import numpy as np
    from ntkal.data import dataset_files
    from ntkal.io import read_structures
    base = list(read_structures(dataset_files(dataset)["pool"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as fh:
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            a = base[i % len(base)].copy()
            a.calc = None
            e = rng.normal(scale=0.01, size=(3, 3))
            a.set_cell(a.cell[:] @ (np.eye(3) + 0.5 * (e + e.T)), scale_atoms=True)
            a.positions += rng.normal(scale=0.03, size=a.positions.shape)
            fh.write(_frame(a))
    tmp.replace(path)
    return path


def pool_file(workdir: Path, n: int, seed: int, regen: bool, dataset: str = "si") -> Path:
    path = Path(workdir) / f"{dataset}_pool_{n}_seed{seed}.extxyz"
    if regen or not path.exists():
        make_pool(path, n, seed, dataset)
    return path


def score_argv(a, pool: Path, out: Path, model: str, train: str):
    argv = [utils.PY, "-m", "ntkal", a.command, "--model", model, "--train", train, "--pool", str(pool),
            "--out", str(out), "--kernel", a.kernel, "--sketch-dim", str(a.sketch_dim),
            "--chunk-size", str(a.chunk_size), "--no-progress"]
    if a.force_probes:
        argv += ["--force-probes", str(a.force_probes)]
    if a.score:
        argv += ["--score", a.score]
    if a.command == "select":
        argv += ["--budget", str(a.budget)]
    if a.device != "cpu":
        argv += ["--device", a.device]
    if a.ntkal_threads:
        argv += ["--threads", str(a.ntkal_threads)]
    return argv


def add_args(p: argparse.ArgumentParser):
    p.add_argument("--pool-size", default="200000",
                   help="pool size, or comma-separated sizes each run in its own process (default 200000)")
    p.add_argument("--command", choices=("score", "select"), default="score",
                   help="ntkal command to stream the pool through (default score; select keeps a top-M shortlist)")
    p.add_argument("--budget", type=int, default=100, help="ntkal select --budget (with --command select)")
    from ntkal.options import KERNELS, SKETCH_DIM
    p.add_argument("--kernel", choices=KERNELS, default="embedding",
                   help="ntkal score --kernel (default embedding, the cheap one on CPU)")
    p.add_argument("--force-probes", type=int, default=None, help="ntkal score --force-probes")
    p.add_argument("--score", choices=("error", "pv"), default=None, help="ntkal --score (default: ntkal's)")
    p.add_argument("--sketch-dim", type=int, default=SKETCH_DIM)
    p.add_argument("--chunk-size", type=int, default=64, help="ntkal score --chunk-size (structures per chunk)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--ntkal-threads", type=int, default=None,
                   help="ntkal's own --threads (default: not passed, i.e. the CLI's default)")
    p.add_argument("--dataset", choices=("si", "oc20", "t1x"), default="si",
                   help="shipped dataset whose pool is rattled into the generated pools, and whose model and "
                        "train split are the defaults (default si)")
    p.add_argument("--model", default=None, help="model file (default: the dataset's shipped model)")
    p.add_argument("--train", default=None, help="training structures (default: the dataset's train split)")
    p.add_argument("--workdir", default="/tmp/ntkal-bench-e2e", help="where generated pools are cached")
    p.add_argument("--seed", type=int, default=0, help="pool generation seed")
    p.add_argument("--regen", action="store_true", help="regenerate cached pools")
    p.add_argument("--keep-output", action="store_true", help="keep the scored extxyz (default: deleted)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before a score run is killed")


def run(a, argv) -> dict:
    from ntkal.data import dataset_files
    files = dataset_files(a.dataset)
    model = a.model or str(files["model"])
    train = a.train or str(files["train"])
    work = Path(a.workdir)
    rows = []
    for n in _ints(a.pool_size):
        pool = pool_file(work, n, a.seed, a.regen, a.dataset)
        outdir = work / f"out_{n}"
        outdir.mkdir(parents=True, exist_ok=True)
        out = outdir / "scored.extxyz"
        r = utils.run_child(score_argv(a, pool, out, model, train), timeout=a.timeout, cwd=utils.REPO)
        row = {"pool_size": n, "command": a.command, "kernel": a.kernel + (f" (m={a.force_probes})" if a.force_probes else ""),
               "rc": r["rc"], "wall_s": r["wall_s"], "peak_rss_mib": r["child_peak_rss_mib"],
               "pool_mib": pool.stat().st_size / 2**20, "structures_per_s_wall": n / r["wall_s"]}
        rep = out.with_name(out.name + ".json")  # the report beside the output (ntkal.cli.report_path)
        if rep.exists():
            report = json.loads(rep.read_text())
            t = report.get("timings_s", {}).get("total")
            row.update({"score_s": t, "structures_per_s": (n / t) if t else None, "n_scored": report.get("n_pool"),
                        "mean_score": report.get("mean_score"), "timings_s": report.get("timings_s")})
        if r["rc"] != 0:
            row["error"] = utils.tail(r["stderr"], 800)
        if not a.keep_output:
            shutil.rmtree(outdir, ignore_errors=True)
        rows.append(row)
    ok = [r for r in rows if r.get("peak_rss_mib") and r["rc"] == 0]
    flat = None
    if len(ok) >= 2:
        small, big = min(ok, key=lambda r: r["pool_size"]), max(ok, key=lambda r: r["pool_size"])
        flat = {"pool_ratio": big["pool_size"] / small["pool_size"],
                "peak_rss_ratio": big["peak_rss_mib"] / small["peak_rss_mib"]}
        if big.get("score_s") and small.get("score_s") and big["score_s"] > small["score_s"]:
            # fixed costs (model load, training posterior) cancel in the difference
            flat["marginal_structures_per_s"] = (big["pool_size"] - small["pool_size"]) / (big["score_s"] - small["score_s"])
    return utils.record("end2end", argv, rows, memory_flat=flat,
                        settings={"dataset": a.dataset, "model": model, "train": train, "command": a.command,
                                  "kernel": a.kernel,
                                  "force_probes": a.force_probes, "sketch_dim": a.sketch_dim,
                                  "chunk_size": a.chunk_size, "device": a.device, "workdir": str(work),
                                  "ntkal_threads": a.ntkal_threads, "argv": score_argv(a, Path("POOL"), Path("OUT"),
                                                                                        model, train)})


COLUMNS = ["pool_size", "command", "kernel", "wall_s", "score_s", "structures_per_s", "structures_per_s_wall", "peak_rss_mib",
           "pool_mib", "n_scored", "error"]
HEADERS = ["pool", "command", "kernel", "wall s", "ntkal score s (report)", "structures/s", "structures/s (wall)",
           "peak RSS MiB", "pool file MiB", "scored", "error"]


def table(doc) -> str:
    s = doc["settings"]
    lines = [utils.header(doc), f"`ntkal {s['command']}` on generated {s.get('dataset', 'si')} pools (rattled, strained copies of its shipped pool); model `{s['model']}`, train `{s['train']}`, "
             f"chunk {s['chunk_size']}, k={s['sketch_dim']}\n",
             utils.markdown_table(doc["results"], COLUMNS, HEADERS)]
    if doc.get("memory_flat"):
        f = doc["memory_flat"]
        lines.append(f"\nPeak RSS grows x{f['peak_rss_ratio']:.2f} for a x{f['pool_ratio']:.0f} larger pool.")
        if f.get("marginal_structures_per_s"):
            lines.append(f"Marginal throughput (difference of the two largest/smallest runs, fixed costs cancel): "
                         f"{f['marginal_structures_per_s']:.1f} structures/s.")
    return "\n".join(lines)
