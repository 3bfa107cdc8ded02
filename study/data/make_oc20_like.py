"""Build the OC20-like study data: small fcc metal slabs with H/C/N/O adsorbates, labelled by ASE's EMT.

Usage::

    python -m study.data.make_oc20_like            # writes ntkal/data/oc20_<split>.extxyz.gz

Every structure is a frame of a short MD trajectory: a 2x2x3 fcc(111) or fcc(100)
slab (12 metal atoms, 6 A vacuum each side, periodic in-plane only) with 0-2 adsorbates on a
random site is relaxed for a few FIRE steps, rattled (0.05 A), given Maxwell-Boltzmann velocities
at 300, 600 or 1200 K and run with Langevin MD (0.5 fs steps, bottom layer fixed); frames are taken
after a 50 fs burn-in, every 10 fs. Each split uses its own trajectories (own seeds), so no
trajectory contributes to two splits.

Splits (``oc20_<split>.extxyz.gz``):

* ``pretrain``       -- clean slabs of all six metals, plus H and O (and, on 1 in 4 adsorbate
  trajectories, CO or N) on Cu and Pt;
* ``train``, ``pool``, ``test_id`` -- single adsorbates (H, O, OH, C, N, CO, NO, CH, NH) on
  Cu/Pt/Au/Ni; ``train`` (the initial labelled set) takes one frame per trajectory;
* ``test_ood_ads``   -- co-adsorbed pairs (combinations never seen together) on Cu/Pt/Au/Ni;
* ``test_ood_metal`` -- single adsorbates on Pd/Ag (metals seen only as clean slabs in pretrain).

Labels: ``info["REF_energy"]`` (EMT total energy, eV) and ``arrays["REF_forces"]`` (eV/A, all
atoms, fixed ones included), no calculator attached. Provenance in ``info``: ``config_type``
(``slab``, ``adsorbate`` or ``coadsorbate``), ``metal``, ``facet``, ``site``, ``adsorbate``
(``none``, one name, or ``A+B``), ``temperature`` (K), ``region``, ``trajectory``, ``frame``.
``region`` is ``"target"`` when an adsorbate contains C or N (the chemistry the pretrain set
barely covers: only CO and N, on 40 of its frames), else ``"base"``; trajectories alternate between the regions (adsorbates cycle within
one), so half of every non-pretrain split is target and a pool-shift study can subsample 10 % or
50 % target pools.

Frames with any force component magnitude |F| above ``--max-force`` (default 10 eV/A) are dropped
as exploded; the number dropped is printed.
"""

from __future__ import annotations

import pathlib

import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, fcc100, fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta
from ase.optimize import FIRE
from ase.units import fs

from study.data.make_si_data import generator_parser, write_split

METALS_ID = ("Cu", "Pt", "Au", "Ni")
METALS_OOD = ("Pd", "Ag")
FACETS = {"111": (fcc111, ("ontop", "bridge", "fcc", "hcp")),
          "100": (fcc100, ("ontop", "bridge", "hollow"))}
# binding atom first at the origin, the rest above it (gas-phase-like bond lengths, A)
ADSORBATES = {
    "H": [("H", 0.0)], "O": [("O", 0.0)], "N": [("N", 0.0)], "C": [("C", 0.0)],
    "OH": [("O", 0.0), ("H", 0.97)], "CO": [("C", 0.0), ("O", 1.15)],
    "NO": [("N", 0.0), ("O", 1.15)], "CH": [("C", 0.0), ("H", 1.10)],
    "NH": [("N", 0.0), ("H", 1.03)],
}
# pretrain adsorbates (on Cu and Pt only): mostly H and O, and a little C and N so that every
# element has a trained embedding; 1 in 4 trajectories carries CO or N
PRETRAIN_ADS = (("H",), ("O",), ("H",), ("CO",), ("O",), ("H",), ("O",), ("N",))
BASE_ADS = ("H", "O", "OH")
TARGET_ADS = ("C", "N", "CO", "NO", "CH", "NH")
# co-adsorbed pairs for test_ood_ads: half base-only pairs, half with C/N
BASE_PAIRS = (("H", "O"), ("H", "OH"), ("O", "OH"), ("H", "H"), ("O", "O"))
TARGET_PAIRS = (("H", "CO"), ("O", "C"), ("OH", "NO"), ("N", "CH"), ("NH", "CO"), ("C", "N"))
SITE_HEIGHT = {"ontop": 1.8, "bridge": 1.5, "fcc": 1.2, "hcp": 1.2, "hollow": 1.1}
TEMPERATURES = (300.0, 600.0, 1200.0)
VACUUM = 6.0
TIMESTEP_FS = 0.5
BURN_IN_STEPS = 100
STRIDE_STEPS = 20


def region_of(adsorbates) -> str:
    """'target' if any adsorbate contains C or N, else 'base'."""
    return "target" if any(set(a) & {"C", "N"} for a in adsorbates) else "base"


