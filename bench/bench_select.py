"""`python -m bench select`: PV scoring + top-M shortlist + LCMD-TP on precomputed features, vs bmdal_reg.

What is generated (synthetic, deterministic, float32, one ENERGY row per structure, psi = that row):
  x = (mu_c + 0.5 z) * s,   z ~ N(0, I_k),   s_j = (1 + j)^(-0.75)   (j = 0..k-1)
i.e. a mixture of `--clusters` Gaussian families (centres mu_c ~ N(0, I_k), fixed seed) whose column
scales decay as a power law (eigenvalues ~ j^-1.5, like a sketched NTK / embedding Gram). Training
structures come only from the first 3/4 of the families; the pool from all of them, so the pool has
unseen families, as in active learning. natoms ~ U{1..64} (it only matters for force rows; none here).

Cases, each in a fresh process so peak RSS (os.wait4 ru_maxrss of the child) is per case:
  ntkal  ntkal.select_rows(train, pool chunks, budget=B, method="lcmd", shortlist=M), TP mode;
         plus a profile: posterior build, pure PV scoring, shortlist merge, LCMD TP init, LCMD picks.
  bmdal  bmdal_reg select_batch(..., base_kernel="linear", kernel_transforms=[], selection_method="lcmd",
         sel_with_train=True) on the SAME full pool (the peer baseline: no shortlist).
  floor  one fp32 GEMM of all pool rows by a k x k matrix, the arithmetic floor of PV scoring.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from . import utils

DEFAULT_N_TRAIN = (1000, 5000, 20000)


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------

def spectrum(k: int, alpha: float = 0.75):
    import torch
    return (1.0 + torch.arange(k, dtype=torch.float64)).pow(-alpha).to(torch.float32)


def generate(n: int, k: int, seed: int, families: range, n_clusters: int = 64, chunk: int = 65536):
    """[n, k] float32 features of the mixture described in the module docstring (deterministic)."""
    import torch
    g0 = torch.Generator().manual_seed(12345)
    centres = torch.randn(n_clusters, k, generator=g0)
    s = spectrum(k)
    fam = torch.tensor(list(families), dtype=torch.int64)
    out = torch.empty(n, k, dtype=torch.float32)
    for c0 in range(0, n, chunk):
        g = torch.Generator().manual_seed(seed * 1_000_003 + c0)
        m = min(chunk, n - c0)
        lab = fam[torch.randint(len(fam), (m,), generator=g)]
        out[c0:c0 + m] = (centres[lab] + 0.5 * torch.randn(m, k, generator=g)) * s
    return out


def natoms_of(n: int, seed: int):
    import torch
    return torch.randint(1, 65, (n,), generator=torch.Generator().manual_seed(seed))


def datasets(n_train: int, n_pool: int, k: int, n_clusters: int = 64):
    seen = range(0, (3 * n_clusters) // 4)
    train = generate(n_train, k, seed=2, families=seen, n_clusters=n_clusters)
    pool = generate(n_pool, k, seed=1, families=range(n_clusters), n_clusters=n_clusters)
    return train, pool


def energy_block(x, natoms):
    import torch
    from ntkal import ENERGY, RowBlock
    n = x.shape[0]
    return RowBlock(x, torch.arange(n + 1), torch.full((n,), ENERGY, dtype=torch.int8), natoms, psi=x)


def pool_chunks(pool, natoms, chunk: int):
    return [energy_block(pool[c0:c0 + chunk], natoms[c0:c0 + chunk]) for c0 in range(0, pool.shape[0], chunk)]


# --------------------------------------------------------------------------------------------------
# child processes (one case each)
# --------------------------------------------------------------------------------------------------

def child_ntkal(a) -> dict:
    import numpy as np
    import torch
    import ntkal
    from ntkal.acquisition.centres import Centres
    from ntkal.acquisition.pipeline import Pipeline
    from ntkal.acquisition.streams import Stream
    from ntkal.acquisition.scorers import PVScorer
    from ntkal.acquisition.selectors import LCMD_DTYPE, _init_from_centres
    from ntkal.options import Options
    from ntkal.posterior import Posterior
    train, pool = datasets(a.n_train, a.pool_size, a.sketch_dim)
    train, pool = train.to(a.device), pool.to(a.device)
    tr_block = energy_block(train, natoms_of(a.n_train, 3))
    chunks = pool_chunks(pool, natoms_of(a.pool_size, 4), a.chunk)
    # warm-up on a small problem (first-call costs: thread pools, allocator) outside the timing
    ntkal.select_rows(energy_block(train[:200], natoms_of(200, 3)), pool_chunks(pool[:4000], natoms_of(4000, 4), 1000),
                      min(a.budget, 50), method="lcmd", shortlist=min(a.shortlist, 1000))
    rss0 = utils.rss_mib()
    utils.reset_peak_rss()
    if train.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    times, cpu, parts, res = [], [], [], None
    for _ in range(a.repeat):
        res, wall, used = _clocked(lambda: ntkal.select_rows(tr_block, iter(chunks), a.budget, method="lcmd",
                                                           shortlist=a.shortlist))
        times.append(wall)
        cpu.append(used)
        parts.append(res.timings)
    peak = utils.peak_rss_mib()
    timings = {key: float(np.median([p[key] for p in parts])) for key in parts[0]}
    # profile: the parts of select_rows timed alone, each the fastest of `repeat` runs (wall and CPU time)
    prof = {}

    def part(name, fn):
        runs = [_clocked(fn) for _ in range(a.repeat)]
        prof[name + "_s"] = min(r[1] for r in runs)
        prof[name + "_cpu_s"] = min(r[2] for r in runs)
        return runs[-1][0]
    post, cen = part("posterior", lambda: (Posterior.from_rows(tr_block), Centres.from_rows(tr_block)))
    part("pv_scoring", lambda: [post.score(b) for b in chunks])
    pipe = Pipeline(Options(budget=a.budget, shortlist=a.shortlist).validate())
    state = part("score_and_shortlist", lambda: pipe.scan(Stream(iter(chunks), rows=True), post, PVScorer(post),
                                                          a.shortlist, centres=cen)[0])
    prof["shortlist_merge_s"] = prof["score_and_shortlist_s"] - prof["pv_scoring_s"]
    # the same scan with the error-aware score (residual mean: one more k-vector and GEMV per chunk)
    from ntkal.acquisition.scorers import ErrorScorer
    from ntkal.posterior import Accumulator
    acc = Accumulator()
    acc.add(tr_block, residuals=torch.randn(len(tr_block), generator=torch.Generator().manual_seed(0),
                                            dtype=torch.float64))
    post_err = Posterior.from_accumulator(acc)
    part("score_and_shortlist_error", lambda: pipe.scan(Stream(iter(chunks), rows=True), post_err,
                                                        ErrorScorer(post_err), a.shortlist, centres=cen)[0])
    prof["error_over_pv_scan"] = prof["score_and_shortlist_error_cpu_s"] / prof["score_and_shortlist_cpu_s"]
    psi = torch.stack([c.psi for c in state.top.payload]).to(LCMD_DTYPE)  # as the LCMD selector does
    centres = cen.psi.to(psi)

    def tp_init():
        dmin2 = torch.full((psi.shape[0],), float("inf"), dtype=psi.dtype)
        _init_from_centres(psi, centres, dmin2, torch.zeros(psi.shape[0], dtype=torch.int64))
    part("lcmd_tp_init", tp_init)
    return {"case": "ntkal", "n_train": a.n_train, "n_pool": a.pool_size, "k": a.sketch_dim, "budget": a.budget,
            "shortlist": a.shortlist, "chunk": a.chunk, "time_s": float(np.median(times)), "times_s": times,
            "cpu_s": float(np.median(cpu)), "cpu_times_s": cpu,
            "timings_s": timings, "profile_s": prof, "rss_before_mib": rss0, "peak_rss_in_call_mib": peak,
            "added_peak_mib": None if (peak is None or rss0 is None) else peak - rss0,
            "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if train.is_cuda else None,
            "status": res.status, "indices": [int(i) for i in res.indices],
            "shortlist_indices": [int(i) for i in res.shortlist]}


def _clocked(fn):
    """(fn(), wall s, CPU s of this process). With one thread the CPU time leaves out the time the
    process waited for a core, so on a shared, loaded box it is the steadier figure."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def child_bmdal(a) -> dict:
    import numpy as np
    np.Inf = getattr(np, "Inf", np.inf)  # bmdal_reg 3.0.2 uses np.Inf (removed in NumPy 2): its np.Inf is gone in NumPy 2
    import torch
    from bmdal_reg.bmdal.algorithms import select_batch
    from bmdal_reg.bmdal.feature_data import TensorFeatureData
    train, pool = datasets(a.n_train, a.pool_size, a.sketch_dim)
    train, pool = train.to(a.device), pool.to(a.device)
    rss0 = utils.rss_mib()
    utils.reset_peak_rss()
    t0 = time.perf_counter()
    idx, info = select_batch(batch_size=a.budget, models=[torch.nn.Identity()],
                             data={"train": TensorFeatureData(train), "pool": TensorFeatureData(pool)},
                             y_train=None, base_kernel="linear", kernel_transforms=[], selection_method="lcmd",
                             sel_with_train=True)
    t = time.perf_counter() - t0
    peak = utils.peak_rss_mib()
    return {"case": "bmdal", "n_train": a.n_train, "n_pool": a.pool_size, "k": a.sketch_dim, "budget": a.budget,
            "time_s": t, "info": {k: v for k, v in info.items() if isinstance(v, (int, float, str))},
            "rss_before_mib": rss0, "peak_rss_in_call_mib": peak,
            "added_peak_mib": None if (peak is None or rss0 is None) else peak - rss0,
            "indices": [int(i) for i in idx]}


