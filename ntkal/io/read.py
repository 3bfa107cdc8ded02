"""Streaming readers: extxyz (plain or compressed) and ASE databases in, labels normalised to REF_*.

Reading never holds a whole file in memory: extxyz files are split into frames here, one frame at a
time, and each frame is parsed by ASE's own extxyz reader; ASE databases are read in pages of rows in
id order. (``ase.io.iread`` itself indexes the whole file before it yields the first frame, which
stops at a malformed header before anything is yielded, and on a ``.gz`` file seeks backwards for
every frame, which costs quadratic time.)
"""
from __future__ import annotations

import bz2
import gzip
import io
import itertools
import logging
import lzma
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ntkal.errors import InputError

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
_PER_ATOM_RESULTS = frozenset(("forces", "stresses", "charges", "magmoms", "energies",
                               "born_effective_charges"))

_DB_PAGE = 1000  # rows fetched per query (ase's sqlite backend fetches a whole query at once)
_SUFFIX_HELP = ("ntkal reads .xyz and .extxyz files (optionally compressed: .gz, .bz2, .xz) "
                "and ASE databases (.db)")
_READ_ERRORS = (OSError, EOFError, UnicodeDecodeError, lzma.LZMAError, zlib.error)
_BARE_INT = re.compile(r"^\s*[+-]?\d+\s*$", re.MULTILINE)


def file_kind(path: Path) -> tuple[str, str | None]:
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


def open_text(path: Path, mode: str, compression: str | None):
    """Open a text file for 'r' or 'w', (de)compressing by ``compression`` ('gz', 'bz2', 'xz')."""
    opener = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}.get(compression, open)
    return opener(path, mode + "t", encoding="utf-8")


def reason(exc: BaseException, limit: int = 200) -> str:
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
        for name, value in dict(getattr(calc, "results", None) or {}).items():
            if value is None:
                continue
            ref = "REF_" + name
            if (name in _PER_ATOM_RESULTS and isinstance(value, np.ndarray) and value.ndim >= 1
                    and value.shape[0] == len(atoms)):
                if ref not in atoms.arrays:
                    atoms.arrays[ref] = np.array(value, copy=True)
                    moved.append(name)
            elif ref not in atoms.info:
                atoms.info[ref] = np.array(value, copy=True) if isinstance(value, np.ndarray) else value
                moved.append(name)
    if plain_keys:
        for store in (atoms.info, atoms.arrays):
            for name in [k for k in store if k in CALCULATOR_KEYS]:
                value = store.pop(name)
                if name == "stress" and store is atoms.info and np.shape(value) == (3, 3):
                    value = np.asarray(value)[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]  # Voigt order
                if "REF_" + name not in store:
                    store["REF_" + name] = value
                    moved.append(name)
    return moved


def warn_moved(path, moved: set[str], writing: bool = False) -> None:
    """One warning per file naming the labels that were moved to REF_* keys."""
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
    kind, compression = file_kind(path)
    raw = _read_db(path) if kind == "db" else _read_extxyz(path, compression)
    return _normalized(path, raw)


def _normalized(path: Path, structures: Iterator) -> Iterator:
    """Labels moved to the REF_* keys, with one warning per file naming what was moved."""
    warned = False
    for atoms in structures:
        moved = normalize_labels(atoms)
        if moved and not warned:
            warn_moved(path, set(moved))
            warned = True
        yield atoms


class _LayoutError(Exception):
    """The frame being split breaks the extxyz layout."""


def _count_line(line: str) -> int | None:
    try:
        return int(line)
    except ValueError:
        return None


def _split_frames(fh) -> Iterator[list[str]]:
    """Yield the lines of each extxyz frame: count line, comment line, the announced atom lines and
    any VEC1..3 lines after them; blank lines between frames are skipped.

    Raises :class:`_LayoutError` for the frame being split: a count line that is not a non-negative
    integer, a file that ends inside the frame, or a count that disagrees with the atom lines: a bare
    integer among them (the next frame's count line: too large) or, where the next count line should
    be, a line shaped like this frame's atom lines (too small; else reported at the next frame).
    """
    line = fh.readline()
    while line:
        if not line.strip():
            line = fh.readline()
            continue
        natoms = _count_line(line)
        if natoms is None or natoms < 0:
            raise _LayoutError(f"malformed extxyz frame: expected the atom-count line, got "
                               f"{line.strip()[:60]!r}")
        comment = fh.readline()
        if not comment:
            raise _LayoutError("malformed extxyz frame: the file ends after the atom-count line "
                               "(no comment line)")
        lines = [line, comment, *itertools.islice(fh, natoms)]
        if len(lines) - 2 < natoms:
            raise _LayoutError(f"malformed extxyz frame: the file ends after {len(lines) - 2} of "
                               f"{natoms} atom lines")
        if natoms and _BARE_INT.search("".join(lines[2:])):
            raise _LayoutError(f"malformed extxyz frame: fewer atom lines than the {natoms} its "
                               f"atom-count line announces (the next frame's count line is among them)")
        line = fh.readline()
        while line.lstrip().startswith("VEC"):
            lines.append(line)
            line = fh.readline()
        if (natoms and line.strip() and _count_line(line) is None
                and len(line.split()) == len(lines[natoms + 1].split())):
            raise _LayoutError(f"malformed extxyz frame: more atom lines than the {natoms} its "
                               f"atom-count line announces")
        yield lines


