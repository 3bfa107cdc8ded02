"""Streaming structure I/O: extxyz (plain or compressed) and ASE databases in, extxyz and JSON out.

Reading never holds a whole file in memory: extxyz files are split into frames here, one frame at a
time, and each frame is parsed by ASE's own extxyz reader; ASE databases are read in pages of rows in
id order. (``ase.io.iread`` itself indexes the whole file before it yields the first frame, which
stops at a malformed header before anything is yielded, and on a ``.gz`` file seeks backwards for
every frame, which costs quadratic time.)

Labels follow MACE's conventions (``mace/tools/default_keys.py``): ``info["REF_energy"]``,
``arrays["REF_forces"]``, ``info["REF_stress"]``. Since ASE 3.23 the extxyz reader turns plain
``energy``/``forces``/``stress`` keys into a ``SinglePointCalculator`` instead of ``info``/``arrays``
entries, so plain keys are unsafe; every calculator result ``p`` is moved to ``REF_p`` on reading
(MACE's ``load_from_xyz`` does the same with a warning) and nothing named like a calculator property
is ever written.

Writers go through :func:`atomic_output`: a temporary file in the destination directory, moved into
place with ``os.replace`` only when everything was written, and never onto an input file.
"""
from __future__ import annotations

import bz2
import dataclasses
import enum
import gzip
import io
import itertools
import json
import logging
import lzma
import math
import os
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ntkal.errors import InputError

__all__ = [
    "EXTXYZ_SUFFIXES",
    "COMPRESSION_SUFFIXES",
    "DB_SUFFIXES",
    "read_structures",
    "count_structures",
    "normalize_labels",
    "check_structure",
    "iter_chunks",
    "check_output_path",
    "atomic_output",
    "write_extxyz",
    "write_json",
]

logger = logging.getLogger("ntkal")

EXTXYZ_SUFFIXES = (".xyz", ".extxyz")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz")
DB_SUFFIXES = (".db",)

#: Names ASE treats as calculator results (``ase.calculators.calculator.all_properties``, ase 3.29).
#: A key with one of these names in an extxyz file is read back as a calculator result, not as an
#: ``info``/``arrays`` entry, so ntkal never writes one; each becomes ``REF_<name>``.
CALCULATOR_KEYS = frozenset((
    "energy", "forces", "stress", "stresses", "dipole", "charges", "magmom", "magmoms",
    "free_energy", "energies", "dielectric_tensor", "born_effective_charges", "polarization",
))

_DB_PAGE = 1000  # rows fetched per query (ase's sqlite backend fetches a whole query at once)
_SUFFIX_HELP = ("ntkal reads .xyz and .extxyz files (optionally compressed: .gz, .bz2, .xz) "
                "and ASE databases (.db)")


# --------------------------------------------------------------------------------------------
# file types and opening


def _file_kind(path: Path) -> tuple[str, str | None]:
    """('extxyz' | 'db', compression or None) from the file name; InputError for anything else."""
    name = path.name.lower()
    compression = None
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            compression = suffix[1:]
            name = name[: -len(suffix)]
            break
    if name.endswith(EXTXYZ_SUFFIXES):
        return "extxyz", compression
    if name.endswith(DB_SUFFIXES):
        if compression is not None:
            raise InputError(f"a compressed ASE database cannot be read; decompress it first "
                             f"({_SUFFIX_HELP})", path)
        return "db", None
    raise InputError(f"unknown file type {path.name!r}: {_SUFFIX_HELP}", path)


def _check_readable(path) -> Path:
    path = Path(os.fspath(path)).expanduser()
    if not path.exists():
        raise InputError("no such file", path)
    if path.is_dir():
        raise InputError("is a directory, expected a structure file", path)
    if not os.access(path, os.R_OK):
        raise InputError("cannot read the file (permission denied)", path)
    return path