def child_floor(a) -> dict:
    import torch
    _, pool = datasets(1, a.pool_size, a.sketch_dim)
    W = torch.randn(a.sketch_dim, a.sketch_dim, generator=torch.Generator().manual_seed(0))
    pool, W = pool.to(a.device), W.to(a.device)
    out = torch.empty(pool.shape[0], a.sketch_dim, device=a.device)
    torch.matmul(pool, W, out=out)
    rss0 = utils.rss_mib()
    utils.reset_peak_rss()

    def gemm():
        torch.matmul(pool, W, out=out)
        if pool.is_cuda:
            torch.cuda.synchronize()
    t = utils.timeit(gemm, repeat=5, warmup=1)
    cpu = min(_clocked(gemm)[2] for _ in range(5))
    flops = 2.0 * pool.shape[0] * a.sketch_dim * a.sketch_dim
    return {"case": "floor", "n_pool": a.pool_size, "k": a.sketch_dim, "time_s": t["median_s"], "timing": t,
            "cpu_s": cpu,
            "gflops": flops / t["median_s"] / 1e9, "rss_before_mib": rss0,
            "added_peak_mib": utils.peak_rss_mib() - rss0}


CHILDREN = {"ntkal": child_ntkal, "bmdal": child_bmdal, "floor": child_floor}


