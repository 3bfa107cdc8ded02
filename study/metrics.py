"""Energy and force errors of a model's predictions (the predictions are ntkal's featurizer's).

Energies are compared per atom (eV/atom → meV/atom), forces per Cartesian component over every atom
of every structure (eV/Å → meV/Å): the units of mace's own error tables and of the paper's tables.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from ntkal import MACEFeaturizer


def errors(pred_energy, ref_energy, natoms, pred_forces: Sequence, ref_forces: Sequence) -> Dict[str, float]:
    """MAE and RMSE of per-atom energies (meV/atom) and force components (meV/Å)."""
    pe, re_, n = (np.asarray(x, dtype=np.float64) for x in (pred_energy, ref_energy, natoms))
    if not (pe.shape == re_.shape == n.shape) or pe.ndim != 1 or len(pe) == 0:
        raise ValueError("pred_energy, ref_energy and natoms must be equal-length non-empty 1-d arrays")
    if len(pred_forces) != len(pe) or len(ref_forces) != len(pe):
        raise ValueError("one force array per structure is needed")
    de = (pe - re_) / n
    df = np.concatenate([(np.asarray(p, dtype=np.float64) - np.asarray(r, dtype=np.float64)).ravel()
                         for p, r in zip(pred_forces, ref_forces)])
    return {
        "e_mae": 1e3 * float(np.mean(np.abs(de))),
        "e_rmse": 1e3 * float(np.sqrt(np.mean(de ** 2))),
        "f_mae": 1e3 * float(np.mean(np.abs(df))),
        "f_rmse": 1e3 * float(np.sqrt(np.mean(df ** 2))),
        "n_structures": int(len(pe)),
        "n_atoms": int(n.sum()),
    }


def predictor(path, dtype: str = "float64", batch_size: int = 32) -> MACEFeaturizer:
    """A saved mace model ready to predict (`.predict(structures)`: energies [n] in eV, forces [N_i, 3] in
    eV/Å) on the CPU in `dtype`: ntkal's featurizer, which needs no sketch for the embedding kernel."""
    return MACEFeaturizer(str(path), kernel="embedding", dtype=getattr(torch, dtype), batch_size=batch_size)


def per_structure_errors(model: MACEFeaturizer, structures: Sequence) -> Tuple[np.ndarray, np.ndarray]:
    """(|E_pred - E_ref| / N in meV/atom, mean |F_pred - F_ref| over components in meV/Å), one per structure:
    the pretrained model's errors the cheap acquisition metrics compare picks and pool by."""
    e, f = model.predict(structures)
    de = np.array([1e3 * abs(e[i] - a.info["REF_energy"]) / len(a) for i, a in enumerate(structures)])
    df = np.array([1e3 * float(np.mean(np.abs(f[i] - a.arrays["REF_forces"]))) for i, a in enumerate(structures)])
    return de, df


def evaluate_splits(model: MACEFeaturizer, splits: Dict[str, Sequence]) -> Dict[str, Dict[str, float]]:
    """errors() per split, predicting each structure once (region subsets share their parent's structures;
    a structure is identified by info["exp_id"])."""
    unique: Dict[str, object] = {}
    for items in splits.values():
        for a in items:
            unique.setdefault(a.info["exp_id"], a)
    e, f = model.predict(list(unique.values()))
    index = {k: i for i, k in enumerate(unique)}
    out = {}
    for name, items in splits.items():
        ii = [index[a.info["exp_id"]] for a in items]
        out[name] = errors(e[ii], [a.info["REF_energy"] for a in items], [len(a) for a in items],
                           [f[i] for i in ii], [a.arrays["REF_forces"] for a in items])
    return out
