"""`python -m bench features`: structures/s of each feature kernel vs the same model's energy+forces.

On the shipped demo model (ntkal/data/si_mace.model) and pool (si_pool.extxyz.gz) by default, in
batches of --batch structures: both featurizer impls ("reference", "fast"; interleaved per kernel so
both see the same machine load) x kernels embedding, energy, force exact, force probes (m = --probes), joint (energy + exact
force rows). The floor is MACE's own evaluation of the same batches,
`model(fz.batch(chunk), compute_force=True)` (batch construction included on both sides). Reported:
structures/s, time / floor, and the hours a 200k-structure pool would take at that rate.

With --arch NAME (bench/archs.py: tiny, mp0-small, mp0-medium, mp0-large, off-small) it runs on that
foundation-shaped model with random weights and --n-structures generated structures of about --atoms
atoms, each case in its own child process (CPU time of one featurisation call and that call's peak RSS,
the floor measured the same way), so memory figures are per case.
"""
from __future__ import annotations

import argparse
import time

from . import utils

KERNEL_CASES = (("embedding", "embedding", None), ("energy", "energy", None), ("force exact", "force", None),
                ("force probes", "force", "probes"), ("joint", "joint", None))


def load_pool(path, n):
    """n structures spread evenly over the file (the shipped pool is ordered by size: 4, 8, 16 atoms)."""
    from ntkal.io import read_structures
    allx = list(read_structures(path))
    if n >= len(allx):
        return allx
    step = len(allx) / n
    return [allx[int(i * step)] for i in range(n)]


def batches(atoms, size):
    return [atoms[i:i + size] for i in range(0, len(atoms), size)]


def make_featurizer(model, impl, kernel, probes, a):
    import torch
    from ntkal import MACEFeaturizer
    return MACEFeaturizer(model, kernel=kernel, sketch_dim=a.sketch_dim, force_probes=probes, impl=impl,
                          dtype=getattr(torch, a.dtype), batch_size=a.batch)


def time_batches(fn, chunks, min_time: float) -> dict:
    """Seconds per pass over all chunks (repeat passes until min_time; at least one)."""
    passes, t_all = [], time.perf_counter()
    while not passes or time.perf_counter() - t_all < min_time:
        t0 = time.perf_counter()
        for c in chunks:
            fn(c)
        passes.append(time.perf_counter() - t0)
    return {"s_per_pass": min(passes), "passes": len(passes), "all_s": passes}


def floor_fn(fz):
    def go(chunk):
        data = fz.batch(chunk)
        out = fz.model(data, training=False, compute_force=True)
        return out["forces"].detach()
    return go