def build_slab(metal: str, facet: str, adsorbates, site: str) -> Atoms:
    """2x2x3 slab with the adsorbates on `site`, the second one shifted by one surface cell in x and y."""
    builder, _ = FACETS[facet]
    slab = builder(metal, size=(2, 2, 3), vacuum=VACUUM)
    slab.pbc = (True, True, False)
    for k, name in enumerate(adsorbates):
        ads = Atoms([s for s, _ in ADSORBATES[name]], positions=[(0, 0, z) for _, z in ADSORBATES[name]])
        add_adsorbate(slab, ads, SITE_HEIGHT[site], position=site, offset=(k, k), mol_index=0)
    slab.set_constraint(FixAtoms(indices=[i for i, t in enumerate(slab.get_tags()) if t == 3]))
    return slab


def labelled_copy(atoms: Atoms) -> tuple[Atoms, float]:
    """Fresh Atoms (no constraint, velocities or calculator) with EMT labels; returns it and max |F|."""
    out = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    out.calc = EMT()
    energy = float(out.get_potential_energy())
    forces = out.get_forces().copy()
    out.calc = None
    out.info["REF_energy"] = energy
    out.arrays["REF_forces"] = forces
    return out, float(np.abs(forces).max())


def run_trajectory(spec: dict, n_frames: int, rng: np.random.Generator, max_force: float):
    """Relax, rattle and run Langevin MD for one spec; return (frames, n_dropped)."""
    atoms = build_slab(spec["metal"], spec["facet"], spec["adsorbates"], spec["site"])
    atoms.calc = EMT()
    FIRE(atoms, logfile=None).run(fmax=0.2, steps=25)
    atoms.rattle(stdev=0.05, rng=rng)
    thermalize_momenta(atoms, spec["temperature"], rng=rng)
    dyn = Langevin(atoms, timestep=TIMESTEP_FS * fs, temperature_K=spec["temperature"],
                   friction=0.02 / fs, fixcm=False, rng=rng, logfile=None)
    frames, dropped = [], 0
    dyn.run(BURN_IN_STEPS)
    for k in range(n_frames):
        dyn.run(STRIDE_STEPS)
        frame, fmax = labelled_copy(atoms)
        if not np.isfinite(fmax) or fmax > max_force:
            dropped += 1
            continue
        ads = spec["adsorbates"]
        frame.info.update({
            "config_type": ("slab", "adsorbate", "coadsorbate")[len(ads)],
            "metal": spec["metal"], "facet": spec["facet"],
            "site": spec["site"] if ads else "none",
            "adsorbate": "+".join(ads) if ads else "none",
            "temperature": spec["temperature"], "region": region_of(ads),
            "trajectory": spec["trajectory"], "frame": k,
        })
        frames.append(frame)
    return frames, dropped


def draw_spec(rng: np.random.Generator, metals, adsorbates) -> dict:
    """Random metal, facet, site and temperature for the given adsorbate names."""
    facet = str(rng.choice(list(FACETS)))
    return {"metal": str(rng.choice(metals)), "facet": facet,
            "site": str(rng.choice(FACETS[facet][1])), "adsorbates": tuple(adsorbates),
            "temperature": float(rng.choice(TEMPERATURES))}


def split_specs(split: str, rng: np.random.Generator) -> list[dict]:
    """Trajectory specs of one split (see the module docstring for what each split holds)."""
    if split == "pretrain":
        specs = [draw_spec(rng, (m,), ()) for m in METALS_ID + METALS_OOD for _ in range(12)]
        specs += [draw_spec(rng, ("Cu", "Pt"), PRETRAIN_ADS[i % len(PRETRAIN_ADS)]) for i in range(40)]
        return specs
    n_traj = {"train": 24, "pool": 300, "test_id": 75, "test_ood_ads": 50, "test_ood_metal": 50}[split]
    if split == "test_ood_ads":
        base, target = BASE_PAIRS, TARGET_PAIRS
    else:
        base, target = [(a,) for a in BASE_ADS], [(a,) for a in TARGET_ADS]
    metals = METALS_OOD if split == "test_ood_metal" else METALS_ID
    specs = []
    for i in range(n_traj):
        # alternate regions (~50 % target in every split); cycle the adsorbates within a region
        choices = target if i % 2 else base
        specs.append(draw_spec(rng, metals, choices[(i // 2) % len(choices)]))
    return specs


# frames per trajectory: the initial training set takes one frame from each of its trajectories
FRAMES = {"pretrain": 4, "train": 1, "pool": 4, "test_id": 2, "test_ood_ads": 2, "test_ood_metal": 2}
SPLITS = tuple(FRAMES)


def make_split(split: str, seed: int, max_force: float) -> tuple[list[Atoms], int]:
    """All frames of one split; its trajectories are seeded from (seed, split index, trajectory index)."""
    split_idx = SPLITS.index(split)
    specs = split_specs(split, np.random.default_rng([seed, split_idx]))
    frames, dropped = [], 0
    for t, spec in enumerate(specs):
        spec["trajectory"] = f"{split}-{t:04d}"
        got, n_drop = run_trajectory(spec, FRAMES[split], np.random.default_rng([seed, split_idx, t]),
                                     max_force)
        frames += got
        dropped += n_drop
    return frames, dropped


def main(argv=None) -> None:
    args = generator_parser(__doc__, SPLITS).parse_args(argv)

    for split in args.splits:
        images, dropped = make_split(split, args.seed, args.max_force)
        write_split(pathlib.Path(args.out) / f"oc20_{split}.extxyz.gz", images, ("region", "metal", "adsorbate"),
                    note=f"dropped {dropped}; ")


if __name__ == "__main__":
    main()
