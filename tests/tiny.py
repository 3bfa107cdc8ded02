"""A tiny random MACE and small random structures for tests (float64; fresh random inputs)."""
import mace  # noqa: F401
import numpy as np
import torch
from ase import Atoms
from ase.build import bulk, molecule

ZS = [1, 6, 8, 14]


def tiny_mace(seed=0, dtype=torch.float64, num_interactions=2, correlation=2):
    """A 2-layer ScaleShiftMACE with random weights (about 20k parameters)."""
    from e3nn import o3
    from mace import modules
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    torch.manual_seed(seed)
    try:
        model = modules.ScaleShiftMACE(
            r_max=4.0, num_bessel=6, num_polynomial_cutoff=5, max_ell=2,
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            num_interactions=num_interactions, num_elements=len(ZS), hidden_irreps=o3.Irreps("8x0e+8x1o"),
            MLP_irreps=o3.Irreps("8x0e"), atomic_energies=np.linspace(-1.0, -4.0, len(ZS)),
            avg_num_neighbors=6.0, atomic_numbers=ZS, correlation=correlation,
            gate=torch.nn.functional.silu, atomic_inter_scale=1.3, atomic_inter_shift=0.1)
    finally:
        torch.set_default_dtype(old)
    # random (non-zero) readout weights so that every layer's gradient is non-trivial
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def structures(n, seed=0, kinds=("si", "mol")):
    """n small structures (periodic Si cells and molecules) with rattled positions."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "si":
            a = bulk("Si", "diamond", a=5.43)
            if rng.random() < 0.5:
                a = a.repeat((1, 1, 2))
        else:
            a = molecule(["CH4", "H2O", "C2H6", "CH3OH"][rng.integers(4)])
            a.center(vacuum=3.0)
            a.pbc = False
        a.positions += rng.normal(scale=0.08, size=a.positions.shape)
        out.append(a)
    return out


def rotated(atoms, seed=0):
    """The same structure rotated by a random orthogonal matrix (cell rotated with it)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    b = atoms.copy()
    b.positions = atoms.positions @ q.T
    if atoms.pbc.any():
        b.cell = atoms.cell[:] @ q.T
    return b
