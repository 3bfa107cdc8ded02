"""Build five active-learning scenarios, each a shipped pretrained MACE model with a real blind spot.

Usage::

    python -m study.data.make_scenarios [--only NAME ...] [--out study/data/scenarios]

Pools are made as a user makes them: frames of the PRETRAINED model's own Langevin MD (the model
is the force field; ASE ``Langevin``, per-atom friction, no centre-of-mass fix) at several
temperatures, labelled afterwards by a cheap real oracle (ASE EMT for slabs, GFN2-xTB via tblite
for molecules). Many independent trajectories at one temperature are integrated together: one ASE
``Atoms`` holds them side by side, ``BatchedModel`` evaluates the model on all of them in one batch
(each with its own cell and pbc, so they never interact) and each trajectory draws its Langevin
noise from its own seeded generator, so a trajectory does not depend on which others share its
batch. The model runs in float32 on the CPU, as ``MACECalculator(..., default_dtype="float32")``
would.

Scenarios (file prefix = name):

* ``oc20ads``   -- model ``oc20_mace.model``; base = clean fcc(111)/(100) slabs of Cu/Pt/Au/Ni/Pd/Ag
  and H, O on Cu/Pt (60 % clean, as in pretraining; OH is left out: it is absent from pretraining and
  the model's force MAE on it is 90-230 meV/A, a blind spot itself); target = C, N, CO, NO, CH, NH
  on Cu/Pt/Au/Ni except the combinations pretraining holds (CO and N on Cu and Pt); 300/600/900 K.
* ``oc20metal`` -- same model and base (the same base trajectories); target = H, O, OH, CO on Pd/Ag.
* ``t1xhot``    -- model ``t1x_mace.model``; base = the pretraining molecules at 100/200/300 K
  (pretraining holds 300 K normal-mode samples; lower temperatures keep the base errors low);
  target = the same molecules at 2000/2500/3000 K.
* ``t1xnew``    -- same model and base; target = the 10 OOD molecules of make_t1x_like's partition
  at 300/600 K.
* ``t1xleft``   -- same model and base; target = the 18 molecules of make_t1x_like's in-distribution set
  that pretraining left out (alcohols, acids, an amide, pyridine, furan, ... -- other chemistry than
  t1xnew's alkenes and nitriles) at 300/600 K.

Files per scenario (gzip extxyz, labels ``info["REF_energy"]`` / ``arrays["REF_forces"]``):
``<name>_pool`` (2,500 frames, 15 % target), ``<name>_train`` (60 frames, 30 target),
``<name>_test_target`` (150), ``<name>_test_base`` (100), each split from its own trajectories,
and ``<name>_pretrain`` (a copy of the model's shipped pretraining split). Provenance in ``info``:
``region``, ``temperature``, ``trajectory``, ``frame``, ``config_type``, ``source`` (``model_md``),
and ``metal``/``facet``/``site``/``adsorbate`` or ``molecule``.

Dropped (and counted): frames whose oracle labels are non-finite or have a force component above
``--max-force`` (10 eV/A), and frames of an MD that blew up (an atom pair closer than 0.6 A; a slab
atom outside the cell in z; a molecule atom more than 4 A from all others); once a trajectory has
blown up all its later frames are dropped too. Kept frames are subsampled (seeded) to the exact
counts. The pretrained model's per-structure force MAE on the pool's base and target frames is
measured and written to ``<name>_summary.json`` and ``README.md``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import time
from collections import Counter

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.collections import g2
from ase.constraints import FixAtoms
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta
from ase.optimize import FIRE
from ase.units import fs

from ntkal.data import DATA_DIR
from study.data.make_oc20_like import FACETS, METALS_ID, METALS_OOD, TARGET_ADS, build_slab, labelled_copy
from study.data.make_si_data import write_split
from study.data.make_t1x_like import label as xtb_label
from study.data.make_t1x_like import molecule_names, partition

OUT = pathlib.Path(__file__).resolve().parent / "scenarios"
N = {"pool": 2500, "train": 60, "test_target": 150, "test_base": 100}
TARGET_SHARE = 0.15
N_TRAIN_TARGET = 30
MIN_DIST = 0.6
MOL_ISOLATED = 4.0

SLAB_MD = {"timestep_fs": 1.0, "friction": 0.02, "burn_in": 20, "stride": 10}
MOL_MD = {"timestep_fs": 0.5, "friction": 0.01, "burn_in": 60, "stride": 20}
SLAB_T = (300.0, 600.0, 900.0)
MOL_BASE_T = (100.0, 200.0, 300.0)
MOL_HOT_T = (2000.0, 2500.0, 3000.0)
MOL_NEW_T = (300.0, 600.0)

# C/N adsorbates the oc20 pretraining set does hold (CO and N on Cu and Pt): not part of the target
SEEN_CN = {("Cu", "CO"), ("Pt", "CO"), ("Cu", "N"), ("Pt", "N")}
# parts: one set of trajectories (a region of one or more scenarios)
PARTS = {
    "oc20base": {"family": "oc20", "region": "base",
                 "systems": [(m, ()) for m in METALS_ID + METALS_OOD] + [(m, (a,)) for m in ("Cu", "Pt") for a in ("H", "O")],
                 "temps": SLAB_T},
    "oc20ads": {"family": "oc20", "region": "target",
                "systems": [(m, (a,)) for a in TARGET_ADS for m in METALS_ID if (m, a) not in SEEN_CN], "temps": SLAB_T},
    "oc20metal": {"family": "oc20", "region": "target",
                  "systems": [(m, (a,)) for a in ("H", "O", "OH", "CO") for m in METALS_OOD], "temps": SLAB_T},
    "t1xbase": {"family": "t1x", "region": "base", "molecules": "pretrain", "temps": MOL_BASE_T},
    "t1xhot": {"family": "t1x", "region": "target", "molecules": "pretrain", "temps": MOL_HOT_T},
    "t1xnew": {"family": "t1x", "region": "target", "molecules": "ood", "temps": MOL_NEW_T},
    "t1xleft": {"family": "t1x", "region": "target", "molecules": "left_out", "temps": MOL_NEW_T},
}
# trajectories x frames per split and region (a little over the counts needed, for drops)
PLAN = {
    "base": {"pool": (110, 20), "train": (36, 1), "test_base": (24, 5)},
    "target": {"pool": (96, 5), "train": (40, 1), "test_target": (40, 5)},
}
# target parts whose model MD blows up (or meets |F| > 10 eV/A) often get more trajectories
PLAN_TARGET = {"oc20metal": {"pool": (140, 5), "train": (56, 1), "test_target": (56, 5)},
               "t1xhot": {"pool": (140, 5), "train": (56, 1), "test_target": (56, 5)}}
SPLIT_INDEX = {"pool": 0, "train": 1, "test_target": 2, "test_base": 3}
SCENARIOS = {
    "oc20ads": ("oc20base", "oc20ads"), "oc20metal": ("oc20base", "oc20metal"),
    "t1xhot": ("t1xbase", "t1xhot"), "t1xnew": ("t1xbase", "t1xnew"), "t1xleft": ("t1xbase", "t1xleft"),
}
MODEL = {"oc20": DATA_DIR / "oc20_mace.model", "t1x": DATA_DIR / "t1x_mace.model"}
PRETRAIN = {"oc20": DATA_DIR / "oc20_pretrain.extxyz.gz", "t1x": DATA_DIR / "t1x_pretrain.extxyz.gz"}


def featurizer(family: str):
    from study.metrics import predictor

    return predictor(MODEL[family], "float32", batch_size=100000)


class BatchedModel(Calculator):
    """The model's energy and forces for several independent systems held side by side in one Atoms.

    ``segments``: (start, stop, cell, pbc) of each system; a system listed in ``dead`` gets zero force."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, feat, segments):
        super().__init__()
        self.feat, self.segments, self.dead = feat, segments, set()

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        pos, num = self.atoms.positions, self.atoms.numbers
        live, subs = [], []
        for k, (i, j, cell, pbc) in enumerate(self.segments):
            if k in self.dead or not np.isfinite(pos[i:j]).all():
                self.dead.add(k)
                continue
            live.append(k)
            subs.append(Atoms(num[i:j], positions=pos[i:j], cell=cell, pbc=pbc))
        forces, energy = np.zeros((len(num), 3)), 0.0
        if subs:
            data = self.feat.batch(subs)
            out = self.feat.model(data, training=False, compute_force=True)
            f = out["forces"].detach().double().numpy()
            energy = float(out["energy"].detach().double().sum())
            ptr = data["ptr"].numpy()
            for n, k in enumerate(live):
                i, j = self.segments[k][:2]
                forces[i:j] = f[ptr[n]:ptr[n + 1]]
        self.results = {"energy": energy, "forces": forces}


