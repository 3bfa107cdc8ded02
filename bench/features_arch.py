"""`python -m bench features --arch NAME`: featurisation cost on a foundation-shaped model (bench/archs.py).

Every case runs in its own child process (`python -m bench.features_arch SPEC`): build the featurizer,
warm up on one small structure, then time ONE call on the whole batch (process CPU time and wall) and
take that call's peak RSS (VmHWM reset after the warm-up). The floor is MACE's own energy+forces call
`model(fz.batch(batch), compute_force=True)` on the same batch, measured the same way, so "time / floor"
and "peak / floor peak" are ratios of like with like. Case "labelled" compares, per size in --atoms,
exact joint rows and probe joint rows against one single-structure energy+forces call.
"""
from __future__ import annotations

import json
import sys
import time
from typing import List

from . import utils

# label -> (kernel, probes ("m" = --probes), impl)
CASES = {
    "floor": ("floor", None, None),
    "embedding": ("embedding", None, "reference"),
    "energy fast": ("energy", None, "fast"),
    "energy reference": ("energy", None, "reference"),
    "probes fast": ("force", "m", "fast"),
    "probes reference": ("force", "m", "reference"),
    "exact floor": ("floor", None, None),
    "exact fast": ("force", None, "fast"),
    "exact reference": ("force", None, "reference"),
}
DEFAULT_CASES = list(CASES)
LABELLED = {  # labelled-set featurisation: joint rows as the posterior fit takes them
    "floor (1 structure per call)": ("floor1", None, None),
    "joint exact, fast": ("joint", None, "fast"),
    "joint exact, reference": ("joint", None, "reference"),
    "joint probes, fast": ("joint", "m", "fast"),
}


def _sizes(a) -> List[int]:
    return [int(x) for x in str(a.atoms).split(",") if x.strip()]


def run(a, argv) -> dict:
    from . import archs
    a.n_structures = a.n_structures or 8
    a.batch = a.batch or a.n_structures
    archs.model_path(a.arch)  # build once here, so that children only load it
    wanted = a.cases.split(",") if a.cases else DEFAULT_CASES
    rows = []
    for label in wanted:
        if label == "labelled":
            for n_at in _sizes(a):
                for sub, case in LABELLED.items():
                    if case[2] == "reference" and not a.labelled_reference:
                        continue
                    rows.append(_run_case(a, f"labelled {n_at} atoms: {sub}", case, n_at, a.exact_structures))
            continue
        if label not in CASES:
            raise SystemExit(f"unknown case {label!r}; one of {', '.join(list(CASES) + ['labelled'])}")
        n = a.exact_structures if label.startswith("exact") else a.n_structures
        rows.append(_run_case(a, label, CASES[label], _sizes(a)[0], n))
    _ratios(rows, a.pool_target)
    import torch
    n_params = sum(p.numel() for p in archs.model(a.arch).parameters())
    return utils.record("features", argv, rows,
                        settings={"arch": a.arch, "atoms": a.atoms, "n_structures": a.n_structures, "batch": a.batch,
                                  "exact_structures": a.exact_structures, "sketch_dim": a.sketch_dim,
                                  "probes": a.probes, "dtype": a.dtype, "memory_gb": a.memory_gb, "device": a.device,
                                  "pool_target": a.pool_target,
                                  "parameters": n_params, "torch_threads": torch.get_num_threads()})


def _run_case(a, label, case, n_atoms, n_struct) -> dict:
    kernel, probes, impl = case
    memory_gb = a.memory_gb
    if memory_gb is None and impl == "reference" and kernel in ("force", "joint") and probes is None:
        memory_gb = a.reference_memory_gb
    spec = {"arch": a.arch, "atoms": n_atoms, "n": n_struct, "batch": min(a.batch, n_struct), "kernel": kernel,
            "probes": a.probes if probes == "m" else None, "impl": impl,
            "sketch_dim": a.sketch_dim, "dtype": a.dtype, "memory_gb": memory_gb, "device": a.device}
    env = {"OMP_NUM_THREADS": str(a.threads)} if a.threads else None
    r = utils.run_child([utils.PY, "-m", "bench.features_arch", json.dumps(spec)], env=env, cwd=str(utils.REPO))
    out = utils.last_json_line(r["stdout"]) or {}
    row = {"case": label, "n_structures": n_struct, "atoms": n_atoms, **out, "child_peak_rss_gib": r["child_peak_rss_mib"] / 1024}
    if r["rc"] != 0 or not out:
        row["note"] = f"failed (exit {r['rc']}): {utils.tail(r['stderr'], 300)}"
    print(f"  {label}: {json.dumps({k: v for k, v in row.items() if k in ('time_s', 'cpu_s', 'peak_rss_gib', 'note')})}",
          file=sys.stderr, flush=True)
    return row