def _open_text(path: Path, mode: str, compression: str | None):
    """Open a text file for 'r' or 'w', (de)compressing by ``compression`` ('gz', 'bz2', 'xz')."""
    mode = mode + "t"
    if compression == "gz":
        return gzip.open(path, mode, encoding="utf-8")
    if compression == "bz2":
        return bz2.open(path, mode, encoding="utf-8")
    if compression == "xz":
        return lzma.open(path, mode, encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def _reason(exc: BaseException, limit: int = 200) -> str:
    """A one-line reason: exception type and message, truncated."""
    text = " ".join(str(exc).split()) or "no message"
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# labels


def normalize_labels(atoms, *, plain_keys: bool = False, calc=None) -> list[str]:
    """Move calculator results (and, with ``plain_keys``, plain info/arrays keys named like them) to
    ``REF_*`` keys, in place, and detach the calculator.

    ``energy`` -> ``info["REF_energy"]``, ``forces`` -> ``arrays["REF_forces"]``, ``stress`` ->
    ``info["REF_stress"]`` (Voigt 6-vector, as ASE stores it); every other calculator result ``p``
    goes to ``REF_p`` (per-atom results in ``arrays``, the rest in ``info``). An existing ``REF_*``
    key always wins and is left untouched. ``calc`` (default: ``atoms.calc``) is where the results
    are taken from. Returns the names that were moved (for one warning per file).
    """
    moved: list[str] = []
    if calc is None:
        calc = atoms.calc
    atoms.calc = None
    if calc is not None:
        results = dict(getattr(calc, "results", None) or {})
        for name, value in results.items():
            if value is None:
                continue
            ref = "REF_" + name
            if _is_per_atom(name, value, len(atoms)):
                if ref not in atoms.arrays:
                    atoms.arrays[ref] = np.array(value, copy=True)
                    moved.append(name)
            elif ref not in atoms.info:
                atoms.info[ref] = np.array(value, copy=True) if isinstance(value, np.ndarray) else value
                moved.append(name)
    if plain_keys:
        for name in [k for k in atoms.info if k in CALCULATOR_KEYS]:
            value = atoms.info.pop(name)
            if name == "stress":
                value = _stress_to_voigt(value)
            if "REF_" + name not in atoms.info:
                atoms.info["REF_" + name] = value
                moved.append(name)
        for name in [k for k in atoms.arrays if k in CALCULATOR_KEYS]:
            value = atoms.arrays.pop(name)
            if "REF_" + name not in atoms.arrays:
                atoms.arrays["REF_" + name] = value
                moved.append(name)
    return moved


_PER_ATOM_RESULTS = frozenset(("forces", "stresses", "charges", "magmoms", "energies",
                               "born_effective_charges"))


def _is_per_atom(name, value, natoms) -> bool:
    return (name in _PER_ATOM_RESULTS and isinstance(value, np.ndarray) and value.ndim >= 1
            and value.shape[0] == natoms)


def _stress_to_voigt(value):
    arr = np.asarray(value)
    if arr.shape == (3, 3):
        return np.array([arr[0, 0], arr[1, 1], arr[2, 2], arr[1, 2], arr[0, 2], arr[0, 1]])
    return value


def _warn_moved(path, moved: set[str], writing: bool = False) -> None:
    names = sorted(moved)
    logger.warning(
        "%s: labels held as calculator results or plain keys (%s) %s %s, the keys mace_run_train "
        "reads by default (plain energy/forces/stress keys are unsafe since ASE 3.23; MACE "
        "rewrites them the same way)",
        path, ", ".join(names), "were written as" if writing else "were copied to",
        ", ".join("REF_" + n for n in names))


# --------------------------------------------------------------------------------------------
# reading


def read_structures(path) -> Iterator:
    """Stream the structures of an extxyz file (``.xyz``/``.extxyz``, optionally ``.gz``/``.bz2``/
    ``.xz``) or an ASE database (``.db``, rows in id order) as ``ase.Atoms``, one at a time.

    Labels are normalised to MACE's ``REF_*`` keys (see :func:`normalize_labels`; one warning per
    file); ``config_type``, ``head``, ``config_weight`` and every other info/arrays key are kept.
    Database rows keep their ``key_value_pairs`` in ``atoms.info``; ``data`` entries that are
    per-atom numeric arrays (first dimension = number of atoms, 1 or 2 dimensions) go to
    ``atoms.arrays``, the rest to ``atoms.info``.

    The file is checked when this is called (missing file, directory, unknown suffix); errors met
    while streaming are raised when the bad structure is reached, as :class:`InputError` naming the
    file and the 0-based structure index. An empty file yields nothing.
    """
    path = _check_readable(path)
    kind, compression = _file_kind(path)
    raw = _read_db(path) if kind == "db" else _read_extxyz(path, compression)
    return _normalized(path, raw)


def _normalized(path: Path, structures: Iterator) -> Iterator:
    """Labels moved to the REF_* keys, with one warning per file naming what was moved."""
    warned = False
    for atoms in structures:
        moved = normalize_labels(atoms)
        if moved and not warned:
            _warn_moved(path, set(moved))
            warned = True
        yield atoms


class _FrameError(Exception):
    def __init__(self, index, message):
        super().__init__(message)
        self.index = index


def _split_frames(fh) -> Iterator[tuple[int, int, list[str]]]:
    """Yield (index, natoms, lines) per extxyz frame: count line, comment line, natoms atom lines,
    and any VEC1..3 lines that follow. Blank lines between frames are skipped."""
    index = 0
    pending = None
    while True:
        line = pending if pending is not None else fh.readline()
        pending = None
        if not line:
            return
        if not line.strip():
            continue
        try:
            natoms = int(line)
        except ValueError:
            raise _FrameError(index, f"malformed extxyz frame: expected the atom-count line, got "
                                     f"{line.strip()[:60]!r}") from None
        if natoms < 0:
            raise _FrameError(index, f"malformed extxyz frame: negative atom count {natoms}")
        comment = fh.readline()
        if not comment:
            raise _FrameError(index, "malformed extxyz frame: the file ends after the atom-count "
                                     "line (no comment line)")
        lines = [line, comment]
        lines.extend(itertools.islice(fh, natoms))
        if len(lines) - 2 < natoms:
            raise _FrameError(index, f"malformed extxyz frame: the file ends after "
                                     f"{len(lines) - 2} of {natoms} atom lines")
        while True:
            nxt = fh.readline()
            if nxt.lstrip().startswith("VEC"):
                lines.append(nxt)
            else:
                pending = nxt
                break
        yield index, natoms, lines
        index += 1


def _parse_frame(lines: list[str]):
    import ase.io

    return ase.io.read(io.StringIO("".join(lines)), index=0, format="extxyz")


def _read_extxyz(path: Path, compression):
    index = 0
    try:
        fh = _open_text(path, "r", compression)
    except OSError as exc:
        raise InputError(f"cannot open the file: {_reason(exc)}", path) from exc
    try:
        frames = _split_frames(fh)
        while True:
            try:
                index, _natoms, lines = next(frames)
            except StopIteration:
                return
            except _FrameError as exc:
                raise InputError(str(exc), path, exc.index) from None
            except (OSError, EOFError, UnicodeDecodeError, lzma.LZMAError) as exc:
                raise InputError(f"cannot read the file: {_reason(exc)}", path, index) from exc
            try:
                atoms = _parse_frame(lines)
            except Exception as exc:  # ase raises XYZError, ValueError, KeyError, IndexError, ...
                raise InputError(f"malformed extxyz frame: {_reason(exc)}", path, index) from exc
            yield atoms
            index += 1
    finally:
        fh.close()


def _connect_db(path: Path):
    import ase.db

    return ase.db.connect(str(path), type="db", create_indices=False, use_lock_file=False)


def _db_error(path, exc, index=None):
    return InputError(f"cannot read this ASE database ({_reason(exc)})", path, index)


def _read_db(path: Path):
    if path.stat().st_size == 0:  # an empty sqlite file; connecting would write tables into it
        return
    index = 0
    last_id = 0
    try:
        db = _connect_db(path)
    except Exception as exc:
        raise _db_error(path, exc) from exc
    while True:
        try:
            rows = list(db.select(f"id>{last_id}", sort="id", limit=_DB_PAGE))
        except Exception as exc:  # sqlite3.DatabaseError "file is not a database", ...
            raise _db_error(path, exc, index if index else None) from exc
        if not rows:
            return
        for row in rows:
            try:
                atoms = _row_to_atoms(row)
            except Exception as exc:
                raise InputError(f"cannot convert database row id={row.id} to a structure "
                                 f"({_reason(exc)})", path, index) from exc
            yield atoms
            index += 1
        last_id = rows[-1].id


def _row_to_atoms(row):
    atoms = row.toatoms()
    natoms = len(atoms)
    for key, value in (row.key_value_pairs or {}).items():
        atoms.info[key] = value
    data = row.get("data") or {}
    for key, value in dict(data).items():
        if (isinstance(value, np.ndarray) and value.ndim in (1, 2) and value.shape[0] == natoms
                and value.dtype.kind in "biuf" and key not in atoms.arrays):
            atoms.arrays[key] = np.array(value, copy=True)
        elif key not in atoms.info:
            atoms.info[key] = value
    return atoms


def count_structures(path) -> int:
    """Number of structures in a file, without parsing them (for progress bars).

    extxyz: reads each atom-count line and skips that many lines plus the comment line (streaming,
    also through compression); ASE database: ``count()``. Raises :class:`InputError` where the
    frame layout is broken (a count line that is not an integer, a file that ends inside a frame).
    """
    path = _check_readable(path)
    kind, compression = _file_kind(path)
    if kind == "db":
        if path.stat().st_size == 0:
            return 0
        try:
            return int(_connect_db(path).count())
        except Exception as exc:
            raise _db_error(path, exc) from exc
    count = 0
    try:
        with _open_text(path, "r", compression) as fh:
            while True:
                line = fh.readline()
                if not line:
                    return count
                stripped = line.strip()
                if not stripped or stripped.startswith("VEC"):
                    continue
                try:
                    natoms = int(stripped)
                except ValueError:
                    raise InputError(f"malformed extxyz frame: expected the atom-count line, got "
                                     f"{stripped[:60]!r}", path, count) from None
                if natoms < 0:
                    raise InputError(f"malformed extxyz frame: negative atom count {natoms}",
                                     path, count)
                # skip the comment line and the atom lines at C speed, remembering how many there were
                tail = deque(enumerate(itertools.islice(fh, natoms + 1), 1), maxlen=1)
                got = tail[0][0] if tail else 0
                if got < natoms + 1:
                    raise InputError(f"malformed extxyz frame: the file ends inside the frame "
                                     f"({natoms} atoms announced, {max(got - 1, 0)} atom lines "
                                     f"found)", path, count)
                count += 1
    except InputError:
        raise
    except (OSError, EOFError, UnicodeDecodeError, lzma.LZMAError) as exc:
        raise InputError(f"cannot read the file: {_reason(exc)}", path, count) from exc


# --------------------------------------------------------------------------------------------
# structure checks


_PAIR_LIMIT = 256  # up to this many atoms the close-pair check is a numpy pass over all pairs
_PAIR_WORK_LIMIT = 2e7  # atom pairs x periodic shifts; beyond it ASE's neighbour list decides


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
        present = np.unique(numbers)
        unknown = [int(z) for z in present if int(z) not in known]
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
    periodic image), or None.

    Exact. Periodic images are found from fractional coordinates: for the cell (or its Minkowski
    reduction when a layer spacing is small), a separation shorter than ``min_distance`` differs
    from the nearest-image separation (fractional components rounded) by at most
    floor(min_distance / spacing_k + 1/2) cells along periodic direction k, where spacing_k is the
    distance between lattice planes; those shifts are all tried. For any reasonable cell that is
    one shift (spacing > 2 * min_distance), so a small structure costs one numpy pass over its
    atom pairs. Large structures go to ASE's neighbour list.
    """
    natoms = len(positions)
    full = cell
    reach = np.zeros(3, dtype=int)
    if pbc.any():
        if not cell[pbc].any(axis=1).all():
            raise InputError("periodic along a direction whose cell vector is zero", path, index)
        if not cell.any(axis=1).all():
            from ase.geometry.cell import complete_cell

            full = complete_cell(cell)
        if abs(np.linalg.det(full)) < 1e-9:
            raise InputError("the periodic cell is degenerate (zero volume)", path, index)
        reach = _image_reach(full, pbc, min_distance)
        if reach.any():
            from ase.geometry import minkowski_reduce

            full = minkowski_reduce(full, pbc=pbc)[0]  # same lattice, shortest basis vectors
            reach = _image_reach(full, pbc, min_distance)
    n_shifts = int(np.prod(2 * reach + 1))
    if natoms > _PAIR_LIMIT or natoms * natoms * n_shifts > _PAIR_WORK_LIMIT:
        return _closest_pair_neighbor_list(positions, cell, pbc, min_distance)
    # coordinate-major layout: (3, N*N) differences, contiguous per coordinate
    if pbc.any():
        frac = np.ascontiguousarray((positions @ np.linalg.inv(full)).T)
        dfrac = frac[:, :, None] - frac[:, None, :]
        for axis in range(3):
            if pbc[axis]:  # nearest image along periodic directions
                dfrac[axis] -= np.round(dfrac[axis])
        base = full.T @ dfrac.reshape(3, -1)
    else:
        coords = np.ascontiguousarray(positions.T)
        base = (coords[:, :, None] - coords[:, None, :]).reshape(3, -1)
    best = (np.inf, 0, 0)
    for shift in itertools.product(*(range(-r, r + 1) for r in reach)):
        diff = base + (np.asarray(shift, dtype=float) @ full)[:, None] if any(shift) else base
        d2 = np.einsum("ij,ij->j", diff, diff).reshape(natoms, natoms)
        if not any(shift):
            np.fill_diagonal(d2, np.inf)
        k = int(np.argmin(d2))
        if d2.flat[k] < best[0]:
            i, j = divmod(k, natoms)
            best = (float(d2.flat[k]), min(i, j), max(i, j))
    if best[0] < min_distance**2:
        return best[1], best[2], math.sqrt(best[0])
    return None


def _image_reach(cell, pbc, min_distance):
    """Per direction, how many cells beyond the nearest image can hold a closer one."""
    inverse = np.linalg.inv(cell)
    spacing = 1.0 / np.sqrt(np.einsum("ij,ij->j", inverse, inverse))  # lattice-plane distances
    return np.where(pbc, np.floor(min_distance / spacing + 0.5), 0).astype(int)


def _closest_pair_neighbor_list(positions, cell, pbc, min_distance):
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    probe = Atoms(numbers=np.ones(len(positions), dtype=int), positions=positions, cell=cell,
                  pbc=pbc)
    i, j, d = neighbor_list("ijd", probe, min_distance, self_interaction=False)
    if len(d) == 0:
        return None
    k = int(np.argmin(d))
    a, b = sorted((int(i[k]), int(j[k])))
    return a, b, float(d[k])


# --------------------------------------------------------------------------------------------
# chunks


def iter_chunks(iterable: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last one may be shorter), pulled lazily."""
    size = int(size)
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


