"""Writers: output-path checks, atomic replacement, and extxyz files that mace_run_train reads.

Every writer goes through :func:`atomic_output`: a temporary file in the destination directory,
moved into place with ``os.replace`` only when everything was written, and never onto an input file.
Nothing named like a calculator property is ever written (see :mod:`ntkal.io.read`).
"""
from __future__ import annotations

import io
import os
import re
import tempfile
from glob import escape as glob_escape
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from ntkal.errors import InputError

from .read import file_kind, logger, normalize_labels, open_text, parse_frame, reason, warn_moved

#: Strings ASE's extxyz reader reads back as themselves: no number, bool or array, no quoting.
_PLAIN_STR = re.compile(r"(?!(?:[tf]|true|false|nan|inf|infinity)$)[a-z_][a-z0-9_.+-]*", re.IGNORECASE)


def _as_path_list(inputs) -> list[Path]:
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    return [Path(os.fspath(p)).expanduser() for p in inputs or () if isinstance(p, (str, os.PathLike))]


def _same_file(a: Path, b: Path) -> bool:
    with suppress(OSError):
        if os.path.samefile(a, b):
            return True
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
    if not out.parent.is_dir():
        raise InputError(f"the output directory {str(out.parent)!r} does not exist", out)
    return out

def writable_folder(folder: Path):
    """InputError unless a file can be created in `folder` (or, if it does not exist yet, in its nearest
    existing parent): found out now, not after the model has loaded. The probe file is removed at once."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".ntkal-probe-"):
            pass
    except OSError as exc:
        raise InputError(f"--out: cannot write in {existing} ({exc.strerror or exc})") from None


def check_extxyz_name(out: Path):
    """InputError unless `out` names an extxyz file (.xyz or .extxyz, optionally compressed)."""
    from .read import COMPRESSION_SUFFIXES, EXTXYZ_SUFFIXES
    name = out.name.lower()
    for c in COMPRESSION_SUFFIXES:
        name = name[: -len(c)] if name.endswith(c) else name
    if not name.endswith(EXTXYZ_SUFFIXES):
        raise InputError(f"--out must name an extxyz file (.xyz or .extxyz, optionally .gz/.bz2/.xz), "
                         f"got {out.name!r}", path=out)



def _new_file_mode(existing: Path) -> int:
    try:
        return existing.stat().st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _remove_stale_temporaries(out: Path):
    """Remove the temporaries of `out` that a killed ntkal process left (named .ntkal-tmp-<pid>-*-<name>,
    the pid no longer running); those of a live process and any other file are left alone."""
    for tmp in out.parent.glob(f".ntkal-tmp-*-{glob_escape(out.name)}"):
        pid = tmp.name[len(".ntkal-tmp-"):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:  # alive, someone else's
            pass


@contextmanager
def atomic_output(path, inputs=()):
    """Context manager yielding a temporary Path in ``path``'s directory; on normal exit the
    temporary file replaces ``path`` (``os.replace``, atomic on one file system), on an exception it
    is removed and an existing ``path`` is left as it was. The temporary name ends with ``path``'s
    name, so suffix-based format detection still works. Checks :func:`check_output_path` first.
    """
    out = check_output_path(path, inputs)
    _remove_stale_temporaries(out)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".ntkal-tmp-{os.getpid()}-", suffix="-" + out.name)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _new_file_mode(out))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
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

    With ``verify`` (default) the first frame of each layout (its info/arrays keys with their kinds
    and shapes; strings ASE may read back as another type count by value) is parsed back: atoms,
    positions (to ASE's 8 decimals), cell, pbc, ``REF_*`` labels and ``ntkal_*`` keys must survive
    (else :class:`InputError` naming the output and the frame, and nothing is written); other keys
    that are lost or change type (ASE skips values it cannot serialise and reads the string "T"
    back as True) give one warning per file. ASE writes a layout the same way whatever the numbers,
    so other frames are only searched for their ``REF_*``/``ntkal_*`` key names (verifying every
    frame cost about as much as writing it).
    """
    out = Path(os.fspath(path)).expanduser()
    try:
        kind, compression = file_kind(out)
    except InputError:
        kind = None
    if kind != "extxyz":
        raise InputError(f"the output must be an extxyz file (.xyz or .extxyz, optionally "
                         f".gz/.bz2/.xz), got {out.name!r}", out)
    import ase.io
    from ase import Atoms

    if isinstance(atoms_iterable, Atoms):
        atoms_iterable = [atoms_iterable]
    moved_all: set[str] = set()
    soft_all: set[str] = set()
    verified: set = set()
    count = 0
    with atomic_output(out, inputs) as tmp:
        with open_text(tmp, "w", compression) as fh:
            for index, atoms in enumerate(atoms_iterable):
                frame, moved, flattened = _prepare_for_write(atoms)
                moved_all.update(moved)
                soft_all.update(flattened)
                buf = io.StringIO()
                try:
                    ase.io.write(buf, frame, format="extxyz")
                except Exception as exc:
                    raise InputError(f"cannot write this structure as extxyz: {reason(exc)}",
                                     out, index) from exc
                text = buf.getvalue()
                if verify:
                    layout = _layout(frame)
                    if layout not in verified:
                        soft_all.update(_verify_frame(text, frame, out, index))
                        verified.add(layout)
                    else:
                        _check_hard_keys(text, frame, out, index)
                fh.write(text)
                count += 1
    if moved_all:
        warn_moved(out, moved_all, writing=True)
    if soft_all:
        logger.warning("%s: info/arrays key%s %s did not survive the extxyz round trip unchanged "
                       "(lost, flattened, or read back with another type)", out,
                       "" if len(soft_all) == 1 else "s", ", ".join(sorted(soft_all)))
    return count


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


