"""Build the T1x-like study data: small C/H/N/O molecules from ASE's g2 set, labelled by GFN2-xTB.

Usage (needs the ``study`` extra, ``pip install tblite==0.8.0``)::

    python -m study.data.make_t1x_like             # writes ntkal/data/t1x_<split>.extxyz.gz

Molecules: the closed-shell members of ``ase.collections.g2`` made only of C, H, N and O with
3 to 12 atoms. Each is relaxed with GFN2-xTB (tblite), its Hessian is taken by central finite
differences of the forces, and structures come from two sources:

* ``normal_mode`` -- the relaxed geometry displaced along all vibrational modes with classical
  Boltzmann amplitudes, q_k ~ N(0, kT / w_k^2) in mass-weighted coordinates (w_k floored at
  200 cm^-1 so that soft torsions are not stretched into bond breaking);
* ``md`` -- short Langevin MD with GFN2-xTB at 1000 or 1500 K (0.5 fs steps, 50 fs burn-in,
  then one frame every 20 fs), each trajectory with its own seed.

Splits (``t1x_<split>.extxyz.gz``); a fixed random partition puts 10 molecules aside for OOD and
about 60 % of the rest into a pretrain subset:

* ``pretrain`` -- 300 K normal-mode samples of the pretrain-subset molecules only;
* ``train``, ``pool``, ``test_id`` -- all in-distribution molecules, half normal-mode samples
  (300/600/1000 K), half MD frames; ``train`` takes one frame per MD trajectory;
* ``test_ood`` -- the same recipe on the 10 molecules absent from every other split.

Labels: ``info["REF_energy"]`` (GFN2-xTB total energy, eV) and ``arrays["REF_forces"]`` (eV/A),
computed with a fresh calculator per structure, no calculator attached. Provenance in ``info``:
``config_type`` (= ``source``), ``molecule``, ``source`` (``normal_mode``/``md``), ``temperature``
(K), ``region`` (``"target"`` for MD frames, ``"base"`` for normal-mode samples, so a pool-shift
study can under-represent the hot MD region), ``trajectory`` (MD only, else ``"none"``).

Structures whose SCF fails or that have a force component above ``--max-force`` (default
10 eV/A) are dropped as exploded; the number dropped is printed.
"""

from __future__ import annotations

import pathlib

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import CalculationFailed
from ase.collections import g2
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta
from ase.optimize import BFGS

from study.data.make_si_data import generator_parser, write_split

NM_TEMPERATURES = (300.0, 600.0, 1000.0)
MD_TEMPERATURES = (1000.0, 1500.0)
PRETRAIN_TEMPERATURE = 300.0
N_OOD_MOLECULES = 10
PRETRAIN_FRACTION = 0.6
MIN_FREQ_CM = 200.0
TIMESTEP_FS = 0.5
BURN_IN_STEPS = 100
STRIDE_STEPS = 40
FD_STEP = 0.005  # A, finite-difference displacement for the Hessian
# split: (normal-mode samples, MD trajectories, frames per MD trajectory)
PLAN = {"pretrain": (400, 0, 0), "train": (12, 12, 1), "pool": (650, 82, 8),
        "test_id": (75, 25, 3), "test_ood": (60, 20, 3)}
SPLITS = tuple(PLAN)


def calculator():
    """A fresh GFN2-xTB calculator (tblite), silent."""
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0)


def molecule_names() -> list[str]:
    """Closed-shell C/H/N/O molecules of g2 with 3-12 atoms, in g2's order."""
    names = []
    for name in g2.names:
        a = g2[name]
        closed = abs(a.get_initial_magnetic_moments().sum()) < 1e-8 and a.numbers.sum() % 2 == 0
        if set(a.get_chemical_symbols()) <= set("CHNO") and 3 <= len(a) <= 12 and closed:
            names.append(name)
    return names


def partition(names, seed: int) -> dict[str, list[str]]:
    """Fixed random partition into OOD molecules, a pretrain subset and the in-distribution set."""
    rng = np.random.default_rng([seed, 99])
    perm = [names[i] for i in rng.permutation(len(names))]
    ood, ind = sorted(perm[:N_OOD_MOLECULES]), sorted(perm[N_OOD_MOLECULES:])
    pre = sorted(perm[N_OOD_MOLECULES:N_OOD_MOLECULES + round(PRETRAIN_FRACTION * len(ind))])
    return {"ood": ood, "in_distribution": ind, "pretrain": pre}


def label(atoms: Atoms) -> tuple[Atoms, float]:
    """Fresh Atoms with GFN2-xTB labels (no calculator kept); returns it and max |F| (inf on SCF failure)."""
    out = Atoms(atoms.numbers, positions=atoms.positions)
    out.calc = calculator()
    try:
        energy = float(out.get_potential_energy())
        forces = out.get_forces().copy()
    except CalculationFailed:
        return out, np.inf
    out.calc = None
    out.info["REF_energy"] = energy
    out.arrays["REF_forces"] = forces
    return out, float(np.abs(forces).max())


