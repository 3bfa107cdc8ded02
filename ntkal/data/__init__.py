"""Shipped data and small pretrained MACE models: PyXtal_FF Si subsets (the demo), and the
OC20-like (EMT metal slabs + adsorbates) and T1x-like (GFN2-xTB molecules) study sets."""

from __future__ import annotations

import pathlib

DATA_DIR = pathlib.Path(__file__).resolve().parent

_FILES = {
    "model": "si_mace.model",
    "train": "si_train.extxyz.gz",
    "pool": "si_pool.extxyz.gz",
    "pretrain": "si_pretrain.extxyz.gz",
}

# split names of each shipped dataset; files are <name>_<split>.extxyz.gz, model <name>_mace.model
DATASET_SPLITS = {
    "si": ("pretrain", "train", "pool", "test_id", "test_ood"),
    "oc20": ("pretrain", "train", "pool", "test_id", "test_ood_ads", "test_ood_metal"),
    "t1x": ("pretrain", "train", "pool", "test_id", "test_ood"),
}


def demo_files() -> dict[str, pathlib.Path]:
    """Absolute paths of the shipped demo files, keyed model/train/pool/pretrain."""
    return {key: DATA_DIR / name for key, name in _FILES.items()}


def dataset_files(name: str) -> dict[str, pathlib.Path]:
    """Absolute paths of a shipped dataset ("si", "oc20" or "t1x"), keyed model and split name."""
    if name not in DATASET_SPLITS:
        raise ValueError(f"unknown dataset {name!r}; shipped: {', '.join(DATASET_SPLITS)}")
    files = {"model": DATA_DIR / f"{name}_mace.model"}
    files.update({split: DATA_DIR / f"{name}_{split}.extxyz.gz" for split in DATASET_SPLITS[name]})
    return files


__all__ = ["DATA_DIR", "DATASET_SPLITS", "dataset_files", "demo_files"]
