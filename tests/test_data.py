"""Shipped datasets and models (ntkal.data): labels, disjoint splits, region tags, element tables."""

from __future__ import annotations

import functools
import hashlib
import itertools

import numpy as np
import pytest
from ase.io import read

from ntkal.data import DATASET_SPLITS, dataset_files, demo_files

SPLIT_CASES = [(name, split) for name, splits in DATASET_SPLITS.items() for split in splits]
# splits the study subsamples by region: each must hold >= 30 % of both regions
REGION_SPLITS = [(name, split) for name in ("oc20", "t1x") for split in DATASET_SPLITS[name]
                 if split == "pool" or split.startswith("test")]
TAGS = {"oc20": ("config_type", "metal", "adsorbate", "temperature", "region"),
        "t1x": ("config_type", "molecule", "source", "temperature", "region")}
# PyXtal_FF repeats a few structures under other record indices; these older files keep them
SOURCE_REPEATS = {("si", "pretrain"), ("si", "pool")}
MAX_FORCE = {"oc20": 10.0, "t1x": 10.0}  # the generators' drop thresholds (eV/A)


@functools.lru_cache(maxsize=None)
def images(name: str, split: str) -> tuple:
    return tuple(read(str(dataset_files(name)[split]), ":"))


def structure_hash(atoms) -> str:
    """Species, positions (1e-4 A) and cell: equal for the same structure written twice."""
    h = hashlib.sha1(atoms.numbers.tobytes())
    h.update(np.round(atoms.positions, 4).tobytes())
    h.update(np.round(np.asarray(atoms.cell), 4).tobytes())
    return h.hexdigest()


def test_demo_files_unchanged():
    assert set(demo_files()) == {"model", "train", "pool", "pretrain"}
    si = dataset_files("si")
    for key, path in demo_files().items():
        assert si[key] == path


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_files("qm9")


@pytest.mark.parametrize("name,split", SPLIT_CASES)
def test_split_labels(name, split):
    imgs = images(name, split)
    assert len(imgs) >= 20
    for a in imgs:
        assert a.calc is None
        e = a.info["REF_energy"]
        f = a.arrays["REF_forces"]
        assert np.isfinite(e) and f.shape == (len(a), 3) and np.isfinite(f).all()
        # no external field: total force vanishes (the Si source data are rounded to ~1e-4)
        assert np.abs(f.sum(axis=0)).max() < 1e-3, (name, split, a.info)
        if name in MAX_FORCE:
            assert np.abs(f).max() <= MAX_FORCE[name]
            assert all(k in a.info for k in TAGS[name]), a.info


@pytest.mark.parametrize("name", sorted(DATASET_SPLITS))
def test_splits_disjoint(name):
    hashes = {split: {structure_hash(a) for a in images(name, split)} for split in DATASET_SPLITS[name]}
    for split in DATASET_SPLITS[name]:
        if (name, split) in SOURCE_REPEATS:
            continue
        assert len(hashes[split]) == len(images(name, split)), f"duplicate structures in {name}_{split}"
    for s1, s2 in itertools.combinations(DATASET_SPLITS[name], 2):
        assert not hashes[s1] & hashes[s2], (name, s1, s2)


@pytest.mark.parametrize("name,split", REGION_SPLITS)
def test_region_fractions(name, split):
    regions = [a.info["region"] for a in images(name, split)]
    assert set(regions) == {"base", "target"}
    frac = regions.count("target") / len(regions)
    assert 0.3 <= frac <= 0.7, frac


def test_pretrain_under_represents_target():
    assert {a.info["region"] for a in images("t1x", "pretrain")} == {"base"}
    pre = images("oc20", "pretrain")
    target = [a for a in pre if a.info["region"] == "target"]
    assert {a.info["adsorbate"] for a in target} == {"CO", "N"}
    assert len(target) <= 0.1 * len(pre)


def test_oc20_split_contents():
    pre = images("oc20", "pretrain")
    assert {a.info["metal"] for a in pre} == {"Cu", "Pt", "Au", "Ni", "Pd", "Ag"}
    assert {a.info["metal"] for a in pre if a.info["adsorbate"] != "none"} <= {"Cu", "Pt"}
    in_dist = [a for s in ("train", "pool", "test_id") for a in images("oc20", s)]
    assert {a.info["metal"] for a in in_dist} == {"Cu", "Pt", "Au", "Ni"}
    assert all("+" not in a.info["adsorbate"] for a in in_dist)
    assert all("+" in a.info["adsorbate"] for a in images("oc20", "test_ood_ads"))
    assert {a.info["metal"] for a in images("oc20", "test_ood_metal")} == {"Pd", "Ag"}
    for split in DATASET_SPLITS["oc20"]:
        for a in images("oc20", split):
            assert (a.info["region"] == "target") == bool(set(a.info["adsorbate"]) & {"C", "N"})


def test_t1x_split_contents():
    mols = {s: {a.info["molecule"] for a in images("t1x", s)} for s in DATASET_SPLITS["t1x"]}
    seen = mols["pretrain"] | mols["train"] | mols["pool"] | mols["test_id"]
    assert not mols["test_ood"] & seen
    assert mols["pretrain"] < mols["pool"]  # the pretrain set covers only a subset of the pool's molecules
    for a in images("t1x", "pool"):
        assert (a.info["region"] == "target") == (a.info["source"] == "md")


@pytest.mark.parametrize("name", sorted(DATASET_SPLITS))
def test_model_covers_elements(name):
    import torch

    from ntkal.features.mace import load_model

    files = dataset_files(name)
    model = load_model(files["model"], dtype=torch.float64)
    table = {int(z) for z in model.atomic_numbers}
    for split in DATASET_SPLITS[name]:
        zs = {int(z) for a in images(name, split) for z in a.numbers}
        assert zs <= table, (name, split, zs - table)