def _extxyz_frames(path: Path, compression) -> Iterator[list[str]]:
    """The frames of an extxyz file as line lists; layout and read errors as InputError."""
    try:
        fh = open_text(path, "r", compression)
    except OSError as exc:
        raise InputError(f"cannot open the file: {reason(exc)}", path) from exc
    with fh:
        frames = _split_frames(fh)
        for index in itertools.count():
            try:
                lines = next(frames)
            except StopIteration:
                return
            except _LayoutError as exc:
                raise InputError(str(exc), path, index) from None
            except _READ_ERRORS as exc:
                raise InputError(f"cannot read the file: {reason(exc)}", path, index) from exc
            yield lines


def parse_frame(lines: list[str]):
    """One extxyz frame's lines as ``ase.Atoms``, through ASE's extxyz reader."""
    import ase.io

    return ase.io.read(io.StringIO("".join(lines)), index=0, format="extxyz")


def _read_extxyz(path: Path, compression):
    for index, lines in enumerate(_extxyz_frames(path, compression)):
        try:
            atoms = parse_frame(lines)
        except Exception as exc:  # ase raises XYZError, ValueError, KeyError, IndexError, ...
            raise InputError(f"malformed extxyz frame: {reason(exc)}", path, index) from exc
        yield atoms


def _connect_db(path: Path):
    import ase.db

    return ase.db.connect(str(path), type="db", create_indices=False, use_lock_file=False)


def _db_error(path, exc, index=None):
    return InputError(f"cannot read this ASE database ({reason(exc)})", path, index)


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
                                 f"({reason(exc)})", path, index) from exc
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

    extxyz: the reader's own frame splitter without ASE's parse (streaming, also through
    compression), so both report a broken frame layout (a count line that is not an integer, a
    count that disagrees with the atom lines, a file that ends inside a frame) at the same
    structure; ASE database: ``count()``. Raises :class:`InputError` for such a layout.
    """
    path = _check_readable(path)
    kind, compression = file_kind(path)
    if kind == "extxyz":
        return sum(1 for _ in _extxyz_frames(path, compression))
    if path.stat().st_size == 0:
        return 0
    try:
        return int(_connect_db(path).count())
    except Exception as exc:
        raise _db_error(path, exc) from exc


@dataclass
class Survey:
    """What a pre-pass over a structure file found: how many structures, and where each element first occurs
    (atomic number -> 0-based structure index; empty for ASE databases, whose rows are not read ahead)."""

    count: int
    first_of: dict = field(default_factory=dict)

    def check_elements(self, known_numbers, path) -> None:
        """InputError naming the first structure with an element outside ``known_numbers``."""
        from .checks import _symbol
        known = {int(z) for z in known_numbers}
        unknown = sorted((i, z) for z, i in self.first_of.items() if z not in known)
        if unknown:
            index, _ = unknown[0]
            bad = sorted(z for _, z in unknown)
            raise InputError(f"element{'s' if len(bad) > 1 else ''} {', '.join(_symbol(z) for z in bad)} not known "
                             f"to the model (it knows {', '.join(_symbol(z) for z in sorted(known))})", path, index)


def survey(path, labels: bool = False) -> Survey:
    """Stream a file once before any model is loaded: frame layout and atom counts (every structure has at
    least one atom), chemical symbols, and with ``labels`` every structure parsed and its labels checked
    finite (:func:`ntkal.io.checks.check_labels`). Errors are InputErrors naming the file and structure."""
    from ase.data import atomic_numbers
    from .checks import check_labels
    path = _check_readable(path)
    kind, compression = file_kind(path)
    if kind == "db":
        out = Survey(count_structures(path))
        if labels:
            for index, atoms in enumerate(read_structures(path)):
                check_labels(atoms, index, path)
        return out
    first_of: dict = {}
    count = 0
    for index, lines in enumerate(_extxyz_frames(path, compression)):
        count += 1
        natoms = int(lines[0])
        if natoms == 0:
            raise InputError("the structure has no atoms", path, index)
        for line in lines[2:2 + natoms]:
            symbol = line.split(None, 1)[0] if line.strip() else ""
            z = atomic_numbers.get(symbol.capitalize())
            if z is None:
                raise InputError(f"malformed extxyz frame: {symbol[:20]!r} is not a chemical symbol", path, index)
            first_of.setdefault(z, index)
        if labels:
            try:
                atoms = parse_frame(lines)
            except Exception as exc:  # as _read_extxyz
                raise InputError(f"malformed extxyz frame: {reason(exc)}", path, index) from exc
            normalize_labels(atoms)
            check_labels(atoms, index, path)
    return Survey(count, first_of)


def iter_chunks(iterable: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last one may be shorter), pulled lazily."""
    size = int(size)
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
