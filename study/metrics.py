"""Energy and force errors of a model's predictions, and the model's predictions themselves.

Energies are compared per atom (eV/atom → meV/atom), forces per Cartesian component over every atom
of every structure (eV/Å → meV/Å): the units of mace's own error tables and of the paper's tables.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np


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


def load_model(path, dtype: str = "float64"):
    """A saved mace model (torch.save of the module) on the CPU in `dtype`, in eval mode."""
    import torch
    model = torch.load(str(path), map_location="cpu", weights_only=False)
    model = model.double() if dtype == "float64" else model.float()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def predict(model, structures: Sequence, batch_size: int = 32) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Total energies [n] (eV) and forces (list of [N_i, 3], eV/Å) of a mace model, batched."""
    from mace.tools import AtomicNumberTable

    from ntkal.features.mace import mace_batch
    dtype = next(model.parameters()).dtype
    z_table = AtomicNumberTable([int(z) for z in model.atomic_numbers])
    r_max = float(model.r_max)
    heads = getattr(model, "heads", None)
    energies, forces = [], []
    for start in range(0, len(structures), batch_size):
        chunk = structures[start:start + batch_size]
        batch = mace_batch(chunk, z_table, r_max, heads, dtype)
        out = model(batch, training=False, compute_force=True)
        energies.append(out["energy"].detach().cpu().numpy().astype(np.float64))
        f = out["forces"].detach().cpu().numpy().astype(np.float64)
        ptr = batch["ptr"].numpy()
        forces.extend(f[ptr[i]:ptr[i + 1]] for i in range(len(chunk)))
    return np.concatenate(energies) if energies else np.zeros(0), forces


def evaluate(model, structures: Sequence, batch_size: int = 32) -> Dict[str, float]:
    """errors() of `model` on labelled structures (REF_energy / REF_forces)."""
    e, f = predict(model, structures, batch_size)
    return errors(e, [a.info["REF_energy"] for a in structures], [len(a) for a in structures],
                  f, [a.arrays["REF_forces"] for a in structures])


def per_structure_errors(model, structures: Sequence, batch_size: int = 32) -> Tuple[np.ndarray, np.ndarray]:
    """(|E_pred - E_ref| / N in meV/atom, mean |F_pred - F_ref| over components in meV/Å), one per structure:
    the pretrained model's errors the cheap acquisition metrics compare picks and pool by."""
    e, f = predict(model, structures, batch_size)
    de = np.array([1e3 * abs(e[i] - a.info["REF_energy"]) / len(a) for i, a in enumerate(structures)])
    df = np.array([1e3 * float(np.mean(np.abs(f[i] - a.arrays["REF_forces"]))) for i, a in enumerate(structures)])
    return de, df


def evaluate_splits(model, splits: Dict[str, Sequence], batch_size: int = 32) -> Dict[str, Dict[str, float]]:
    """errors() per split, predicting each structure once (region subsets share their parent's structures;
    a structure is identified by info["exp_id"])."""
    unique: Dict[str, object] = {}
    for items in splits.values():
        for a in items:
            unique.setdefault(a.info["exp_id"], a)
    structures = list(unique.values())
    e, f = predict(model, structures, batch_size)
    index = {k: i for i, k in enumerate(unique)}
    out = {}
    for name, items in splits.items():
        ii = [index[a.info["exp_id"]] for a in items]
        out[name] = errors(e[ii], [a.info["REF_energy"] for a in items], [len(a) for a in items],
                           [f[i] for i in ii], [a.arrays["REF_forces"] for a in items])
    return out