# --------------------------------------------------------------------------------------------
# writing


def _as_path_list(inputs) -> list[Path]:
    if inputs is None:
        return []
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out = []
    for item in inputs:
        if isinstance(item, (str, os.PathLike)):
            out.append(Path(os.fspath(item)).expanduser())
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output_path(path, inputs=()) -> Path:
    """Check that ``path`` can be written as an output and return it as a Path.

    :class:`InputError` if ``path`` is (resolves to, or is a hard link of) one of ``inputs``
    (path-like items only; others are ignored), if it is a directory, or if its parent directory
    does not exist. Callers can run this before a long computation; the writers run it again.
    """
    out = Path(os.fspath(path)).expanduser()
    for item in _as_path_list(inputs):
        if _same_file(out, item):
            raise InputError(f"refusing to overwrite an input file (it is also given as {item})", out)
    if out.is_dir():
        raise InputError("is a directory; give a file name for the output", out)
    parent = out.parent
    if not parent.is_dir():
        raise InputError(f"the output directory {str(parent)!r} does not exist", out)
    return out


def _new_file_mode(existing: Path) -> int:
    try:
        return existing.stat().st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


@contextmanager
def atomic_output(path, inputs=()):
    """Context manager yielding a temporary Path in ``path``'s directory; on normal exit the
    temporary file replaces ``path`` (``os.replace``, atomic on one file system), on an exception it
    is removed and an existing ``path`` is left as it was. The temporary name ends with ``path``'s
    name, so suffix-based format detection still works. Checks :func:`check_output_path` first.
    """
    out = check_output_path(path, inputs)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=".ntkal-tmp-", suffix="-" + out.name)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _new_file_mode(out))
        os.replace(tmp, out)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


