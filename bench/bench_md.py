"""md: ntkal.Calculator in molecular dynamics — cost per step against the plain MACE calculator, what
error_every=k misses, memory over 10,000 steps, and the error estimate against a 4-member committee with
real (EMT) labels.

Parts (--parts; default cost,committee; `--long` runs the memory part alone):
- cost: per model (shipped si, shipped oc20, mp0-medium with random weights; a ~64-atom structure each),
  ONE child process runs Langevin MD with five calculators side by side, each on its own copy of the same
  start: plain `mace.calculators.MACECalculator`, ntkal.Calculator with the energy kernel, with the joint
  kernel and 8 force probes, and the joint kernel with error_every 5 and 10. The calculators take turns
  step by step (the order rotates every round), so load on the box hits all of them alike; the figure is
  the median step time after warm-up ÷ the plain calculator's. Peak memory: one more child per model
  and calculator runs the same MD alone; its peak RSS during the MD (VmHWM reset after setup) ÷ the plain
  calculator's child's.
- committee (oc20 chemistry, EMT as the oracle): Langevin MD driven by the shipped oc20 model through
  ntkal.Calculator (joint, 8 probes, error_every=1, posterior from the oc20 train split + a pretrain
  sample) from starts of test_id (in-region) and test_ood_ads / test_ood_metal (out-of-region); every
  frame is labelled afterwards with ase's EMT. Committee: 4 members fine-tuned from the shipped model
  (mace_run_train, naive protocol, seeds 0-3, each on its own bootstrap resample of the same train +
  pretrain sample the posterior sees; cached under $NTKAL_CACHE/md_committee, default ~/.cache/ntkal).
  Scores per frame: ntkal_force_error; committee max and mean per-atom force deviation (DP-GEN's
  max_devi_f). Against the real per-frame RMS force error of the shipped model: Spearman, AUROC for frames
  above the threshold, shares flagged, ntkal's predicted/real ratio in and out of region, cost per step.
  The same per-step series give error_every=k's misses (k = 1, 5, 10; frames t with t % k == 0 carry a
  fresh estimate, as the cost part's check confirms for the Calculator).
- memory (`--long`): 10,000 Langevin steps of the shipped si model on an 8-atom cell through
  ntkal.Calculator (joint, 8 probes), RSS every 500 steps; the slope in MiB per 1,000 steps.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import utils

CONFIGS = ("plain", "energy", "joint8", "joint8_every5", "joint8_every10")
MEMORY_CONFIGS = ("plain", "energy", "joint8")
GOALS = {"energy": {"shipped": 1.5, "mp0-medium": 1.5}, "joint8": {"shipped": 4.0, "mp0-medium": 12.0},
         "memory": 2.0}
FIGURE = utils.REPO / "docs" / "figures" / "md_committee_oc20.png"


def add_args(p: argparse.ArgumentParser):
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, for the tests: every part, si only, a few steps, an untrained committee")
    p.add_argument("--long", action="store_true", help="the memory part alone (10,000 steps)")
    p.add_argument("--parts", default=None, help="comma list of cost,committee,memory (default cost,committee)")
    p.add_argument("--models", default="si,oc20,mp0-medium")
    p.add_argument("--n-atoms", type=int, default=64, help="atoms of the cost part's structures (about)")
    p.add_argument("--steps", type=int, default=30, help="timed MD steps per calculator (cost part)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--memory-steps", type=int, default=20, help="MD steps of each memory child (cost part)")
    p.add_argument("--memory-only", action="store_true", help="cost part: the memory children alone")
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--sketch-dim", type=int, default=512)
    p.add_argument("--dtype", default="float64", help="of every model call (the shipped models are float64)")
    p.add_argument("--pretrain-size", type=int, default=100, help="pretrain sample in the posterior")
    p.add_argument("--every", default="1,5,10")
    p.add_argument("--md-steps", type=int, default=150, help="steps per start (committee part)")
    p.add_argument("--starts", default="test_id:4,test_ood_ads:2,test_ood_metal:2",
                   help="split:count of MD starts (committee part)")
    p.add_argument("--temperature", type=float, default=800.0, help="K (committee part)")
    p.add_argument("--timestep", type=float, default=1.0, help="fs")
    p.add_argument("--threshold", type=float, default=250.0, help="meV/Å, the fixed upper threshold")
    p.add_argument("--percentile", type=float, default=90.0, help="the other threshold: this percentile of real errors")
    p.add_argument("--committee-size", type=int, default=4)
    p.add_argument("--committee-epochs", type=int, default=8)
    p.add_argument("--long-steps", type=int, default=10000)
    p.add_argument("--long-every", type=int, default=500)
    p.add_argument("--figure", default=str(FIGURE))


# --------------------------------------------------------------------------------------------------
# models, structures, posteriors, calculators
# --------------------------------------------------------------------------------------------------

def read(path, n=None, seed=0):
    from ntkal.io import read_structures
    out = list(read_structures(path))
    if n is not None and n < len(out):
        rng = np.random.default_rng(seed)
        out = [out[i] for i in sorted(rng.choice(len(out), n, replace=False))]
    return out


def oc20_sets(pretrain_size: int, n_train=None):
    """(files, the train split's first n_train structures (all: None), a pretraining sample of pretrain_size) of
    the shipped oc20 data, as the MD studies fit their posteriors (seed 1: the same sample in every study)."""
    from ntkal.data import dataset_files
    files = dataset_files("oc20")
    pre = read(files["pretrain"], pretrain_size, seed=1) if pretrain_size else []
    return files, read(files["train"])[:n_train], pre


def emt_label(atoms):
    """A copy with EMT's REF_energy / REF_forces (ase.calculators.emt: H C N O Al Ni Cu Pd Ag Pt Au)."""
    from ase.calculators.emt import EMT
    a = atoms.copy()
    a.calc = EMT()
    # raw forces: a constraint (the fixed bottom layer of the MD) must not zero the labels of fixed atoms
    e, f = float(a.get_potential_energy()), a.get_forces(apply_constraint=False).copy()
    a.calc = None
    a.info["REF_energy"], a.arrays["REF_forces"] = e, f
    return a


def setup(name: str, n_atoms: int, pretrain_size: int, quick: bool = False):
    """(model path, MD start structure, labelled structures, pretrain sample) of a cost-part model."""
    from ntkal.data import dataset_files
    if name in ("si", "oc20"):
        files = dataset_files(name)
        test = read(files["test_id"])
        if name == "si":
            base = next(a for a in test if len(a) == 8)
        else:
            base = next(a for a in test if a.info.get("region") == "base")
        reps = max(1, round((n_atoms / len(base)) ** (1 / 3 if name == "si" else 1 / 2)))
        start = base.repeat((reps, reps, reps if name == "si" else 1))
        train = read(files["train"])
        pre = read(files["pretrain"], pretrain_size, seed=1) if pretrain_size else []
        if quick:
            train = train[:8]
        return files["model"], start, train, pre
    from . import archs
    start = archs.structures(name, n_atoms, 1)[0]
    # labelled: small rattled Cu slabs with CO, EMT-labelled (the random-weight model needs some residuals)
    train = [emt_label(archs.slab(14, seed=100 + i, rattle=0.1)) for i in range(4 if quick else 8)]
    return archs.model_path(name), start, train, []


def featurizer(model, kernel, sketch_dim, dtype):
    """The fit's featurizer: exact force rows for the labelled structures (the Calculator makes its probe rows)."""
    import torch

    import ntkal
    return ntkal.MACEFeaturizer(str(model), kernel=kernel, sketch_dim=sketch_dim, force_probes=None,
                                dtype=getattr(torch, dtype))


def ntkal_calculator(post, fz, probes, every=1):
    """ntkal.Calculator from a fitted posterior and its featurizer (same model, dtype, sketch)."""
    import ntkal
    return ntkal.Calculator(fz, post, force_probes=probes, error_every=every)


def plain_calculator(model, dtype="float64"):
    from mace.calculators import MACECalculator
    return MACECalculator(model_paths=str(model), device="cpu", default_dtype=dtype)


def posteriors(model, train, pre, a, kernels=("energy", "joint")):
    import ntkal
    out = {}
    for kernel in kernels:
        fz = featurizer(model, kernel, a["sketch_dim"], a["dtype"])
        out[kernel] = (fz, ntkal.fit(fz, train, pretrain=pre or None))
    return out


def calculators(model, names, posts, a):
    out = {}
    for name in names:
        if name == "plain":
            out[name] = plain_calculator(model, a["dtype"])
            continue
        kernel = "energy" if name == "energy" else "joint"
        every = int(name.split("every")[1]) if "every" in name else 1
        fz, post = posts[kernel]
        out[name] = ntkal_calculator(post, fz, a["probes"], every)
    return out


def langevin(atoms, temperature, timestep_fs, seed, friction=0.02):
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta
    thermalize_momenta(atoms, temperature, rng=np.random.default_rng(seed))
    return Langevin(atoms, timestep=timestep_fs * units.fs, temperature_K=temperature, friction=friction,
                    rng=np.random.default_rng(seed + 1))


def running(start, calc, seed, temperature=300.0):
    """A copy of `start` on `calc` with its Langevin integrator, forces of frame 0 computed."""
    at = start.copy()
    at.calc = calc
    dyn = langevin(at, temperature, 1.0, seed=seed)
    at.get_forces()
    return at, dyn


def fix_bottom_layer(atoms):
    """FixAtoms on the lowest layer of metal atoms (as the oc20 generator's MD)."""
    from ase.constraints import FixAtoms
    metal = np.array([z > 10 for z in atoms.numbers])
    if not metal.any() or atoms.pbc[2]:
        return atoms
    z = atoms.positions[:, 2]
    zmin = z[metal].min()
    atoms.set_constraint(FixAtoms(indices=np.where(metal & (z < zmin + 0.7))[0]))
    return atoms


def ntkal_values(results) -> dict:
    out = {}
    for k, v in results.items():
        if k.startswith("ntkal_") and np.ndim(v) == 0:
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                out[k] = None
    return out


# --------------------------------------------------------------------------------------------------
# children (one process per configuration: own peak RSS, no shared warm caches)
# --------------------------------------------------------------------------------------------------

def child_cost(spec: dict) -> dict:
    """All calculators of one model in one process, taking turns step by step."""
    import torch
    torch.set_num_threads(1)
    model, start, train, pre = setup(spec["model"], spec["n_atoms"], spec["pretrain_size"], spec["quick"])
    t0 = time.perf_counter()
    posts = posteriors(model, train, pre, spec)
    fit_s = time.perf_counter() - t0
    calcs = calculators(model, CONFIGS, posts, spec)
    atoms, dyns = {}, {}
    for name, calc in calcs.items():
        atoms[name], dyns[name] = running(start, calc, seed=7)  # frame 0's call outside the timed steps
    names = list(CONFIGS)
    times = {n: [] for n in names}
    fresh = {n: [] for n in names if n.startswith("joint8")}  # per step: did the call give an estimate?
    values = {n: [] for n in fresh}
    for r in range(spec["warmup"] + spec["steps"]):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t = time.perf_counter()
            dyns[n].step()
            times[n].append(time.perf_counter() - t)
            if n in fresh:
                res = atoms[n].calc.results
                fresh[n].append(int(res["ntkal_error_age"]) == 0)
                values[n].append(float(res["ntkal_force_error"]))
    w = spec["warmup"]
    med = {n: float(np.median(times[n][w:])) for n in names}
    paired = {n: float(np.median(np.array(times[n][w:]) / np.array(times["plain"][w:]))) for n in names}
    # call 0 is the get_forces before the loop, step i is call i + 1: fresh when (i + 1) % k == 0
    fresh_ok = {n: f == [(i + 1) % (int(n.split("every")[1]) if "every" in n else 1) == 0 for i in range(len(f))]
                for n, f in fresh.items()}
    drift = float(np.abs(atoms["joint8"].positions - atoms["plain"].positions).max())
    out = {"model": spec["model"], "n_atoms": len(start), "formula": start.get_chemical_formula(),
           "n_params": int(sum(p.numel() for p in calcs["plain"].models[0].parameters())),
           "n_train": len(train), "n_pretrain": len(pre), "fit_s": fit_s, "steps": spec["steps"], "warmup": w,
           "median_step_s": med, "ratio": {n: med[n] / med["plain"] for n in names},
           # error_every=k: k-1 of k steps are plain calls, so the median hides the error steps; the mean does not
           "mean_ratio": {n: float(np.mean(times[n][w:]) / np.mean(times["plain"][w:])) for n in names},
           "paired_ratio": paired, "step_s": times,
           "positions_max_diff_joint8_vs_plain": drift,
           "fresh": fresh, "fresh_is_every_kth_call": fresh_ok, "force_error_series": values,
           "example_results": ntkal_values(atoms["joint8"].calc.results),
           "atom_force_error_shape": list(np.shape(atoms["joint8"].calc.results.get("ntkal_atom_force_error", ())))}
    return out


def child_memory(spec: dict) -> dict:
    """One calculator of one model alone: RSS after setup, peak RSS during `memory_steps` MD steps."""
    import torch
    torch.set_num_threads(1)
    base = utils.rss_mib()
    model, start, train, pre = setup(spec["model"], spec["n_atoms"], spec["pretrain_size"], spec["quick"])
    name = spec["config"]
    posts = {} if name == "plain" else posteriors(model, train, pre, spec,
                                                   kernels=("energy",) if name == "energy" else ("joint",))
    at, dyn = running(start, calculators(model, [name], posts, spec)[name], seed=7)
    del train, pre
    gc.collect()
    fit_rss = utils.rss_mib()
    from ntkal.features.memory import release_free_heap
    trimmed = release_free_heap()  # hand the fit's freed heap back, so RSS is what the calculator holds
    setup_rss = utils.rss_mib()
    reset = utils.reset_peak_rss()
    for _ in range(spec["memory_steps"]):
        dyn.step()
    return {"model": spec["model"], "config": name, "rss_after_imports_mib": base, "rss_after_fit_mib": fit_rss,
            "malloc_trim": trimmed, "rss_after_setup_mib": setup_rss,
            "peak_rss_md_mib": utils.peak_rss_mib(), "peak_reset": reset, "rss_end_mib": utils.rss_mib()}


def run_child(kind: str, spec: dict, timeout=3600) -> dict:
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = utils.run_child([utils.PY, "-m", "bench.bench_md", "--child", kind, json.dumps(spec)], timeout=timeout,
                        env=env, cwd=str(utils.REPO))
    got = utils.last_json_line(r["stdout"])
    if r["rc"] != 0 or got is None:
        return {"error": f"child {kind} {spec.get('model')} {spec.get('config', '')} rc={r['rc']}: "
                         + utils.tail(r["stderr"], 3000), "model": spec.get("model"), "config": spec.get("config")}
    got["child_peak_rss_mib"] = r["child_peak_rss_mib"]
    got["child_wall_s"] = r["wall_s"]
    return got


def cost_part(a, log) -> dict:
    spec0 = {"n_atoms": a.n_atoms, "pretrain_size": a.pretrain_size, "probes": a.probes, "sketch_dim": a.sketch_dim,
             "dtype": a.dtype, "steps": a.steps, "warmup": a.warmup, "memory_steps": a.memory_steps,
             "quick": a.quick}
    rows, mem = [], []
    for model in a.models.split(","):
        spec = dict(spec0, model=model)
        if not a.memory_only:
            log(f"[cost] {model}: timing child")
            c = run_child("cost", spec)
            rows.append(c)
            if "error" in c:
                log(c["error"])
        for cfg in (("plain", "joint8") if a.quick else MEMORY_CONFIGS):
            log(f"[cost] {model}: memory child {cfg}")
            m = run_child("memory", dict(spec, config=cfg))
            if "error" in m:
                log(m["error"])
            mem.append(m)
    # ratios of the memory children against the plain one of the same model
    for m in mem:
        plain = next((p for p in mem if p.get("model") == m.get("model") and p.get("config") == "plain"), None)
        if plain and "error" not in m and "error" not in plain:
            m["peak_ratio"] = m["peak_rss_md_mib"] / plain["peak_rss_md_mib"]
            m["added_ratio"] = ((m["peak_rss_md_mib"] - m["rss_after_imports_mib"])
                                / max(plain["peak_rss_md_mib"] - plain["rss_after_imports_mib"], 1e-9))
            m["added_mib_vs_plain"] = m["peak_rss_md_mib"] - plain["peak_rss_md_mib"]
    return {"timing": rows, "memory": mem, "goals": cost_goals(rows, mem)}


def cost_goals(rows, mem) -> dict:
    out = {}
    for r in rows:
        if "error" in r:
            continue
        kind = "mp0-medium" if r["model"].startswith("mp0") else "shipped"
        for cfg in ("energy", "joint8"):
            goal = GOALS[cfg][kind]
            out[f"{r['model']} {cfg} step ≤ {goal}×"] = {"value": r["ratio"][cfg], "target": goal,
                                                         "met": bool(r["ratio"][cfg] <= goal)}
    for m in mem:
        if "peak_ratio" in m and m["config"] != "plain":
            out[f"{m['model']} {m['config']} peak RSS ≤ 2×"] = {"value": m["peak_ratio"], "target": GOALS["memory"],
                                                               "met": bool(m["peak_ratio"] <= GOALS["memory"])}
    return out


# --------------------------------------------------------------------------------------------------
# committee against ntkal on oc20 MD, real EMT labels
# --------------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    from .archs import cache_dir as archs_cache
    return archs_cache().parent / "md_committee"


def _file_hash(path) -> str:
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=8).hexdigest()