def relax_and_modes(name: str):
    """GFN2-xTB minimum of g2[name] and its vibrational modes (eigenvalues eV/A^2/amu, vectors)."""
    atoms = g2[name].copy()
    atoms.set_initial_magnetic_moments(None)
    atoms.calc = calculator()
    BFGS(atoms, logfile=None).run(fmax=0.005, steps=300)
    x0 = atoms.positions.copy()
    n = len(atoms)
    hess = np.zeros((3 * n, 3 * n))
    for i in range(3 * n):
        fs_ = []
        for sign in (1, -1):
            atoms.positions = x0
            atoms.positions[i // 3, i % 3] += sign * FD_STEP
            fs_.append(atoms.get_forces().ravel())
        hess[i] = -(fs_[0] - fs_[1]) / (2 * FD_STEP)
    atoms.positions = x0
    hess = 0.5 * (hess + hess.T)
    inv_sqrt_m = np.repeat(atoms.get_masses() ** -0.5, 3)
    evals, evecs = np.linalg.eigh(hess * np.outer(inv_sqrt_m, inv_sqrt_m))
    # drop the 5 (linear) or 6 external modes: the smallest |eigenvalues|
    n_ext = 5 if _is_linear(x0) else 6
    keep = np.sort(np.argsort(np.abs(evals))[n_ext:])
    relaxed = Atoms(atoms.numbers, positions=x0)
    return relaxed, evals[keep], evecs[:, keep], inv_sqrt_m


def _is_linear(x: np.ndarray) -> bool:
    c = x - x.mean(axis=0)
    s = np.linalg.svd(c, compute_uv=False)
    return s[1] < 1e-3 * s[0]


def normal_mode_sample(modes, temperature: float, rng: np.random.Generator) -> Atoms:
    """Relaxed geometry displaced along every mode by q_k ~ N(0, kT/w_k^2)."""
    relaxed, evals, evecs, inv_sqrt_m = modes
    # eV/A^2/amu -> cm^-1: w = sqrt(lambda e / amu) * 1e10 [rad/s]; nu = w / (2 pi c[cm/s])
    to_cm = np.sqrt(units._e / units._amu) * 1e10 / (2 * np.pi * units._c * 100)
    lam_floor = (MIN_FREQ_CM / to_cm) ** 2
    lam = np.maximum(np.abs(evals), lam_floor)
    q = rng.normal(size=lam.shape) * np.sqrt(units.kB * temperature / lam)
    disp = (inv_sqrt_m * (evecs @ q)).reshape(-1, 3)
    return Atoms(relaxed.numbers, positions=relaxed.positions + disp)


def md_frames(relaxed: Atoms, temperature: float, n_frames: int, rng: np.random.Generator):
    """Frames of one Langevin MD trajectory started from the relaxed geometry."""
    atoms = relaxed.copy()
    atoms.calc = calculator()
    thermalize_momenta(atoms, temperature, rng=rng)
    dyn = Langevin(atoms, timestep=TIMESTEP_FS * units.fs, temperature_K=temperature,
                   friction=0.01 / units.fs, fixcm=False, rng=rng, logfile=None)
    dyn.run(BURN_IN_STEPS)
    frames = []
    for _ in range(n_frames):
        dyn.run(STRIDE_STEPS)
        frames.append(Atoms(atoms.numbers, positions=atoms.positions))
    return frames


def make_split(split: str, molecules: list[str], modes: dict, seed: int, max_force: float):
    """All labelled structures of one split; returns (images, n_dropped)."""
    split_idx = SPLITS.index(split)
    n_nm, n_md, per_traj = PLAN[split]
    rng = np.random.default_rng([seed, split_idx])
    raw = []  # (atoms, molecule, source, temperature, trajectory)
    for k in range(n_nm):
        mol = molecules[k % len(molecules)] if split != "train" else str(rng.choice(molecules))
        temp = PRETRAIN_TEMPERATURE if split == "pretrain" else float(rng.choice(NM_TEMPERATURES))
        raw.append((normal_mode_sample(modes[mol], temp, rng), mol, "normal_mode", temp, "none"))
    for t in range(n_md):
        mol = str(rng.choice(molecules))
        temp = MD_TEMPERATURES[t % len(MD_TEMPERATURES)]
        traj_rng = np.random.default_rng([seed, split_idx, t])
        for frame in md_frames(modes[mol][0], temp, per_traj, traj_rng):
            raw.append((frame, mol, "md", temp, f"{split}-{t:04d}"))
    images, dropped = [], 0
    for atoms, mol, source, temp, traj in raw:
        out, fmax = label(atoms)
        if not np.isfinite(fmax) or fmax > max_force:
            dropped += 1
            continue
        out.info.update({"config_type": source, "molecule": mol, "source": source,
                         "temperature": temp, "region": "target" if source == "md" else "base",
                         "trajectory": traj})
        images.append(out)
    return images, dropped


def main(argv=None) -> None:
    args = generator_parser(__doc__, SPLITS).parse_args(argv)

    parts = partition(molecule_names(), args.seed)
    print({k: len(v) for k, v in parts.items()}, "OOD molecules:", parts["ood"], flush=True)
    needed = set(parts["ood"]) | set(parts["in_distribution"])
    modes = {name: relax_and_modes(name) for name in sorted(needed)}
    members = {"pretrain": parts["pretrain"], "test_ood": parts["ood"]}

    for split in args.splits:
        molecules = members.get(split, parts["in_distribution"])
        images, dropped = make_split(split, molecules, modes, args.seed, args.max_force)
        write_split(pathlib.Path(args.out) / f"t1x_{split}.extxyz.gz", images, ("region", "source", "temperature"),
                    note=f"{len({a.info['molecule'] for a in images})} molecules; dropped {dropped}; ")


if __name__ == "__main__":
    main()