def child_argv(case: str, a, n_train: int = 1) -> list:
    return [utils.PY, "-m", "bench.bench_select", "--child", case, "--n-train", str(n_train),
            "--pool-size", str(a.pool_size), "--sketch-dim", str(a.sketch_dim), "--budget", str(a.budget),
            "--shortlist", str(a.shortlist), "--chunk", str(a.chunk), "--repeat", str(a.repeat), "--device", a.device]


def run_case(case: str, a, n_train: int = 1, timeout=None) -> dict:
    r = utils.run_child(child_argv(case, a, n_train), timeout=timeout, cwd=utils.REPO)
    out = utils.last_json_line(r["stdout"]) or {"case": case, "n_train": n_train}
    out.update({"child_wall_s": r["wall_s"], "child_peak_rss_mib": r["child_peak_rss_mib"], "rc": r["rc"],
                "timed_out": r["timed_out"]})
    if r["rc"] != 0 or r["timed_out"]:
        out["error"] = utils.tail(r["stderr"])
    return out


# --------------------------------------------------------------------------------------------------
# stage
# --------------------------------------------------------------------------------------------------

def add_args(p: argparse.ArgumentParser):
    p.add_argument("--pool-size", type=int, default=200_000, help="pool structures (default 200000)")
    p.add_argument("--n-train", type=int, default=None, help="one training-set size (default: 1000, 5000, 20000)")
    from ntkal.options import SKETCH_DIM
    p.add_argument("--sketch-dim", type=int, default=SKETCH_DIM, help=f"feature width k (default {SKETCH_DIM})")
    p.add_argument("--budget", type=int, default=100, help="batch size B (default 100)")
    p.add_argument("--shortlist", type=int, default=2000, help="PV shortlist size M (default 2000)")
    p.add_argument("--chunk", type=int, default=8192, help="pool structures per streamed RowBlock (default 8192)")
    p.add_argument("--repeat", type=int, default=3, help="timed select_rows calls per ntkal case (median)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the feature tensors live (cuda: PV scoring runs the Triton segment_quadform)")
    p.add_argument("--skip-bmdal", action="store_true", help="do not run the bmdal_reg baseline")
    p.add_argument("--bmdal-max-train", type=int, default=20000,
                   help="run bmdal_reg only for n_train <= this (default 20000)")
    p.add_argument("--bmdal-timeout", type=float, default=1800, help="seconds before a bmdal case is killed")