def committee_members(model, labelled, valid, a, log):
    """4 members fine-tuned from `model` (naive protocol), member j with seed j on its own bootstrap resample
    of `labelled`; cached by the model's and data's content and the recipe."""
    from study.config import FinetuneConfig
    from study.finetune import finetune, foundation_e0s
    cfg = FinetuneConfig(protocol="naive", epochs=a.committee_epochs, batch_size=4, lr=5e-3, energy_weight=1.0,
                         forces_weight=100.0, valid_size=len(valid), in_process=False)
    ids = ",".join(f"{x.info.get('REF_energy'):.8f}" for x in labelled)
    key = hashlib.blake2b(f"{_file_hash(model)}|{ids}|{cfg}|bootstrap".encode(), digest_size=6).hexdigest()
    folder = cache_dir() / key
    paths, seconds = [], []
    e0s = None
    for j in range(a.committee_size):
        path = folder / f"member{j}.model"
        if not path.exists():
            e0s = e0s or foundation_e0s(model)
            rng = np.random.default_rng(1000 + j)
            boot = [labelled[i] for i in rng.integers(0, len(labelled), len(labelled))]
            log(f"[committee] fine-tuning member {j} ({len(boot)} structures, {cfg.epochs} epochs)")
            import tempfile
            with tempfile.TemporaryDirectory(prefix="ntkal-md-member-") as tmp:
                res = finetune(cfg, Path(model), boot, valid, Path(tmp), j, e0s)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp_path = path.with_suffix(f".tmp{os.getpid()}")
                tmp_path.write_bytes(res.model_path.read_bytes())
                os.replace(tmp_path, path)
                (folder / f"member{j}.json").write_text(json.dumps({"seconds": res.seconds, "command": res.command,
                                                                    "curve": res.curve}, default=str))
        meta = folder / f"member{j}.json"
        seconds.append(json.loads(meta.read_text()).get("seconds") if meta.exists() else None)
        paths.append(path)
    return paths, {"recipe": "fine-tuned from the shipped oc20 model, naive protocol (mace_run_train "
                             "--foundation_model), member j: --seed j, bootstrap resample of the labelled set",
                   "epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size, "n_labelled": len(labelled),
                   "cache": str(folder), "train_seconds": seconds}