def write_extxyz(path, atoms_iterable, inputs=(), *, verify: bool = True) -> int:
    """Write structures to an extxyz file that ``mace_run_train --train_file`` reads as it is;
    return the number written.

    Streams: one frame at a time goes through ``ase.io.write(..., format="extxyz")`` into an atomic
    temporary file (:func:`atomic_output`), so an iterator of 10^5 structures is never held in
    memory; ``.gz``/``.bz2``/``.xz`` names are compressed. The input Atoms are not modified: each
    frame is a copy whose calculator results (and any plain info/arrays key named like a calculator
    property: energy, forces, stress, ...) are moved to ``REF_*`` keys (an existing ``REF_*`` key
    wins, and the plain key is dropped), so no ``energy``/``forces``/``stress`` key is ever written.

    With ``verify`` (default) every frame's text is parsed back before it is written: atoms,
    positions (to ASE's 8 decimals), cell, pbc, ``REF_*`` labels and ``ntkal_*`` keys must survive
    (else :class:`InputError` naming the output and the frame, and nothing is written); other
    info/arrays keys that are lost or change type (ASE skips values it cannot serialise and reads
    the string "T" back as True, "1" as 1 -- a ``config_type`` too) give one warning per file.
    Parsing back costs about as much as writing (ASE: ~0.5 ms each for a 64-atom frame).
    """
    out = Path(os.fspath(path)).expanduser()
    kind, compression = _file_kind_for_output(out)
    if kind != "extxyz":
        raise InputError(f"the output must be an extxyz file (.xyz or .extxyz, optionally "
                         f".gz/.bz2/.xz), got {out.name!r}", out)
    import ase.io
    from ase import Atoms

    if isinstance(atoms_iterable, Atoms):
        atoms_iterable = [atoms_iterable]
    moved_all: set[str] = set()
    soft_all: set[str] = set()
    count = 0
    with atomic_output(out, inputs) as tmp:
        with _open_text(tmp, "w", compression) as fh:
            for index, atoms in enumerate(atoms_iterable):
                frame, moved, flattened = _prepare_for_write(atoms)
                moved_all.update(moved)
                soft_all.update(flattened)
                buf = io.StringIO()
                try:
                    ase.io.write(buf, frame, format="extxyz")
                except Exception as exc:
                    raise InputError(f"cannot write this structure as extxyz: {_reason(exc)}",
                                     out, index) from exc
                text = buf.getvalue()
                if verify:
                    soft_all.update(_verify_frame(text, frame, out, index))
                fh.write(text)
                count += 1
    if moved_all:
        _warn_moved(out, moved_all, writing=True)
    if soft_all:
        logger.warning("%s: info/arrays key%s %s did not survive the extxyz round trip unchanged "
                       "(lost, flattened, or read back with another type)", out,
                       "" if len(soft_all) == 1 else "s", ", ".join(sorted(soft_all)))
    return count


