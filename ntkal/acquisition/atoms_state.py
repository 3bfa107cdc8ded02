"""ase.Atoms as plain checkpoint state (ntkal.runstate: dicts, lists, str, numbers, None, arrays) and back,
exactly: numbers, positions, cell, pbc, celldisp, constraints, info, arrays and calculator results keep their
values, dtypes and key order, so that a resumed run writes the same bytes as an uninterrupted one."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

_TAG = "__ntkal_value__"
_RAW_KINDS = "biuf"  # array dtypes the state stores as arrays; others are tagged lists


def encode(v: Any) -> Any:
    """A value of info, arrays or calculator results as plain state; types the state would change (numpy
    scalars, tuples, string arrays, dicts with other keys) are tagged."""
    if v is None or type(v) in (bool, int, float, str):
        return v
    if isinstance(v, np.ndarray):
        if v.dtype.kind in _RAW_KINDS and v.dtype.isnative:
            return v.copy()
        return {_TAG: "array", "dtype": v.dtype.str, "shape": list(v.shape),
                "items": [encode(x) for x in v.reshape(-1).tolist()]}
    if isinstance(v, np.generic):
        return {_TAG: "scalar", "dtype": v.dtype.str, "value": encode(v.item())}
    if isinstance(v, (list, tuple)):
        items = [encode(x) for x in v]
        return items if type(v) is list else {_TAG: "tuple", "items": items}
    if isinstance(v, dict):
        if all(type(k) is str for k in v) and _TAG not in v:
            return {k: encode(x) for k, x in v.items()}
        return {_TAG: "dict", "items": [[encode(k), encode(x)] for k, x in v.items()]}
    raise TypeError(f"cannot keep a {type(v).__name__} in checkpoint state")


def decode(v: Any) -> Any:
    """The inverse of encode."""
    if isinstance(v, list):
        return [decode(x) for x in v]
    if isinstance(v, np.ndarray):
        return v
    if isinstance(v, dict):
        tag = v.get(_TAG)
        if tag == "array":
            dtype = np.dtype(v["dtype"])
            items = [decode(x) for x in v["items"]]
            if dtype.kind == "O":
                out = np.empty(len(items), dtype=object)
                out[:] = items
                return out.reshape(v["shape"])
            return np.array(items, dtype=dtype).reshape(v["shape"])
        if tag == "scalar":
            return np.array(decode(v["value"]), dtype=np.dtype(v["dtype"]))[()]
        if tag == "tuple":
            return tuple(decode(x) for x in v["items"])
        if tag == "dict":
            return {decode(k): decode(x) for k, x in v["items"]}
        return {k: decode(x) for k, x in v.items()}
    return v


def atoms_to_state(atoms) -> dict:
    """One structure as plain state (info, arrays and results as [name, value] pairs: their order is the
    order of the written columns and keys)."""
    calc = atoms.calc
    results = getattr(calc, "results", None) if calc is not None else None
    return {"cell": np.asarray(atoms.cell.array, dtype=np.float64).copy(), "pbc": np.asarray(atoms.pbc).copy(),
            "celldisp": np.asarray(atoms.get_celldisp(), dtype=np.float64).copy(),
            "constraints": [encode(c.todict()) for c in atoms.constraints],
            "info": [[k, encode(v)] for k, v in atoms.info.items()],
            "arrays": [[k, encode(v)] for k, v in atoms.arrays.items()],
            "calc": None if results is None else [[k, encode(v)] for k, v in results.items()]}


def atoms_from_state(state: dict):
    """The structure of atoms_to_state (a SinglePointCalculator holds any calculator results)."""
    from ase import Atoms
    from ase.constraints import dict2constraint
    arrays = {k: decode(v) for k, v in state["arrays"]}
    atoms = Atoms(numbers=arrays["numbers"], positions=arrays["positions"], cell=state["cell"], pbc=state["pbc"],
                  celldisp=state["celldisp"])
    atoms.arrays = {k: np.array(v, copy=True) for k, v in arrays.items()}  # exact dtypes and column order
    atoms.info = {k: decode(v) for k, v in state["info"]}
    if state["constraints"]:
        atoms.set_constraint([dict2constraint(decode(c)) for c in state["constraints"]])
    if state["calc"] is not None:
        from ase.calculators.singlepoint import SinglePointCalculator
        calc = SinglePointCalculator(atoms)
        calc.results = {k: decode(v) for k, v in state["calc"]}  # as they were (no conversion to float)
        atoms.calc = calc
    return atoms


def optional_atoms_to_state(atoms) -> Optional[dict]:
    return None if atoms is None else atoms_to_state(atoms)


def optional_atoms_from_state(state: Optional[dict]):
    return None if state is None else atoms_from_state(state)