def run(a, argv) -> dict:
    n_trains = [a.n_train] if a.n_train else list(DEFAULT_N_TRAIN)
    floor = run_case("floor", a)
    rows = []
    for n in n_trains:
        nt = run_case("ntkal", a, n)
        bm = None
        if not a.skip_bmdal and n <= a.bmdal_max_train:
            bm = run_case("bmdal", a, n, timeout=a.bmdal_timeout)
        rows.append(summarise(n, nt, bm, floor))
    flat = None
    ok_rows = [r for r in rows if r.get("ntkal_s")]
    if len(ok_rows) >= 2:
        flat = max(r["ntkal_s"] for r in ok_rows) / min(r["ntkal_s"] for r in ok_rows)
    cpu_rows = [r for r in ok_rows if r.get("ntkal_cpu_s")]
    flat_cpu = (max(r["ntkal_cpu_s"] for r in cpu_rows) / min(r["ntkal_cpu_s"] for r in cpu_rows)
                if len(cpu_rows) >= 2 else None)
    goals = {
        "flat_in_n_train": {"max_over_min_time": flat, "target": "<= 1.5 (nearly flat)",
                            "met": None if flat is None else flat <= 1.5},
        "flat_in_n_train_cpu_time": {"max_over_min_cpu_time": flat_cpu, "target": "<= 1.5 (nearly flat)",
                                     "met": None if flat_cpu is None else flat_cpu <= 1.5},
        "under_10s_at_200k": {"worst_s": max((r["ntkal_s"] for r in ok_rows), default=None), "target": "<= 10 s",
                              "pool_size": a.pool_size,
                              "met": (None if not ok_rows or a.pool_size < 200_000
                                      else all(r["ntkal_s"] <= 10 for r in ok_rows))},
        "20x_vs_bmdal_at_5k": _goal_speedup(rows),
    }
    doc = utils.record("select", argv, rows, floor=floor, goals=goals,
                       data=("synthetic mixture of Gaussian families, column scales (1+j)^-0.75, one energy row "
                             "per structure, float32; train from 3/4 of the families, pool from all"),
                       settings={"pool_size": a.pool_size, "sketch_dim": a.sketch_dim, "budget": a.budget,
                                 "shortlist": a.shortlist, "chunk": a.chunk, "repeat": a.repeat,
                                 "device": a.device})
    return doc


def _goal_speedup(rows):
    r5 = [r for r in rows if r["n_train"] == 5000 and r.get("speedup")]
    if not r5:
        return {"speedup": None, "target": ">= 20x at n_train=5000", "met": None}
    return {"speedup": r5[0]["speedup"], "target": ">= 20x at n_train=5000", "met": r5[0]["speedup"] >= 20}