def _file_kind_for_output(path: Path):
    try:
        return _file_kind(path)
    except InputError:
        return None, None


def _prepare_for_write(atoms):
    """A copy of ``atoms`` with labels under REF_* keys, no calculator, per-atom arrays at most 2-D.
    Returns (copy, names moved to REF_*, arrays flattened)."""
    frame = atoms.copy()  # Atoms.copy() does not carry the calculator
    moved = normalize_labels(frame, plain_keys=True, calc=atoms.calc)
    flattened = []
    for key, value in list(frame.arrays.items()):
        if value.ndim > 2:  # extxyz columns hold (N,) or (N, k) arrays: (N, 3, 3) -> (N, 9)
            frame.arrays[key] = value.reshape(len(frame), -1)
            flattened.append(key)
    return frame, moved, flattened


def _is_hard_key(key: str) -> bool:
    """Keys whose loss fails the write: labels and ntkal's own results."""
    return key.startswith(("REF_", "ntkal_"))


def _kind_of(value):
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (np.ndarray, list, tuple)):
        arr = np.asarray(value)
        return ("array", arr.shape, arr.dtype.kind if arr.dtype.kind in "biuf" else "other")
    return type(value).__name__


def _rtol(value) -> float:
    """Relative tolerance of a float value's own precision (float32 scores print with 7 digits)."""
    dtype = getattr(value, "dtype", None)
    if dtype is not None and dtype.kind == "f" and dtype.itemsize < 8:
        return 1e-6
    return 1e-12