def add_args(p: argparse.ArgumentParser):
    p.add_argument("--arch", default=None, help="foundation-shaped model of bench/archs.py (tiny, mp0-small, "
                   "mp0-medium, mp0-large, off-small): per-case child processes, CPU time and peak RSS")
    p.add_argument("--atoms", default="38", help="--arch: atoms per structure; comma-separated sizes for "
                   "the 'labelled' cases (default 38)")
    p.add_argument("--cases", default=None, help="--arch: comma-separated cases (default: all of "
                   "ARCH_CASES but 'labelled')")
    p.add_argument("--exact-structures", type=int, default=2,
                   help="--arch: structures for exact force rows (3N double backwards each; default 2)")
    p.add_argument("--memory-gb", type=float, default=None, help="--arch: MACEFeaturizer(memory_gb=...)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="--arch: where the model runs (cuda: wall time and allocated GPU memory)")
    p.add_argument("--no-labelled-reference", dest="labelled_reference", action="store_false",
                   help="--arch, case labelled: skip the reference path's exact rows")
    p.add_argument("--reference-memory-gb", type=float, default=6.0,
                   help="--arch: memory_gb of the reference path's exact-row cases when --memory-gb is not given "
                   "(its default 64 rows per vmapped double backward took >15 GB on mp0-medium; default 6)")
    p.add_argument("--model", default=None, help="MACE model file (default: the shipped si_mace.model)")
    p.add_argument("--pool", default=None, help="structures to featurise (default: the shipped Si pool)")
    p.add_argument("--n-structures", type=int, default=None,
                   help="structures timed per kernel, spread evenly over the pool file (default 128; --arch: 8)")
    p.add_argument("--batch", type=int, default=None, help="structures per batch (default 64; --arch: 8)")
    p.add_argument("--sketch-dim", type=int, default=512, help="k (default 512)")
    p.add_argument("--probes", type=int, default=8, help="Rademacher probes m for 'force probes' (default 8)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--kernels", default=",".join(c[0] for c in KERNEL_CASES),
                   help="comma-separated subset of: " + ", ".join(c[0] for c in KERNEL_CASES))
    p.add_argument("--min-time", type=float, default=2.0, help="repeat passes until this many seconds (default 2)")
    p.add_argument("--pool-target", type=int, default=200_000, help="pool size for the extrapolated hours")


def run(a, argv) -> dict:
    if a.arch:
        from . import features_arch
        return features_arch.run(a, argv)
    from ntkal.data import demo_files
    a.n_structures = a.n_structures or 128
    a.batch = a.batch or 64
    files = demo_files()
    model = a.model or str(files["model"])
    pool_path = a.pool or str(files["pool"])
    atoms = load_pool(pool_path, a.n_structures)
    chunks = batches(atoms, a.batch)
    n = len(atoms)
    natoms = [len(x) for x in atoms]
    wanted = [c for c in KERNEL_CASES if c[0] in a.kernels.split(",")]

    base = make_featurizer(model, "reference", "embedding", None, a)
    ff = floor_fn(base)
    for _ in range(3):  # warm-up (TorchScript's profiling executor specialises over the first calls)
        ff(chunks[0][:2])
    floor = time_batches(ff, chunks, a.min_time)
    floor_rate = n / floor["s_per_pass"]
    rows = [{"impl": "-", "kernel": "floor: model energy+forces", "structures_per_s": floor_rate,
             "over_floor": 1.0, "hours_200k": a.pool_target / floor_rate / 3600, "rows_per_struct": None}]
    from ntkal.options import IMPLS
    available = {}
    for impl in (i for i in IMPLS if i != "auto"):  # the two paths ("auto" picks one of them)
        try:
            make_featurizer(model, impl, "energy", None, a)
            available[impl] = True
        except ValueError as exc:  # this impl does not exist in this ntkal version: one row says so
            rows.append({"impl": impl, "kernel": "all", "note": f"not available: {exc}"})
    for label, kernel, probes in wanted:  # impls interleaved per kernel, so both see the same load
        m = a.probes if probes == "probes" else None
        name = f"{label} (m={m})" if m else label
        rates, timed = {}, []
        for impl in available:
            t0 = time.perf_counter()
            try:
                fz = make_featurizer(model, impl, kernel, m, a)
            except ValueError as exc:
                rows.append({"impl": impl, "kernel": name, "note": f"not available: {exc}"})
                continue
            init_s = time.perf_counter() - t0
            for _ in range(2):  # warm-up
                fz(chunks[0][:2])
            rb = fz(chunks[0])
            t = time_batches(fz, chunks, a.min_time)
            rate = rates[impl] = n / t["s_per_pass"]
            timed.append({"impl": fz.impl if kernel != "embedding" else impl, "kernel": name,
                          "structures_per_s": rate, "over_floor": floor_rate / rate,
                          "hours_200k": a.pool_target / rate / 3600, "rows_per_struct": rb.rows.shape[0] / len(rb),
                          "k": rb.k, "coverage": fz.coverage, "init_s": init_s, "timing": t})
        for r in timed:
            r["speedup_vs_reference"] = r["structures_per_s"] / rates["reference"] if "reference" in rates else None
        rows.extend(timed)
    return utils.record("features", argv, rows, floor=floor,
                        settings={"model": model, "pool": pool_path, "n_structures": n, "batch": a.batch,
                                  "sketch_dim": a.sketch_dim, "probes": a.probes, "dtype": a.dtype,
                                  "mean_natoms": sum(natoms) / max(n, 1), "max_natoms": max(natoms, default=0),
                                  "pool_target": a.pool_target})


COLUMNS = ["impl", "kernel", "structures_per_s", "over_floor", "speedup_vs_reference", "hours_200k", "rows_per_struct",
           "coverage", "init_s", "note"]
HEADERS = ["impl", "kernel", "structures/s", "time / floor", "fast / reference speed", "hours for 200k",
           "rows/structure", "param coverage", "featurizer init s", "note"]


def table(doc) -> str:
    if doc["settings"].get("arch"):
        from . import features_arch
        return features_arch.table(doc)
    s = doc["settings"]
    head = (f"{s['n_structures']} structures (mean {s['mean_natoms']:.1f} atoms, max {s['max_natoms']}) from "
            f"`{s['pool']}`, batches of {s['batch']}, k={s['sketch_dim']}, {s['dtype']}, model `{s['model']}`\n")
    return utils.header(doc) + head + "\n" + utils.markdown_table(doc["results"], COLUMNS, HEADERS)