def summarise(n, nt, bm, floor) -> dict:
    row = {"n_train": n, "ntkal_s": nt.get("time_s"), "ntkal_rss_mib": nt.get("child_peak_rss_mib"),
           "ntkal_added_mib": nt.get("added_peak_mib"), "floor_s": floor.get("time_s"),
           "ntkal": nt, "bmdal": bm}
    tim = nt.get("timings_s") or {}
    row["posterior_s"], row["score_topm_s"], row["lcmd_s"] = tim.get("posterior"), tim.get("score"), tim.get("select")
    prof = nt.get("profile_s") or {}  # parts timed alone, after the timed calls
    row["pv_alone_s"], row["tp_init_alone_s"] = prof.get("pv_scoring_s"), prof.get("lcmd_tp_init_s")
    row["ntkal_cpu_s"], row["floor_cpu_s"] = nt.get("cpu_s"), floor.get("cpu_s")
    row["posterior_cpu_s"], row["pv_cpu_s"] = prof.get("posterior_cpu_s"), prof.get("pv_scoring_cpu_s")
    row["tp_init_cpu_s"] = prof.get("lcmd_tp_init_cpu_s")
    row["scan_pv_cpu_s"], row["scan_error_cpu_s"] = prof.get("score_and_shortlist_cpu_s"), \
        prof.get("score_and_shortlist_error_cpu_s")
    row["error_over_pv"] = prof.get("error_over_pv_scan")
    if row["ntkal_s"] and row["floor_s"]:
        row["ntkal_over_floor"] = row["ntkal_s"] / row["floor_s"]
    if bm is not None:
        row["bmdal_s"] = None if bm.get("error") else bm.get("time_s")
        row["bmdal_rss_mib"] = bm.get("child_peak_rss_mib")
        row["bmdal_added_mib"] = bm.get("added_peak_mib")
        if bm.get("timed_out"):
            row["bmdal_note"] = f"killed after {bm['child_wall_s']:.0f} s (--bmdal-timeout)"
            if row["ntkal_s"]:
                row["speedup_lower_bound"] = bm["child_wall_s"] / row["ntkal_s"]
                row["bmdal_note"] += f": bmdal/ntkal > {row['speedup_lower_bound']:.0f}"
        elif bm.get("error"):
            row["bmdal_note"] = "failed: " + bm["error"].strip().splitlines()[-1][:120]
        if row["bmdal_s"] and row["ntkal_s"]:
            row["ntkal_over_bmdal"] = row["ntkal_s"] / row["bmdal_s"]
            row["speedup"] = row["bmdal_s"] / row["ntkal_s"]
        if bm.get("indices") and nt.get("indices"):
            row["common_picks"] = len(set(bm["indices"]) & set(nt["indices"]))
            row["bmdal_picks_in_shortlist"] = len(set(bm["indices"]) & set(nt.get("shortlist_indices", [])))
    return row


COLUMNS = ["n_train", "ntkal_s", "posterior_s", "score_topm_s", "lcmd_s", "pv_alone_s", "tp_init_alone_s",
           "ntkal_cpu_s", "posterior_cpu_s", "pv_cpu_s", "tp_init_cpu_s", "floor_cpu_s", "scan_pv_cpu_s",
           "scan_error_cpu_s", "error_over_pv",
           "ntkal_rss_mib", "ntkal_added_mib", "floor_s", "ntkal_over_floor", "bmdal_s",
           "bmdal_rss_mib", "bmdal_added_mib", "speedup", "ntkal_over_bmdal", "common_picks", "bmdal_picks_in_shortlist",
           "bmdal_note"]
HEADERS = ["n_train", "ntkal s", "posterior s", "PV + top-M s", "LCMD s", "(PV alone s)", "(LCMD TP init alone s)",
           "ntkal CPU s", "(posterior CPU s)", "(PV CPU s)", "(TP init CPU s)", "GEMM floor CPU s",
           "(scan, PV: CPU s)", "(scan, error score: CPU s)", "error / PV scan",
           "ntkal peak RSS MiB", "ntkal added MiB", "GEMM floor s", "ntkal/floor", "bmdal s", "bmdal peak RSS MiB",
           "bmdal added MiB", "bmdal/ntkal", "ntkal/bmdal", "same picks", "bmdal picks in top-M", "bmdal note"]


def table(doc: dict) -> str:
    s = doc["settings"]
    out = [utils.header(doc),
           f"pool {s['pool_size']:,} × k={s['sketch_dim']} fp32, B={s['budget']}, M={s['shortlist']}, "
           f"chunks of {s['chunk']:,}; floor = one fp32 GEMM pool×(k×k): "
           f"{utils.fmt(doc['floor'].get('time_s'))} s ({utils.fmt(doc['floor'].get('gflops'))} GFLOP/s)\n",
           utils.markdown_table(doc["results"], COLUMNS, HEADERS), "", "Goals:"]
    for name, g in doc["goals"].items():
        met = {True: "met", False: "MISSED", None: "not measured"}[g.get("met")]
        vals = ", ".join(f"{k}={utils.fmt(v)}" for k, v in g.items() if k not in ("met", "target"))
        out.append(f"- {name}: {met} ({vals}; target {g['target']})")
    return "\n".join(out)


def main_child(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--child", choices=sorted(CHILDREN), required=True)
    add_args(p)
    a = p.parse_args(argv)
    a.n_train = a.n_train or 1
    print(json.dumps(CHILDREN[a.child](a), default=utils._jsonable))


if __name__ == "__main__":
    sys.exit(main_child())
