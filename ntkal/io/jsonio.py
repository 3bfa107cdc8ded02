"""JSON out: the one coercion of result objects (numpy, tensors, Paths, ...) to JSON, and the atomic
JSON writer that ntkal's reports, the benchmarks and the experiment runner share."""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import os

import numpy as np

from .write import atomic_output


def to_jsonable(obj, *, default=None, allow_nan: bool = False):
    """``obj`` in plain JSON types: numpy scalars and arrays, objects with ``tolist()`` (tensors),
    Paths, Enums (their value), dataclasses, tuples and sets (sorted where possible) are converted and
    dict keys become strings. Non-finite floats become None unless ``allow_nan``. Any other object
    goes through ``default`` (TypeError without one)."""
    def convert(o):
        if isinstance(o, dict):
            return {_json_key(k): convert(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [convert(v) for v in o]
        if isinstance(o, (set, frozenset)):
            items = [convert(v) for v in o]
            try:
                return sorted(items)
            except TypeError:
                return items
        if isinstance(o, (bool, np.bool_)):
            return bool(o)
        if isinstance(o, (int, np.integer)):
            return int(o)
        if isinstance(o, (float, np.floating)):
            return float(o) if allow_nan or math.isfinite(o) else None
        if o is None or isinstance(o, str):
            return o
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        if isinstance(o, enum.Enum):
            return convert(o.value)
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return convert(dataclasses.asdict(o))
        if hasattr(o, "tolist"):  # numpy arrays, torch tensors and other array-likes
            return convert(o.tolist())
        if default is None:
            raise TypeError(f"cannot write an object of type {type(o).__name__} to JSON")
        return to_jsonable(default(o), allow_nan=allow_nan)

    return convert(obj)


def _json_key(key):
    if isinstance(key, enum.Enum):
        key = key.value
    if isinstance(key, os.PathLike):
        return os.fspath(key)
    if isinstance(key, (np.integer, np.floating, np.bool_)):
        key = key.item()
    return key if isinstance(key, str) else str(key)


def json_default(obj):
    """A ``json.dumps(default=...)`` hook for records that must never fail to write (benchmarks,
    experiment results): :func:`to_jsonable` with ``str()`` for unknown objects, NaN kept."""
    return to_jsonable(obj, default=str, allow_nan=True)


def write_json(path, obj, inputs=(), *, indent: int = 2, default=None, allow_nan: bool = False) -> None:
    """Write ``obj`` as JSON through :func:`atomic_output` (never onto one of ``inputs``).

    Converted by :func:`to_jsonable` (``default`` for unknown objects); strict JSON by default (NaN
    and infinities become ``null``), ``allow_nan`` writes them as ``NaN``/``Infinity``.
    """
    data = to_jsonable(obj, default=default, allow_nan=allow_nan)
    with atomic_output(path, inputs) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=indent, allow_nan=allow_nan)
            fh.write("\n")