def perturbed_members(model, size, folder: Path):
    """--quick only: copies of the model with seeded weight noise (no training; exercises the code path)."""
    import torch
    paths = []
    for j in range(size):
        m = torch.load(str(model), map_location="cpu", weights_only=False)
        g = torch.Generator().manual_seed(j)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=g, dtype=p.dtype))
        path = folder / f"perturbed{j}.model"
        torch.save(m, path)
        paths.append(path)
    return paths, {"recipe": "QUICK MODE: the shipped model with 2 % weight noise per member (untrained)"}


def md_starts(spec: str):
    from ntkal.data import dataset_files
    files = dataset_files("oc20")
    out = []
    for part in spec.split(","):
        split, n = part.split(":")
        structs = read(files[split])
        n = int(n)
        # alternate regions within a split (base / target adsorbates), evenly spread over its trajectories
        by_region = {}
        for s in structs:
            by_region.setdefault(s.info.get("region"), []).append(s)
        regions = sorted(by_region)
        for i in range(n):
            pool = by_region[regions[i % len(regions)]]
            s = pool[(i // len(regions)) * max(1, len(pool) // max(1, n)) % len(pool)].copy()
            s.info["start_split"] = split
            s.info["in_region"] = split == "test_id"
            out.append(s)
    return out


def committee_part(a, log) -> dict:
    import tempfile

    import torch
    torch.set_num_threads(1)
    files, train, pre = oc20_sets(a.pretrain_size)
    model = files["model"]
    spec = {"probes": a.probes, "sketch_dim": a.sketch_dim, "dtype": a.dtype}
    t0 = time.perf_counter()
    fz, post = posteriors(model, train, pre, spec, kernels=("joint",))["joint"]
    fit_s = time.perf_counter() - t0
    tmpdir = tempfile.TemporaryDirectory(prefix="ntkal-md-quick-")
    if a.quick:
        members, minfo = perturbed_members(model, a.committee_size, Path(tmpdir.name))
    else:
        valid = read(files["pool"], 5, seed=3)
        members, minfo = committee_members(model, train + pre, valid, a, log)
    calc = ntkal_calculator(post, fz, a.probes, 1)
    plain = plain_calculator(model, a.dtype)
    mcalcs = [plain_calculator(p, a.dtype) for p in members]
    frames = []
    starts = md_starts(a.starts)
    for si, s in enumerate(starts):
        atoms = fix_bottom_layer(s.copy())
        calc.reset()  # a new trajectory: no held error
        atoms.calc = calc
        dyn = langevin(atoms, a.temperature, a.timestep, seed=100 + si)
        atoms.get_forces()
        log(f"[committee] MD {si + 1}/{len(starts)} from {s.info['start_split']} ({s.info.get('region')}, "
            f"{s.get_chemical_formula()}), {a.md_steps} steps")
        for t in range(a.md_steps + 1):
            res = calc.results
            frames.append({"run": si, "t": t, "split": s.info["start_split"], "in_region": s.info["in_region"],
                           "region": s.info.get("region"), "atoms": atoms.copy(),
                           "forces": np.array(res["forces"]), "pred_f": float(res["ntkal_force_error"]),
                           "pred_e": float(res.get("ntkal_energy_error", np.nan)), "step_s": None})
            if t == a.md_steps:
                break
            t1 = time.perf_counter()
            dyn.step()
            frames[-1]["step_s"] = time.perf_counter() - t1
    log(f"[committee] labelling {len(frames)} frames with EMT; committee and plain calls")
    for i, fr in enumerate(frames):
        at = fr["atoms"]
        at.calc = None
        real = emt_label(at)
        df = fr["forces"] - real.arrays["REF_forces"]
        fr["real_f"] = 1e3 * float(np.sqrt(np.mean(df ** 2)))
        fr["real_fmax"] = float(np.abs(real.arrays["REF_forces"]).max())
        changes = ["positions", "numbers", "cell", "pbc"]
        t1 = time.perf_counter()
        plain.calculate(at, ["energy", "forces"], changes)
        fr["plain_s"] = time.perf_counter() - t1
        fr["ntkal_call_s"] = None
        if i % 4 == 0:  # ntkal's call on the same frame, back to back with the plain and committee calls
            t1 = time.perf_counter()
            calc.calculate(at, ["energy", "forces"], changes)
            fr["ntkal_call_s"] = time.perf_counter() - t1
        fm = []
        t1 = time.perf_counter()
        for mc in mcalcs:
            mc.calculate(at, ["energy", "forces"], ["positions", "numbers", "cell", "pbc"])
            fm.append(np.array(mc.results["forces"]))
        fr["committee_s"] = time.perf_counter() - t1
        fm = np.stack(fm)                                                # [M, N, 3]
        dev = 1e3 * np.sqrt(((fm - fm.mean(axis=0)) ** 2).sum(axis=2).mean(axis=0))  # per atom, meV/Å
        fr["cmax"], fr["cmean"] = float(dev.max()), float(dev.mean())
        fr["dft_pred_diff"] = 1e3 * float(np.sqrt(np.mean((fm.mean(axis=0) - fr["forces"]) ** 2)))
        del fr["atoms"], fr["forces"]
    tmpdir.cleanup()
    summary = committee_metrics(frames, a)
    summary["every"] = every_metrics(frames, [int(k) for k in a.every.split(",")], summary["thresholds"])
    summary.update({"members": minfo, "fit_s": fit_s, "n_train": len(train), "n_pretrain": len(pre),
                    "settings": {"temperature_K": a.temperature, "timestep_fs": a.timestep, "md_steps": a.md_steps,
                                 "starts": a.starts, "friction": 0.02, "bottom_layer_fixed": True,
                                 "kernel": "joint", "probes": a.probes, "sketch_dim": a.sketch_dim}})
    if a.figure:
        summary["figure"] = plot(frames, summary, a.figure)
    summary["frames"] = [{k: v for k, v in f.items()} for f in frames]
    return summary


def auroc(score, positive) -> float | None:
    from scipy.stats import rankdata
    score, positive = np.asarray(score, float), np.asarray(positive, bool)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        return None
    r = rankdata(score)
    return float((r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def spearman(x, y) -> float | None:
    from scipy.stats import spearmanr
    return float(spearmanr(x, y)[0]) if len(x) > 2 else None


METHODS = {"ntkal": "pred_f", "committee max": "cmax", "committee mean": "cmean"}


def committee_metrics(frames, a) -> dict:
    real = np.array([f["real_f"] for f in frames])
    inr = np.array([f["in_region"] for f in frames])
    thresholds = {"p%g" % a.percentile: float(np.percentile(real, a.percentile)), "fixed": float(a.threshold)}
    rows = []
    for method, key in METHODS.items():
        s = np.array([f[key] for f in frames])
        row = {"method": method, "spearman": spearman(s, real), "spearman_in": spearman(s[inr], real[inr]),
               "spearman_out": spearman(s[~inr], real[~inr])}
        for tname, thr in thresholds.items():
            pos = real > thr
            row[f"auroc_{tname}"] = auroc(s, pos)
            row[f"n_above_{tname}"] = int(pos.sum())
            own = s > thr                    # its own number on the same meV/Å scale
            row[f"recall_own_{tname}"] = float(own[pos].mean()) if pos.any() else None
            row[f"flagged_own_{tname}"] = float(own.mean())
            row[f"precision_own_{tname}"] = float(pos[own].mean()) if own.any() else None
            # matched rate: it flags as many frames as are really above the threshold
            if pos.any():
                cut = np.sort(s)[::-1][int(pos.sum()) - 1]
                top = s >= cut
                row[f"recall_matched_{tname}"] = float(top[pos].mean())
            else:
                row[f"recall_matched_{tname}"] = None
        if method == "ntkal":
            ratio = s / np.maximum(real, 1e-9)
            row["ratio_median_all"] = float(np.median(ratio))
            row["ratio_median_in"] = float(np.median(ratio[inr])) if inr.any() else None
            row["ratio_median_out"] = float(np.median(ratio[~inr])) if (~inr).any() else None
        row["median_score"] = float(np.median(s))
        rows.append(row)
    step = np.array([f["step_s"] for f in frames if f["step_s"] is not None])
    plain = np.array([f["plain_s"] for f in frames])
    comm = np.array([f["committee_s"] for f in frames])
    ncall = np.array([f["ntkal_call_s"] for f in frames if f["ntkal_call_s"] is not None])
    cost = {"ntkal_step_s_median": float(np.median(step)), "plain_call_s_median": float(np.median(plain)),
            "ntkal_call_s_median": float(np.median(ncall)),
            "ntkal_call_over_plain_call": float(np.median(ncall) / np.median(plain)),
            "committee_4_calls_s_median": float(np.median(comm)),
            "ntkal_step_over_plain_call": float(np.median(step) / np.median(plain)),
            "committee_over_plain_call": float(np.median(comm) / np.median(plain))}
    by_split = {}
    for f in frames:
        by_split.setdefault(f["split"], []).append(f["real_f"])
    return {"methods": rows, "thresholds": thresholds, "n_frames": len(frames), "n_in_region": int(inr.sum()),
            "real_f_median": float(np.median(real)), "real_f_median_by_split":
                {k: float(np.median(v)) for k, v in by_split.items()},
            "real_f_max": float(real.max()), "cost": cost}


def every_metrics(frames, ks, thresholds) -> dict:
    """What error_every=k misses, from the error_every=1 series of each run: frame t carries a fresh estimate
    when t % k == 0. Two views, at each threshold T (meV/Å):
    - against k = 1's flags (ntkal_force_error > T at every frame): how many of those frames k flags at the
      frame itself, later (at the next fresh frame, within the same run), or not at all;
    - against the real errors (real > T): flagged at the frame, at the next fresh frame, or missed."""
    runs = {}
    for f in frames:
        runs.setdefault(f["run"], []).append(f)
    out = {}
    for tname, thr in thresholds.items():
        for k in ks:
            for view in ("k1", "real"):
                on = late = miss = 0
                delays = []
                for fr in runs.values():
                    pred = np.array([f["pred_f"] for f in fr])
                    real = np.array([f["real_f"] for f in fr])
                    target = pred > thr if view == "k1" else real > thr
                    n = len(fr)
                    for t in np.where(target)[0]:
                        if t % k == 0 and pred[t] > thr:
                            on += 1
                            delays.append(0)
                            continue
                        nxt = t + (-t) % k if t % k else t + k
                        if nxt < n and pred[nxt] > thr:
                            late += 1
                            delays.append(int(nxt - t))
                        else:
                            miss += 1
                total = on + late + miss
                out[f"{tname} k={k} vs {view}"] = {
                    "threshold": thr, "k": k, "view": view, "n_target_frames": total,
                    "on_time": on / total if total else None, "late": late / total if total else None,
                    "missed": miss / total if total else None,
                    "mean_delay_steps": float(np.mean(delays)) if delays else None}
    return out


def plot(frames, summary, path) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ntkal.io.write import save_png
    real = np.array([f["real_f"] for f in frames])
    inr = np.array([f["in_region"] for f in frames])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.3), sharex=True)
    thr = summary["thresholds"]
    for ax, (method, key) in zip(axes, METHODS.items()):
        s = np.array([f[key] for f in frames])
        ax.scatter(real[inr], s[inr], s=5, alpha=0.5, label="test_id starts (in region)")
        ax.scatter(real[~inr], s[~inr], s=5, alpha=0.5, label="test_ood starts (out of region)")
        lo = max(1.0, min(real.min(), s.min()))
        hi = max(real.max(), s.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
        for v, ls in zip(thr.values(), (":", "-.")):
            ax.axvline(v, color="grey", ls=ls, lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        row = next(r for r in summary["methods"] if r["method"] == method)
        ax.set_title(f"{method}: Spearman {row['spearman']:.2f}")
        ax.set_xlabel("real RMS force error of the MD model (EMT), meV/Å")
        ax.set_ylabel("ntkal_force_error, meV/Å" if method == "ntkal" else f"{method} per-atom force deviation, meV/Å")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"oc20 MD ({summary['n_frames']} frames): predicted vs real per frame; vertical lines: thresholds "
                 + ", ".join(f"{k} = {v:.0f}" for k, v in thr.items()), fontsize=9)
    save_png(fig, path)
    return str(Path(path).resolve().relative_to(utils.REPO)) if str(Path(path).resolve()).startswith(str(utils.REPO)) \
        else str(path)


# --------------------------------------------------------------------------------------------------
# memory over a long run
# --------------------------------------------------------------------------------------------------

def memory_part(a, log) -> dict:
    import torch
    from ntkal.data import dataset_files
    torch.set_num_threads(1)
    files = dataset_files("si")
    model = files["model"]
    start = next(x for x in read(files["test_id"]) if len(x) == 8)
    train = read(files["train"])
    pre = read(files["pretrain"], a.pretrain_size, seed=1) if a.pretrain_size else []
    spec = {"probes": a.probes, "sketch_dim": a.sketch_dim, "dtype": a.dtype}
    fz, post = posteriors(model, train, pre, spec, kernels=("joint",))["joint"]
    calc = ntkal_calculator(post, fz, a.probes, 1)
    atoms, dyn = running(start, calc, seed=11)
    del train, pre
    gc.collect()
    samples = [{"step": 0, "rss_mib": utils.rss_mib(), "s": 0.0}]
    t0 = time.perf_counter()
    for step in range(1, a.long_steps + 1):
        dyn.step()
        if step % a.long_every == 0:
            samples.append({"step": step, "rss_mib": utils.rss_mib(), "s": time.perf_counter() - t0,
                            "force_error": float(calc.results["ntkal_force_error"])})
            log(f"[memory] step {step}: RSS {samples[-1]['rss_mib']:.1f} MiB")
    steps = np.array([s["step"] for s in samples[1:]], float)
    rss = np.array([s["rss_mib"] for s in samples[1:]], float)
    slope = float(np.polyfit(steps, rss, 1)[0] * 1000) if len(steps) > 1 else None
    half = len(rss) // 2
    slope2 = float(np.polyfit(steps[half:], rss[half:], 1)[0] * 1000) if len(steps) - half > 1 else None
    return {"model": "si", "n_atoms": len(start), "steps": a.long_steps, "sample_every": a.long_every,
            "samples": samples, "slope_mib_per_1000_steps": slope, "slope_second_half_mib_per_1000_steps": slope2,
            "rss_first_sample_mib": float(rss[0]) if len(rss) else None, "rss_last_mib": float(rss[-1]) if len(rss) else None,
            "rss_max_mib": float(rss.max()) if len(rss) else None, "peak_rss_mib": utils.peak_rss_mib(),
            "wall_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------------
# stage entry points
# --------------------------------------------------------------------------------------------------

def apply_quick(a):
    a.models = "si"
    a.n_atoms, a.steps, a.warmup, a.memory_steps = 16, 3, 1, 2
    a.sketch_dim, a.pretrain_size = 64, 0
    a.md_steps, a.starts, a.every = 6, "test_id:1,test_ood_ads:1", "1,5"
    a.long_steps, a.long_every = 20, 10
    if a.figure == str(FIGURE):
        a.figure = None


def run(a, argv) -> dict:
    if a.quick:
        apply_quick(a)
    default = "cost,committee,memory" if a.quick else ("memory" if a.long else "cost,committee")
    parts = (a.parts or default).split(",")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    out = {}
    if "cost" in parts:
        out["cost"] = cost_part(a, log)
    if "committee" in parts:
        out["committee"] = committee_part(a, log)
    if "memory" in parts:
        out["memory"] = memory_part(a, log)
    results = []
    for r in out.get("cost", {}).get("timing", []):
        if "error" not in r:
            results.append({"part": "cost", "model": r["model"], **{f"ratio_{k}": v for k, v in r["ratio"].items()}})
    return utils.record("md", argv, results, parts=out, settings={k: v for k, v in vars(a).items() if k != "json"})


def table(doc) -> str:
    parts = doc["parts"]
    lines = [utils.header(doc)]
    if "cost" in parts:
        rows = []
        for r in parts["cost"]["timing"]:
            if "error" in r:
                rows.append({"model": r["model"], "plain": "error"})
                continue
            rows.append({"model": r["model"], "atoms": r["n_atoms"], "plain_ms": 1e3 * r["median_step_s"]["plain"],
                         **{c: r["ratio"][c] for c in CONFIGS if c != "plain"},
                         **{f"m_{c}": r["mean_ratio"][c] for c in ("joint8_every5", "joint8_every10")},
                         **{f"p_{c}": r["paired_ratio"][c] for c in ("energy", "joint8")}})
        lines.append("Cost per MD step ÷ the plain MACECalculator's (median after warm-up, same run):\n")
        lines.append(utils.markdown_table(rows, ["model", "atoms", "plain_ms", "energy", "joint8", "m_joint8_every5",
                                                 "m_joint8_every10", "p_energy", "p_joint8"],
                                          ["model", "atoms", "plain ms/step", "energy", "joint 8 probes",
                                           "joint, every 5 (mean)", "joint, every 10 (mean)", "energy (paired)",
                                           "joint (paired)"]))
        mrows = [m for m in parts["cost"]["memory"] if "error" not in m]
        lines.append("\nPeak RSS during MD (own child per calculator):\n")
        lines.append(utils.markdown_table(mrows, ["model", "config", "rss_after_imports_mib", "rss_after_setup_mib",
                                                  "peak_rss_md_mib", "peak_ratio", "added_ratio"],
                                          ["model", "calculator", "RSS after imports MiB", "after setup MiB",
                                           "peak in MD MiB", "peak ÷ plain", "peak − imports, ÷ plain's"]))
        lines.append("\nGoals:\n")
        lines.append(utils.markdown_table([{"goal": k, **v} for k, v in parts["cost"]["goals"].items()],
                                          ["goal", "value", "met"]))
    if "committee" in parts:
        c = parts["committee"]
        lines.append(f"\nCommittee vs ntkal on {c['n_frames']} oc20 MD frames ({c['n_in_region']} in region), "
                     f"thresholds {c['thresholds']} meV/Å, real median {c['real_f_median']:.0f} meV/Å:\n")
        t1, t2 = list(c["thresholds"])
        lines.append(utils.markdown_table(c["methods"], ["method", "spearman", "spearman_in", "spearman_out",
                                                         f"auroc_{t1}", f"auroc_{t2}", f"recall_own_{t1}",
                                                         f"recall_own_{t2}", f"precision_own_{t2}",
                                                         f"recall_matched_{t1}", "ratio_median_in", "ratio_median_out"]))
        lines.append("\ncost: " + json.dumps({k: round(v, 4) for k, v in c["cost"].items()}))
        lines.append("\nerror_every:\n")
        lines.append(utils.markdown_table(list(c["every"].values()), ["threshold", "k", "view", "n_target_frames",
                                                                      "on_time", "late", "missed", "mean_delay_steps"]))
    if "memory" in parts:
        m = parts["memory"]
        lines.append(f"\nMemory over {m['steps']} steps: slope {m['slope_mib_per_1000_steps']} MiB / 1,000 steps "
                     f"(second half {m['slope_second_half_mib_per_1000_steps']}), RSS {m['rss_first_sample_mib']} → "
                     f"{m['rss_last_mib']} MiB")
    return "\n".join(lines)


def _child_main(argv) -> int:
    kind, spec = argv[0], json.loads(argv[1])
    import mace  # noqa: F401  (before e3nn)
    fn = {"cost": child_cost, "memory": child_memory}[kind]
    print(json.dumps(fn(spec), default=utils._jsonable))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(_child_main(sys.argv[2:]))
    sys.exit("run as python -m bench md")