def _ratios(rows, pool_target=None):
    """time / floor (per structure: CPU s, or wall s on a GPU) and peak / floor peak against the matching
    floor row; with pool_target, the hours that many structures take at the measured rate."""
    floors = {}
    for r in rows:
        if r.get("kernel") in ("floor", "floor1") and "time_s" in r:
            floors[(r["atoms"], r["case"].startswith("labelled"), r["n_structures"])] = r
    for r in rows:
        if "time_s" in r and pool_target:
            r["hours_for_pool_target"] = r["time_s"] / r["n_structures"] * pool_target / 3600
        f = floors.get((r["atoms"], r["case"].startswith("labelled"), r["n_structures"]))
        if f is None or "time_s" not in r:
            continue
        r["over_floor"] = (r["time_s"] / r["n_structures"]) / (f["time_s"] / f["n_structures"])
        r["peak_over_floor"] = r["peak_rss_gib"] / f["peak_rss_gib"]


# --------------------------------------------------------------------------------------------------
# child process: one case
# --------------------------------------------------------------------------------------------------

def child(spec: dict) -> dict:
    import gc
    import torch
    import ntkal
    from . import archs
    dtype = getattr(torch, spec["dtype"])
    device = spec.get("device", "cpu")
    cuda = device == "cuda"
    path = archs.model_path(spec["arch"])
    ats = archs.structures(spec["arch"], spec["atoms"], spec["n"], seed=1)
    warm = archs.structures(spec["arch"], 6, 1, seed=2)
    kernel = spec["kernel"]
    info = {}
    if kernel in ("floor", "floor1"):
        fz = ntkal.MACEFeaturizer(str(path), kernel="embedding", dtype=dtype, device=device)

        def call(batch):
            chunks = [batch] if kernel == "floor" else [[x] for x in batch]
            for c in chunks:
                fz.model(fz.batch(c), training=False, compute_force=True)["forces"].detach()
    else:
        kw = {} if spec["memory_gb"] is None else {"memory_gb": spec["memory_gb"]}
        fz = ntkal.MACEFeaturizer(str(path), kernel=kernel, sketch_dim=spec["sketch_dim"],
                                  force_probes=spec["probes"], impl=spec["impl"], dtype=dtype,
                                  batch_size=spec["batch"], device=device, **kw)
        info = {"impl": fz.impl, "coverage": fz.coverage}

        def call(batch):
            rb = fz(batch)
            info["rows_per_struct"] = rb.rows.shape[0] / len(rb)
    call(warm)
    gc.collect()
    rss0 = utils.rss_mib()
    reset = utils.reset_peak_rss()
    if cuda:  # GPU: wall time between synchronisations, and the allocator's peak instead of RSS
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        rss0 = torch.cuda.memory_allocated() / 2**20
    c0, t0 = time.process_time(), time.perf_counter()
    call(ats)
    if cuda:
        torch.cuda.synchronize()
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else utils.peak_rss_mib()
    return {"kernel": kernel, "probes": spec["probes"], "memory_gb": spec["memory_gb"],
            **info, "cpu_s": cpu, "time_s": wall if cuda else cpu, "device": device,
            "wall_s": wall, "rss_before_gib": rss0 / 1024, "peak_rss_gib": peak / 1024,
            "peak_is_call_only": reset, "natoms_mean": sum(len(x) for x in ats) / len(ats)}


COLUMNS = ["case", "impl", "n_structures", "natoms_mean", "rows_per_struct", "time_s", "over_floor", "peak_rss_gib",
           "peak_over_floor", "rss_before_gib", "memory_gb", "coverage", "hours_for_pool_target", "note"]
HEADERS = ["case", "impl", "structures", "atoms", "rows/structure", "s (one call; CPU s, GPU wall s)",
           "time / floor (per structure)", "peak GiB (RSS; GPU allocated)", "peak / floor peak", "before GiB",
           "memory_gb", "coverage", "hours for --pool-target", "note"]


def table(doc) -> str:
    s = doc["settings"]
    head = (f"arch `{s['arch']}` ({s['parameters']:,} parameters, random weights), {s['n_structures']} structures of "
            f"~{s['atoms']} atoms in batches of {s['batch']} (exact rows: {s['exact_structures']}), k={s['sketch_dim']}, "
            f"m={s['probes']}, {s['dtype']}, memory_gb={s['memory_gb']}; each case one call in its own process\n")
    return utils.header(doc) + head + "\n" + utils.markdown_table(doc["results"], COLUMNS, HEADERS)


if __name__ == "__main__":
    import mace  # noqa: F401  (before e3nn)
    spec = json.loads(sys.argv[1])
    import os
    if os.environ.get("OMP_NUM_THREADS"):
        import torch
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(json.dumps(child(spec)))