def _values_match(a, b, atol) -> bool:
    ka, kb = _kind_of(a), _kind_of(b)
    rtol = _rtol(a)
    if ka != kb:
        # an int array read back as float or the reverse is fine; a shape or kind change is not
        if isinstance(ka, tuple) and isinstance(kb, tuple) and ka[1] == kb[1]:
            return {ka[2], kb[2]} <= set("iuf") and np.allclose(a, b, rtol=rtol, atol=atol)
        return False
    if ka == "number":
        return math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=atol) or (
            math.isnan(float(a)) and math.isnan(float(b)))
    if isinstance(ka, tuple):
        if ka[2] in "iuf":
            return np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float),
                               rtol=rtol, atol=atol, equal_nan=True)
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


def _verify_frame(text: str, expected, out: Path, index: int) -> set[str]:
    """Parse one written frame back; raise on lost essentials, return the names of other keys
    that changed."""
    try:
        got = _parse_frame(text.splitlines(keepends=True))
    except Exception as exc:
        raise InputError(f"the extxyz text written for this structure does not read back: "
                         f"{_reason(exc)}", out, index) from exc
    problems = []
    if len(got) != len(expected) or not np.array_equal(got.numbers, expected.numbers):
        problems.append("atoms")
    elif not np.allclose(got.positions, expected.positions, rtol=0, atol=1e-6):
        problems.append("positions")
    if not np.allclose(got.cell.array, expected.cell.array, rtol=1e-12, atol=1e-10):
        problems.append("cell")
    if not np.array_equal(got.pbc, expected.pbc):
        problems.append("pbc")
    if got.calc is not None:
        problems.append("keys read back as calculator results: "
                        + ", ".join(sorted(getattr(got.calc, "results", {}))))
    soft = set()
    skip_arrays = {"numbers", "positions"}
    for label, exp_map, got_map, atol in (("info", expected.info, got.info, 0.0),
                                          ("arrays", expected.arrays, got.arrays, 1e-7)):
        for key, value in exp_map.items():
            if label == "arrays" and key in skip_arrays:
                continue
            ok = key in got_map and _values_match(value, got_map[key], atol)
            if not ok:
                (problems.append(f"{label}[{key!r}]") if _is_hard_key(key) else soft.add(key))
        for key in got_map:
            if key not in exp_map and not (label == "arrays" and key in skip_arrays):
                soft.add(key)  # a key that appeared on reading
    if problems:
        raise InputError("this structure does not survive writing to extxyz unchanged: "
                         + "; ".join(problems), out, index)
    return soft


def _jsonable(obj):
    if isinstance(obj, dict):
        return {_json_key(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [_jsonable(v) for v in obj]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, enum.Enum):
        return _jsonable(obj.value)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "tolist"):  # torch tensors and other array-likes
        return _jsonable(obj.tolist())
    raise TypeError(f"cannot write an object of type {type(obj).__name__} to JSON")


def _json_key(key):
    if isinstance(key, str):
        return key
    if isinstance(key, enum.Enum):
        key = key.value
    if isinstance(key, os.PathLike):
        return os.fspath(key)
    if isinstance(key, (np.integer, np.floating, np.bool_)):
        key = key.item()
    return str(key)


def write_json(path, obj, inputs=()) -> None:
    """Write ``obj`` as strict JSON (indent 2) through :func:`atomic_output`.

    numpy scalars and arrays, Paths, Enums, dataclasses and objects with ``tolist()`` (tensors)
    are converted; NaN and infinities become ``null``.
    """
    data = _jsonable(obj)
    with atomic_output(path, inputs) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, allow_nan=False)
            fh.write("\n")