def _layout(frame) -> tuple:
    """What decides how ASE writes and reads back a frame, apart from the numbers in it: keys with
    their kinds and shapes; strings other than plain words, dicts and the like by value."""
    info = []
    for key, value in frame.info.items():
        kind = _kind_of(value)
        plain = (kind in ("bool", "number") or (isinstance(kind, tuple) and kind[2] != "other")
                 or (kind == "str" and _PLAIN_STR.fullmatch(value)))
        info.append((key, kind if plain else repr(value)))
    arrays = tuple((k, v.dtype.kind, v.shape[1:]) for k, v in frame.arrays.items())
    return tuple(info), arrays, tuple(frame.pbc), frame.cell.any(1).tobytes()


def _check_hard_keys(text: str, frame, out: Path, index: int) -> None:
    """The REF_*/ntkal_* keys of a frame whose layout was verified appear in its header line."""
    header = " " + text.split("\n", 2)[1]
    lost = [k for k in frame.info if _is_hard_key(k) and f" {k}=" not in header]
    lost += [k for k in frame.arrays
             if _is_hard_key(k) and not re.search(rf"[=:]{re.escape(k)}:[SRIL]:\d", header)]
    if lost:
        raise InputError("this structure does not survive writing to extxyz unchanged: "
                         + "; ".join(lost), out, index)


def _rtol(value) -> float:
    """Relative tolerance of a float value's own precision (float32 scores print with 7 digits)."""
    dtype = getattr(value, "dtype", None)
    if dtype is not None and dtype.kind == "f" and dtype.itemsize < 8:
        return 1e-6
    return 1e-12


def _values_match(a, b, atol) -> bool:
    ka, kb = _kind_of(a), _kind_of(b)
    # numbers, and numeric arrays of one shape (an int array read back as float is fine), to precision
    if ka == kb == "number" or (isinstance(ka, tuple) and isinstance(kb, tuple) and ka[1] == kb[1]
                                and {ka[2], kb[2]} <= set("iuf")):
        return bool(np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=_rtol(a),
                                atol=atol, equal_nan=True))
    return ka == kb and (np.array_equal(a, b) if isinstance(ka, tuple) else a == b)


def _verify_frame(text: str, expected, out: Path, index: int) -> set[str]:
    """Parse one written frame back; raise on lost essentials, return the names of other keys
    that changed."""
    try:
        got = parse_frame(text.splitlines(keepends=True))
    except Exception as exc:
        raise InputError(f"the extxyz text written for this structure does not read back: "
                         f"{reason(exc)}", out, index) from exc
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


def figure(*args, **kwargs):
    """(fig, axes) of a headless matplotlib figure (Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(*args, **kwargs)


def save_png(fig, path) -> None:
    """Write a figure as PNG atomically, marked as ntkal's (runstate.written_by_ntkal reads the mark)."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png", metadata={"Software": "ntkal"})
    plt.close(fig)
