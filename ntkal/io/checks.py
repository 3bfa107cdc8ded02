"""Structure checks: what a MACE model cannot use is refused with the file and the structure named."""
from __future__ import annotations

import numpy as np

from ntkal.errors import InputError


def check_structure(atoms, index, path, known_numbers=None, min_distance: float = 0.1) -> None:
    """Raise :class:`InputError` (naming ``path`` and ``index``) for a structure a model cannot use.

    Checks: at least one atom; finite positions and cell; a usable cell along periodic directions;
    no two atoms (periodic images included) closer than ``min_distance`` Å; and, when
    ``known_numbers`` is given, only elements the model knows.
    """
    natoms = len(atoms)
    if natoms == 0:
        raise InputError("the structure has no atoms", path, index)
    positions = atoms.positions
    if not np.isfinite(positions).all():
        bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
        raise InputError(f"non-finite (NaN or inf) positions for atom{'s' if len(bad) > 1 else ''} "
                         f"{_list_ints(bad)}", path, index)
    cell = np.asarray(atoms.cell.array, dtype=float)
    if not np.isfinite(cell).all():
        raise InputError("non-finite (NaN or inf) values in the cell", path, index)
    numbers = atoms.numbers
    if known_numbers is not None:
        known = (known_numbers if isinstance(known_numbers, (set, frozenset))
                 else {int(z) for z in np.asarray(known_numbers).ravel()})
        unknown = [int(z) for z in np.unique(numbers) if int(z) not in known]
        if unknown:
            raise InputError(
                f"element{'s' if len(unknown) > 1 else ''} {', '.join(_symbol(z) for z in unknown)} "
                f"not known to the model (it knows {', '.join(_symbol(z) for z in sorted(known))})",
                path, index)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    pair = _closest_pair(positions, cell, pbc, min_distance, path, index)
    if pair is not None:
        i, j, dist = pair
        if i == j:
            what = f"atom {i} ({_symbol(numbers[i])}) is {dist:.4g} Å from its own periodic image"
        else:
            what = (f"atoms {i} ({_symbol(numbers[i])}) and {j} ({_symbol(numbers[j])}) are "
                    f"{dist:.4g} Å apart" + (" (counting periodic images)" if pbc.any() else ""))
        raise InputError(f"{what}, closer than {min_distance:g} Å (coinciding atoms?)", path, index)


#: label keys whose values must be finite (MACE's default keys, ntkal.io.read normalises onto them)
LABEL_KEYS = ("REF_energy", "REF_forces", "REF_stress", "REF_virials", "REF_dipole", "REF_charges")


def check_labels(atoms, index, path) -> None:
    """Raise :class:`InputError` naming ``path``, ``index`` and the key for a label that holds NaN or inf:
    one such value would silently change every scale and score fitted from the labelled set."""
    for key in LABEL_KEYS:
        value = atoms.info.get(key, atoms.arrays.get(key))
        if value is None:
            continue
        try:
            finite = np.isfinite(np.asarray(value, dtype=float))
        except (TypeError, ValueError):
            raise InputError(f"label {key} is not numeric ({str(value)[:40]!r})", path, index) from None
        if not finite.all():
            where = ""
            if finite.ndim == 2 and key in atoms.arrays:
                bad = np.flatnonzero(~finite.all(axis=1))
                where = f" for atom{'s' if len(bad) > 1 else ''} {_list_ints(bad)}"
            raise InputError(f"label {key} holds NaN or inf{where}; fix or remove this structure", path, index)


def _symbol(z) -> str:
    from ase.data import chemical_symbols

    z = int(z)
    return chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}"


def _list_ints(values, limit: int = 8) -> str:
    values = [int(v) for v in values]
    text = ", ".join(str(v) for v in values[:limit])
    return text + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _closest_pair(positions, cell, pbc, min_distance, path, index):
    """(i, j, distance) of the closest pair under ``min_distance`` (i == j: an atom and its own
    periodic image), or None; exact, through ASE's neighbour list. That costs ~1.9 ms for a 10-atom
    periodic cell (27+ bin shifts), 25x the rest of the check, so what :func:`_far_apart` clears skips
    it. Bins are capped at one per atom: 3 atoms in a 1000 Å periodic box took 1.4 s uncapped.
    """
    from ase.geometry.cell import complete_cell
    from ase.neighborlist import primitive_neighbor_list

    full = complete_cell(cell)
    if pbc.any():
        if not cell[pbc].any(axis=1).all():
            raise InputError("periodic along a direction whose cell vector is zero", path, index)
        if abs(np.linalg.det(full)) < 1e-9:
            raise InputError("the periodic cell is degenerate (zero volume)", path, index)
    if _far_apart(positions, full, pbc, min_distance):
        return None
    i, j, d = primitive_neighbor_list("ijd", pbc, cell, positions, min_distance,
                                      max_nbins=len(positions))
    if len(d) == 0:
        return None
    k = int(np.argmin(d))
    a, b = sorted((int(i[k]), int(j[k])))
    return a, b, float(d[k])


def _far_apart(positions, cell, pbc, min_distance, max_atoms: int = 256) -> bool:
    """True when no two atoms, periodic images included, can be closer than ``min_distance``.

    A lower bound: a separation with fractional coordinates f is at least |f_k| times the spacing
    of lattice planes k for every k, and the nearest periodic image has every periodic f_k rounded
    to the nearest integer; an atom's own images are at least the smallest periodic spacing away.
    """
    if len(positions) > max_atoms or abs(np.linalg.det(cell)) < 1e-9:
        return False
    inverse = np.linalg.inv(cell)
    spacing = 1.0 / np.linalg.norm(inverse, axis=0)
    if (spacing[pbc] <= min_distance).any():
        return False
    frac = positions @ inverse
    diff = frac[:, None, :] - frac[None, :, :]
    diff[..., pbc] -= np.round(diff[..., pbc])
    bound = (np.abs(diff) * spacing).max(axis=2)
    np.fill_diagonal(bound, np.inf)
    return bool(bound.min() > min_distance * (1 + 1e-9))
