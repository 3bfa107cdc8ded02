"""Build the shipped Si data sets from the PyXtal_FF 0.2.3 sdist.

Usage::

    pip download --no-deps --no-binary :all: pyxtal-ff==0.2.3 -d /tmp/pyxtal
    python -m study.data.make_si_data --sdist /tmp/pyxtal/pyxtal_ff-0.2.3.tar.gz
    python -m study.data.make_si_data test-splits --sdist /tmp/pyxtal/pyxtal_ff-0.2.3.tar.gz

The sdist is read with :mod:`tarfile`; PyXtal_FF is never installed or imported.
Source records (``pyxtal_ff/datasets/Si/PyXtal/Si{4,6,8,16}.json``) hold
``coords`` (fractional), ``lattice`` (3x3, Angstrom), ``elements``, ``energy``
(eV, total) and ``force`` (N x 3, eV/Angstrom).

Outputs (gzip-compressed extended XYZ, no calculator attached):

* ``si_pretrain.extxyz.gz`` -- small cells from Si4 + Si6, for pretraining;
* ``si_train.extxyz.gz``    -- small labelled set from Si8 + Si16;
* ``si_pool.extxyz.gz``     -- candidate pool from Si8 + Si16, disjoint from the
  train set.

Labels are ``info["REF_energy"]`` and ``arrays["REF_forces"]``; provenance is
``info["config_type"]`` (source file stem, e.g. ``"Si8"``) and
``info["pyxtal_index"]`` (index of the record in that source file).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import pathlib
import tarfile
from collections import Counter

import numpy as np
from ase import Atoms
from ase.io import read, write

from ntkal.data import DATA_DIR

MEMBER = "pyxtal_ff-0.2.3/pyxtal_ff/datasets/Si/PyXtal/{stem}.json"

PRETRAIN_SOURCES = ("Si4", "Si6")
LARGE_SOURCES = ("Si8", "Si16")


def load_source(tar: tarfile.TarFile, stem: str) -> list[Atoms]:
    """Read one PyXtal_FF JSON file from the sdist into labelled Atoms."""
    records = json.load(tar.extractfile(MEMBER.format(stem=stem)))
    out = []
    for idx, r in enumerate(records):
        cell = np.asarray(r["lattice"]["data"], dtype=float)
        frac = np.asarray(r["coords"]["data"], dtype=float)
        atoms = Atoms(r["elements"], scaled_positions=frac, cell=cell, pbc=True)
        forces = np.asarray(r["force"], dtype=float).reshape(len(atoms), 3)
        atoms.info["REF_energy"] = float(r["energy"])
        atoms.arrays["REF_forces"] = forces
        atoms.info["config_type"] = stem
        atoms.info["pyxtal_index"] = idx
        out.append(atoms)
    return out


def min_distance(atoms: Atoms) -> float:
    """Shortest interatomic distance including periodic images."""
    from ase.neighborlist import neighbor_list

    d = neighbor_list("d", atoms, 3.0)
    return float(d.min()) if len(d) else np.inf


def filter_structures(atoms_list, max_e_per_atom, min_atoms, min_dist):
    kept, dropped = [], Counter()
    for a in atoms_list:
        n = len(a)
        if a.info["REF_energy"] / n > max_e_per_atom:
            dropped["energy"] += 1
        elif n < min_atoms:
            dropped["natoms"] += 1
        elif min_distance(a) < min_dist:
            dropped["distance"] += 1
        else:
            kept.append(a)
    return kept, dropped


def write_extxyz_gz(path: pathlib.Path, atoms_list) -> None:
    """Write extxyz and gzip it reproducibly (mtime=0, no file name in header)."""
    buf = io.StringIO()
    write(buf, atoms_list, format="extxyz")
    raw = buf.getvalue().encode()
    with open(path, "wb") as fh:
        with gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=9) as gz:
            gz.write(raw)


def check_file(path: pathlib.Path, n_expected: int) -> None:
    images = read(str(path), ":")
    assert len(images) == n_expected, (path, len(images), n_expected)
    for a in images:
        assert a.calc is None
        assert "energy" not in a.info and "forces" not in a.arrays
        f = a.arrays["REF_forces"]
        assert f.shape == (len(a), 3)
        # forces of a periodic cell sum to ~0 (source data are rounded)
        assert np.abs(f.sum(axis=0)).max() < 1e-3, (path, a.info, f.sum(axis=0))
        assert np.isfinite(a.info["REF_energy"])


def describe(name, images) -> str:
    nat = Counter(len(a) for a in images)
    src = Counter(a.info["config_type"] for a in images)
    e = np.array([a.info["REF_energy"] / len(a) for a in images])
    return (
        f"{name}: {len(images)} structures, {sum(len(a) for a in images)} atoms; "
        f"atoms/structure {dict(sorted(nat.items()))}; sources {dict(src)}; "
        f"E/atom [{e.min():.3f}, {e.max():.3f}] eV"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sdist", required=True, help="path to pyxtal_ff-0.2.3.tar.gz")
    p.add_argument("--out", default=str(DATA_DIR), help="output folder")
    p.add_argument("--n-pretrain", type=int, default=500)
    p.add_argument("--n-train", type=int, default=40)
    p.add_argument("--n-pool", type=int, default=600)
    p.add_argument("--max-energy-per-atom", type=float, default=-4.0,
                   help="drop structures above this energy per atom (eV)")
    p.add_argument("--min-atoms-large", type=int, default=4,
                   help="for train/pool, drop Si8/Si16 records reduced to fewer atoms")
    p.add_argument("--min-distance", type=float, default=1.8,
                   help="drop structures with an interatomic distance below this (Angstrom)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)

    with tarfile.open(args.sdist, "r:gz") as tar:
        small, large = [], []
        for stem in PRETRAIN_SOURCES + LARGE_SOURCES:
            raw = load_source(tar, stem)
            is_large = stem in LARGE_SOURCES
            kept, dropped = filter_structures(
                raw, args.max_energy_per_atom,
                args.min_atoms_large if is_large else 1, args.min_distance,
            )
            print(f"{stem}: {len(raw)} records, kept {len(kept)}, dropped {dict(dropped)}")
            (large if is_large else small).extend(kept)

    if args.n_pretrain > len(small):
        raise ValueError(f"only {len(small)} small-cell structures available")
    if args.n_train + args.n_pool > len(large):
        raise ValueError(f"only {len(large)} large-cell structures available")

    pretrain_idx = np.sort(rng.choice(len(small), args.n_pretrain, replace=False))
    perm = rng.permutation(len(large))
    train_idx = np.sort(perm[: args.n_train])
    pool_idx = np.sort(perm[args.n_train : args.n_train + args.n_pool])

    sets = {
        "si_pretrain.extxyz.gz": [small[i] for i in pretrain_idx],
        "si_train.extxyz.gz": [large[i] for i in train_idx],
        "si_pool.extxyz.gz": [large[i] for i in pool_idx],
    }
    keys = lambda imgs: {(a.info["config_type"], a.info["pyxtal_index"]) for a in imgs}
    assert not keys(sets["si_train.extxyz.gz"]) & keys(sets["si_pool.extxyz.gz"])

    for name, images in sets.items():
        path = out / name
        write_extxyz_gz(path, images)
        check_file(path, len(images))
        print(describe(name, images) + f"; {path.stat().st_size / 1024:.1f} KiB")


# --- Held-out test splits (added later; the three files above are left exactly as they were) ---


def structure_key(atoms: Atoms) -> bytes:
    """Species, positions and cell rounded to 1e-4 A: equal for records that repeat a structure."""
    return b"".join(np.round(x, 4).tobytes() for x in (atoms.numbers.astype(float), atoms.positions,
                                                        np.asarray(atoms.cell)))


def unique_structures(images, exclude=frozenset()) -> list[Atoms]:
    """First occurrence of each geometry, skipping those whose key is in `exclude`."""
    seen, out = set(exclude), []
    for a in images:
        k = structure_key(a)
        if k not in seen:
            seen.add(k)
            out.append(a)
    return out


def main_test_splits(argv=None) -> None:
    """Write si_test_id.extxyz.gz and si_test_ood.extxyz.gz from the same sdist.

    ``si_test_id``: Si8 + Si16 structures passing the same filters as the pool, drawn from those
    whose geometry is in neither si_train nor si_pool (read back from the shipped files), each
    geometry once.
    ``si_test_ood``: higher-energy Si8 + Si16 cells, ``--max-energy-per-atom`` < E/atom <=
    ``--ood-max-energy-per-atom``, same atom-count and distance filters, max |F| <= ``--max-force``.
    """
    p = argparse.ArgumentParser(description=main_test_splits.__doc__.split("\n")[0])
    p.add_argument("--sdist", required=True, help="path to pyxtal_ff-0.2.3.tar.gz")
    p.add_argument("--out", default=str(DATA_DIR), help="output folder (and where si_train/si_pool are)")
    p.add_argument("--n-test-id", type=int, default=150)
    p.add_argument("--n-test-ood", type=int, default=120)
    p.add_argument("--max-energy-per-atom", type=float, default=-4.0)
    p.add_argument("--ood-max-energy-per-atom", type=float, default=-3.5)
    p.add_argument("--min-atoms-large", type=int, default=4)
    p.add_argument("--min-distance", type=float, default=1.8)
    p.add_argument("--max-force", type=float, default=10.0, help="eV/A, for the OOD cells")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    out = pathlib.Path(args.out)
    # the source repeats some records under another index: compare geometries, not indices
    used = {structure_key(a) for name in ("si_train", "si_pool") for a in read(str(out / f"{name}.extxyz.gz"), ":")}
    in_dist, ood = [], []
    with tarfile.open(args.sdist, "r:gz") as tar:
        for stem in LARGE_SOURCES:
            raw = load_source(tar, stem)
            kept, _ = filter_structures(raw, args.max_energy_per_atom, args.min_atoms_large, args.min_distance)
            in_dist += kept
            hot, _ = filter_structures(raw, args.ood_max_energy_per_atom, args.min_atoms_large,
                                       args.min_distance)
            ood += [a for a in hot if a.info["REF_energy"] / len(a) > args.max_energy_per_atom
                    and np.abs(a.arrays["REF_forces"]).max() <= args.max_force]
    in_dist, ood = unique_structures(in_dist, used), unique_structures(ood, used)
    print(f"candidates: {len(in_dist)} in-distribution (unused), {len(ood)} higher-energy")
    rng = np.random.default_rng([args.seed, 1])
    sets = {
        "si_test_id.extxyz.gz": [in_dist[i] for i in np.sort(rng.choice(len(in_dist), args.n_test_id, replace=False))],
        "si_test_ood.extxyz.gz": [ood[i] for i in np.sort(rng.choice(len(ood), args.n_test_ood, replace=False))],
    }
    for name, images in sets.items():
        path = out / name
        write_extxyz_gz(path, images)
        check_file(path, len(images))
        print(describe(name, images) + f"; {path.stat().st_size / 1024:.1f} KiB")



def write_split(path: pathlib.Path, images, info_keys=(), note: str = "") -> None:
    """Write and check one generated split, then print its size, label ranges and per-tag counts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_extxyz_gz(path, images)
    check_file(path, len(images))
    e = np.array([a.info["REF_energy"] / len(a) for a in images])
    fmax = max(float(np.abs(a.arrays["REF_forces"]).max()) for a in images)
    counts = "; ".join(f"{k} {dict(Counter(a.info[k] for a in images))}" for k in info_keys)
    print(f"{path.name}: {len(images)} structures, {sum(len(a) for a in images)} atoms; {counts}; "
          f"E/atom [{e.min():.3f}, {e.max():.3f}] eV; max|F| {fmax:.2f} eV/A; {note}"
          f"{path.stat().st_size / 1024:.1f} KiB", flush=True)



def generator_parser(doc: str, splits) -> argparse.ArgumentParser:
    """Command line shared by the study-data generators (make_oc20_like, make_t1x_like)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--out", default=str(DATA_DIR), help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-force", type=float, default=10.0,
                   help="drop structures with a force component above this (eV/A)")
    p.add_argument("--splits", nargs="+", default=list(splits), choices=splits)
    return p


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["test-splits"]:
        main_test_splits(sys.argv[2:])
    else:
        main()