class SegmentRNG:
    """Langevin's noise drawn per system from its own generator (``standard_normal(size=(natoms, 3))``)."""

    def __init__(self, rngs, sizes):
        self.rngs, self.sizes = rngs, sizes

    def standard_normal(self, size):
        return np.concatenate([r.standard_normal(size=(n, size[1])) for r, n in zip(self.rngs, self.sizes)])


def blown(atoms: Atoms, slab: bool) -> bool:
    """MD blew up: non-finite positions, a pair closer than MIN_DIST, an atom gone (see module doc)."""
    if not np.isfinite(atoms.positions).all():
        return True
    d = atoms.get_all_distances(mic=slab)
    np.fill_diagonal(d, np.inf)
    if d.min() < MIN_DIST:
        return True
    if slab:
        z = atoms.positions[:, 2]
        return bool(z.min() < 0 or z.max() > atoms.cell[2, 2])
    return bool(d.min(axis=1).max() > MOL_ISOLATED)


def trajectory_specs(part: str, split: str, n_traj: int, seed: int, molecules) -> list[dict]:
    """Trajectory specs of one part and split: systems cycle, temperatures cycle, facet/site drawn."""
    p = PARTS[part]
    rng = np.random.default_rng([seed, list(PARTS).index(part), SPLIT_INDEX[split]])
    specs = []
    for t in range(n_traj):
        spec = {"trajectory": f"{part}-{split}-{t:04d}", "temperature": float(p["temps"][t % len(p["temps"])]),
                "rng_seed": [seed, list(PARTS).index(part), SPLIT_INDEX[split], t]}
        if p["family"] == "oc20":
            metal, ads = p["systems"][(t // len(p["temps"])) % len(p["systems"])]
            facet = str(rng.choice(list(FACETS)))
            spec.update(metal=metal, adsorbates=ads, facet=facet, site=str(rng.choice(FACETS[facet][1])))
        else:
            mols = molecules[p["molecules"]]
            spec["molecule"] = mols[(t // len(p["temps"])) % len(mols)]
        specs.append(spec)
    return specs


def initial_structure(spec: dict, rng: np.random.Generator) -> Atoms:
    if "metal" in spec:
        atoms = build_slab(spec["metal"], spec["facet"], spec["adsorbates"], spec["site"])
        atoms.calc = EMT()
        FIRE(atoms, logfile=None).run(fmax=0.2, steps=25)
        atoms.calc = None
        atoms.rattle(stdev=0.05, rng=rng)
    else:
        atoms = g2[spec["molecule"]].copy()
        atoms.set_initial_magnetic_moments(None)
        atoms.rattle(stdev=0.01, rng=rng)
    return atoms


def run_batch(specs, n_frames: int, feat, slab: bool):
    """Run the specs (one temperature) together; return [(spec, k, Atoms or None, reason)] per frame."""
    md = SLAB_MD if slab else MOL_MD
    rngs = [np.random.default_rng(s["rng_seed"]) for s in specs]
    systems = [initial_structure(s, r) for s, r in zip(specs, rngs)]
    segments, fixed, start = [], [], 0
    for a in systems:
        segments.append((start, start + len(a), a.cell.copy(), a.pbc.copy()))
        for c in a.constraints:
            fixed += [start + i for i in c.get_indices()]
        start += len(a)
    big = Atoms(np.concatenate([a.numbers for a in systems]), positions=np.concatenate([a.positions for a in systems]))
    calc = BatchedModel(feat, segments)
    big.calc = calc
    if not slab:  # relax on the model's own surface first (a user's usual start)
        FIRE(big, logfile=None).run(fmax=0.05, steps=100)
    if fixed:
        big.set_constraint(FixAtoms(indices=fixed))
    temp = specs[0]["temperature"]
    mom = []
    for a, r in zip(systems, rngs):
        thermalize_momenta(a, temp, rng=r)
        mom.append(a.get_momenta())
    big.set_momenta(np.concatenate(mom))
    dyn = Langevin(big, timestep=md["timestep_fs"] * fs, temperature_K=temp, friction=md["friction"] / fs,
                   fixcm=False, rng=SegmentRNG(rngs, [len(a) for a in systems]), logfile=None)
    dyn.run(md["burn_in"])
    out = []
    for k in range(n_frames):
        dyn.run(md["stride"])
        for n, (spec, a) in enumerate(zip(specs, systems)):
            i, j = segments[n][:2]
            frame = Atoms(a.numbers, positions=big.positions[i:j], cell=a.cell, pbc=a.pbc)
            if n in calc.dead or blown(frame, slab):
                calc.dead.add(n)
                out.append((spec, k, None, "blown"))
            else:
                out.append((spec, k, frame, None))
    return out


def label_frames(raw, slab: bool, max_force: float, region: str):
    """Oracle labels and provenance; returns (frames, drop counter)."""
    frames, drops = [], Counter()
    for spec, k, frame, why in raw:
        if frame is None:
            drops[why] += 1
            continue
        out, fmax = labelled_copy(frame) if slab else xtb_label(frame)
        if not np.isfinite(fmax) or fmax > max_force or not np.isfinite(out.info.get("REF_energy", np.nan)):
            drops["max_force" if np.isfinite(fmax) else "label_failed"] += 1
            continue
        info = {"region": region, "temperature": spec["temperature"], "trajectory": spec["trajectory"],
                "frame": k, "source": "model_md"}
        if slab:
            ads = spec["adsorbates"]
            info.update(config_type="adsorbate" if ads else "slab", metal=spec["metal"], facet=spec["facet"],
                        site=spec["site"] if ads else "none", adsorbate="+".join(ads) if ads else "none")
        else:
            info.update(config_type="model_md", molecule=spec["molecule"])
        out.info.update(info)
        frames.append(out)
    return frames, drops


def make_part(part: str, seed: int, max_force: float, feat, molecules, log):
    """{split: kept frames} and {split: drops} of one part (all its splits)."""
    p = PARTS[part]
    slab = p["family"] == "oc20"
    frames, drops = {}, {}
    for split, (n_traj, n_frames) in PLAN_TARGET.get(part, PLAN[p["region"]]).items():
        specs = trajectory_specs(part, split, n_traj, seed, molecules)
        t0 = time.time()
        raw = []
        for temp in p["temps"]:
            raw += run_batch([s for s in specs if s["temperature"] == temp], n_frames, feat, slab)
        t1 = time.time()
        frames[split], drops[split] = label_frames(raw, slab, max_force, p["region"])
        log(f"  {part}/{split}: {n_traj} traj x {n_frames} frames -> kept {len(frames[split])}, "
            f"dropped {dict(drops[split])}; MD {t1 - t0:.0f} s, labels {time.time() - t1:.0f} s")
    return frames, drops


def pick(frames, n: int, rng: np.random.Generator, name: str):
    if len(frames) < n:
        raise RuntimeError(f"{name}: only {len(frames)} frames kept, {n} needed")
    return [frames[i] for i in np.sort(rng.choice(len(frames), n, replace=False))]


def blind_spot(feat, pool) -> dict:
    from study.metrics import per_structure_errors

    _, df = per_structure_errors(feat, pool)
    reg = np.array([a.info["region"] for a in pool])
    res = {}
    for r in ("base", "target"):
        res[r] = {"median": float(np.median(df[reg == r])), "mean": float(np.mean(df[reg == r]))}
    res["ratio_median"] = res["target"]["median"] / res["base"]["median"]
    res["ratio_mean"] = res["target"]["mean"] / res["base"]["mean"]
    return res


def build(name: str, out: pathlib.Path, seed: int, max_force: float, cache: dict, log) -> dict:
    base_part, target_part = SCENARIOS[name]
    family = PARTS[base_part]["family"]
    t0 = time.time()
    feat = featurizer(family)
    molecules = partition(molecule_names(), 0)
    molecules["left_out"] = sorted(set(molecules["in_distribution"]) - set(molecules["pretrain"]))
    for part in (base_part, target_part):
        if part not in cache:
            cache[part] = make_part(part, seed, max_force, feat, molecules, log)
    (bf, bd), (tf, td) = cache[base_part], cache[target_part]
    rng = np.random.default_rng([seed, list(SCENARIOS).index(name)])
    n_target = round(TARGET_SHARE * N["pool"])
    splits = {
        "pool": pick(tf["pool"], n_target, rng, "pool target") + pick(bf["pool"], N["pool"] - n_target, rng, "pool base"),
        "train": pick(tf["train"], N_TRAIN_TARGET, rng, "train target")
        + pick(bf["train"], N["train"] - N_TRAIN_TARGET, rng, "train base"),
        "test_target": pick(tf["test_target"], N["test_target"], rng, "test_target"),
        "test_base": pick(bf["test_base"], N["test_base"], rng, "test_base"),
    }
    order = rng.permutation(N["pool"])
    splits["pool"] = [splits["pool"][i] for i in order]
    trajs = {s: {a.info["trajectory"] for a in imgs} for s, imgs in splits.items()}
    for s1 in trajs:
        for s2 in trajs:
            assert s1 == s2 or not trajs[s1] & trajs[s2], (s1, s2)
    keys = ("region", "temperature", "metal", "adsorbate") if family == "oc20" else ("region", "temperature", "molecule")
    for split, imgs in splits.items():
        write_split(out / f"{name}_{split}.extxyz.gz", imgs, keys[:2])
    shutil.copyfile(PRETRAIN[family], out / f"{name}_pretrain.extxyz.gz")
    spot = blind_spot(feat, splits["pool"])
    drops = {f"{part}/{split}": dict(d) for part, dd in ((base_part, bd), (target_part, td)) for split, d in dd.items()}
    summary = {
        "name": name, "model": MODEL[family].name, "base_part": base_part, "target_part": target_part,
        "base_temperatures_K": list(PARTS[base_part]["temps"]), "target_temperatures_K": list(PARTS[target_part]["temps"]),
        "counts": {s: len(v) for s, v in splits.items()},
        "pool_target_share": sum(a.info["region"] == "target" for a in splits["pool"]) / N["pool"],
        "pool_trajectories": {r: len({a.info["trajectory"] for a in splits["pool"] if a.info["region"] == r})
                              for r in ("base", "target")},
        "drops": drops, "blind_spot_force_mae_meV_per_A": spot, "seconds": round(time.time() - t0, 1),
    }
    (out / f"{name}_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(f"{name}: force MAE base median {spot['base']['median']:.1f} mean {spot['base']['mean']:.1f}; target median "
        f"{spot['target']['median']:.1f} mean {spot['target']['mean']:.1f} meV/A; ratio median "
        f"{spot['ratio_median']:.2f} mean {spot['ratio_mean']:.2f}; {summary['seconds']:.0f} s")
    return summary


def write_readme(out: pathlib.Path) -> None:
    """README.md from the scenarios' summaries; its hand-kept "## Notes" section (choices, run history) is kept."""
    old = (out / "README.md").read_text() if (out / "README.md").exists() else ""
    notes = old[old.index("## Notes"):] if "## Notes" in old else ""
    lines = ["# Active-learning scenarios (pretrained model + real blind spot)", "",
             "Made by `python -m study.data.make_scenarios` (see its docstring); one scenario: "
             "`python -m study.data.make_scenarios --only NAME`. Pools are the pretrained model's own "
             "Langevin MD, labelled by EMT (oc20*) or GFN2-xTB (t1x*). Shared base parts (oc20base, t1xbase) are "
             "the same trajectories in every scenario of a family. Blind spot = the pretrained model's "
             "per-structure force MAE (meV/A, float32) on the pool's target vs base frames.", ""]
    for name in SCENARIOS:
        path = out / f"{name}_summary.json"
        if not path.exists():
            continue
        s = json.loads(path.read_text())
        b = s["blind_spot_force_mae_meV_per_A"]
        lines += [f"## {name}", "",
                  f"- command: `python -m study.data.make_scenarios --only {name}`",
                  f"- model: {s['model']}; base {s['base_part']} at {s['base_temperatures_K']} K, "
                  f"target {s['target_part']} at {s['target_temperatures_K']} K",
                  f"- counts: {s['counts']}; pool target share {s['pool_target_share']:.3f}; "
                  f"pool trajectories {s['pool_trajectories']}",
                  f"- dropped (before subsampling to the counts): {s['drops']}",
                  f"- force MAE base median {b['base']['median']:.1f} / mean {b['base']['mean']:.1f}; target median "
                  f"{b['target']['median']:.1f} / mean {b['target']['mean']:.1f}; "
                  f"**ratio median {b['ratio_median']:.2f}, mean {b['ratio_mean']:.2f}**",
                  f"- time: {s['seconds']} s (wall clock, including the shared base part when that call built it)", ""]
    (out / "README.md").write_text("\n".join(lines) + ("\n" + notes if notes else ""))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-force", type=float, default=10.0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    cache: dict = {}
    for name in args.only:
        build(name, out, args.seed, args.max_force, cache, log)
    write_readme(out)


if __name__ == "__main__":
    main()
