"""Shipped demo data (PyXtal_FF Si subsets) and a small pretrained Si MACE model."""

from __future__ import annotations

import pathlib

DATA_DIR = pathlib.Path(__file__).resolve().parent

_FILES = {
    "model": "si_mace.model",
    "train": "si_train.extxyz.gz",
    "pool": "si_pool.extxyz.gz",
    "pretrain": "si_pretrain.extxyz.gz",
}


def demo_files() -> dict[str, pathlib.Path]:
    """Absolute paths of the shipped demo files, keyed model/train/pool/pretrain."""
    return {key: DATA_DIR / name for key, name in _FILES.items()}


__all__ = ["DATA_DIR", "demo_files"]
