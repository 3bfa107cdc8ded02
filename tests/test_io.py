"""ntkal.io: streaming readers, label normalisation, structure checks, atomic writers."""
import bz2
import gzip
import json
import logging
import os
import re
from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.neighborlist import neighbor_list

from ntkal.errors import InputError
from ntkal.io import (
    atomic_output,
    check_output_path,
    check_structure,
    count_structures,
    iter_chunks,
    read_structures,
    write_extxyz,
    write_json,
)

# ASE writes per-atom float columns with %16.8f: positions and per-atom arrays round trip to 1e-8.
ARRAY_ATOL = 1e-8


def labelled_structures(n_bulk=3, seed=0):
    """Rattled Si cells and a few molecules with REF labels, config_type and extra info/arrays."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_bulk):
        atoms = bulk("Si", "diamond", a=5.43) * (2, 1, 1)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        atoms.info["REF_energy"] = float(rng.normal() - 10.0)
        atoms.info["REF_stress"] = rng.normal(size=6)
        atoms.info["config_type"] = "bulk"
        atoms.info["step"] = k
        out.append(atoms)
    for name in ("H2O", "CH4", "C6H6"):
        atoms = molecule(name)
        atoms.positions += rng.normal(scale=0.02, size=atoms.positions.shape)
        atoms.info["REF_energy"] = float(rng.normal())
        atoms.info["config_type"] = "molecule"
        atoms.info["head"] = "mol"
        atoms.info["config_weight"] = 0.5
        out.append(atoms)
    for atoms in out:
        atoms.arrays["REF_forces"] = rng.normal(size=(len(atoms), 3))
        atoms.arrays["site_weight"] = rng.random(len(atoms))
        atoms.arrays["site_label"] = rng.integers(0, 5, size=len(atoms))
        atoms.info["temperature"] = float(rng.uniform(100, 900))
        atoms.info["source"] = "unit-test"
    return out


def assert_same_structures(got, expected, exact_arrays=False):
    assert len(got) == len(expected)
    atol = 0.0 if exact_arrays else ARRAY_ATOL
    for g, e in zip(got, expected):
        assert g.calc is None
        np.testing.assert_array_equal(g.numbers, e.numbers)
        np.testing.assert_allclose(g.positions, e.positions, rtol=0, atol=atol)
        np.testing.assert_array_equal(g.cell.array, e.cell.array)
        np.testing.assert_array_equal(g.pbc, e.pbc)
        assert set(g.info) == set(e.info)
        for key, value in e.info.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(g.info[key], value)
            else:
                assert g.info[key] == value, key
                assert type(g.info[key]) in (type(value), np.float64, np.int64), key
        assert set(g.arrays) == set(e.arrays)
        for key, value in e.arrays.items():
            if key in ("numbers", "positions"):
                continue
            assert g.arrays[key].shape == value.shape
            np.testing.assert_allclose(g.arrays[key], value, rtol=0, atol=atol, err_msg=key)


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", ["train.xyz", "train.extxyz", "train.extxyz.gz", "train.xyz.bz2",
                                  "train.extxyz.xz"])
def test_extxyz_round_trip(tmp_path, name):
    structures = labelled_structures()
    path = tmp_path / name
    assert write_extxyz(path, iter(structures)) == len(structures)
    got = list(read_structures(path))
    assert_same_structures(got, structures)
    assert count_structures(path) == len(structures)
    if name.endswith(".gz"):
        with gzip.open(path, "rt") as fh:
            assert fh.readline().strip() == str(len(structures[0]))


def test_db_round_trip_key_value_pairs_and_data(tmp_path):
    structures = labelled_structures()
    path = tmp_path / "pool.db"
    db = ase.db.connect(str(path))
    for atoms in structures:
        info = dict(atoms.info)
        stress = info.pop("REF_stress", None)
        data = {"REF_forces": atoms.arrays["REF_forces"], "site_weight": atoms.arrays["site_weight"],
                "site_label": atoms.arrays["site_label"]}
        if stress is not None:
            data["REF_stress"] = stress
        db.write(Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc),
                 key_value_pairs=info, data=data)
    got = list(read_structures(path))
    assert_same_structures(got, structures, exact_arrays=True)
    assert count_structures(path) == len(structures)


def test_db_calculator_labels_become_ref_keys_in_id_order(tmp_path, caplog, monkeypatch):
    import ntkal.io.read as nio

    monkeypatch.setattr(nio, "_DB_PAGE", 2)  # several pages
    path = tmp_path / "emt.db"
    db = ase.db.connect(str(path))
    expected = []
    for k in range(5):
        atoms = bulk("Cu", "fcc", a=3.6) * (2, 1, 1)
        atoms.rattle(0.05, seed=k)
        atoms.calc = EMT()
        expected.append((atoms.get_potential_energy(), atoms.get_forces().copy()))
        db.write(atoms, config_type=f"c{k}")
    with caplog.at_level(logging.WARNING, logger="ntkal"):
        got = list(read_structures(path))
    assert [a.info["config_type"] for a in got] == [f"c{k}" for k in range(5)]
    for atoms, (energy, forces) in zip(got, expected):
        assert atoms.calc is None
        assert atoms.info["REF_energy"] == energy
        np.testing.assert_array_equal(atoms.arrays["REF_forces"], forces)
    assert sum("REF_energy" in r.getMessage() for r in caplog.records) == 1


def test_plain_keys_are_moved_to_ref_with_one_warning(tmp_path, caplog):
    path = tmp_path / "plain.extxyz"
    rng = np.random.default_rng(1)
    frames = []
    for k in range(3):
        atoms = bulk("Si", "diamond", a=5.43)
        atoms.rattle(0.02, seed=k)
        forces = rng.normal(size=(len(atoms), 3))
        atoms.calc = SinglePointCalculator(atoms, energy=-1.5 * k, forces=forces,
                                           stress=rng.normal(size=6))
        frames.append((atoms, forces))
    with open(path, "w") as fh:  # plain keys, as old files and MACE's MP replay data have them
        for atoms, _ in frames:
            ase.io.write(fh, atoms, format="extxyz")
    text = path.read_text()
    assert "energy=" in text and ":forces:R:3" in text and "REF_" not in text
    with caplog.at_level(logging.WARNING, logger="ntkal"):
        got = list(read_structures(path))
    for g, (atoms, forces) in zip(got, frames):
        assert g.calc is None
        assert g.info["REF_energy"] == atoms.get_potential_energy()
        np.testing.assert_allclose(g.arrays["REF_forces"], forces, atol=ARRAY_ATOL)
        np.testing.assert_allclose(g.info["REF_stress"], atoms.get_stress(), atol=1e-12)
        assert "energy" not in g.info and "forces" not in g.arrays
    warnings = [r for r in caplog.records if r.name == "ntkal" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(path) in warnings[0].getMessage() and "REF_forces" in warnings[0].getMessage()


def test_existing_ref_keys_win_over_calculator_results(tmp_path):
    path = tmp_path / "both.extxyz"
    path.write_text("2\nenergy=-1.0 REF_energy=-2.0 config_type=x pbc=\"F F F\"\n"
                    "H 0 0 0\nH 0 0 0.74\n")
    (atoms,) = read_structures(path)
    assert atoms.info["REF_energy"] == -2.0 and atoms.info["config_type"] == "x"
    assert atoms.calc is None and "energy" not in atoms.info


def test_empty_files_yield_nothing(tmp_path):
    for name in ("empty.extxyz", "empty.db"):
        (tmp_path / name).write_bytes(b"")
        assert list(read_structures(tmp_path / name)) == []
        assert count_structures(tmp_path / name) == 0
    assert (tmp_path / "empty.db").stat().st_size == 0  # reading did not write tables into it
    with gzip.open(tmp_path / "empty.xyz.gz", "wt"):
        pass
    assert list(read_structures(tmp_path / "empty.xyz.gz")) == []
    assert count_structures(tmp_path / "empty.xyz.gz") == 0


def test_count_structures_without_parsing(tmp_path):
    structures = labelled_structures(n_bulk=7)
    plain = tmp_path / "pool.extxyz"
    write_extxyz(plain, structures)
    with open(plain, "a") as fh:
        fh.write("\n\n")  # trailing blank lines are not structures
    with open(plain, "rb") as src, bz2.open(tmp_path / "pool.extxyz.bz2", "wb") as dst:
        dst.write(src.read())
    assert count_structures(plain) == len(structures) == 10
    assert count_structures(tmp_path / "pool.extxyz.bz2") == 10
    assert len(list(read_structures(plain))) == 10


# --------------------------------------------------------------------------- laziness and errors


def _write_three_frames(path, bad_frame_text):
    good = labelled_structures(n_bulk=2)[:2]
    with open(path, "w") as fh:
        for atoms in good:
            ase.io.write(fh, atoms, format="extxyz")
        fh.write(bad_frame_text)
    return good


@pytest.mark.parametrize("bad", [
    "2\nProperties=species:S:1:pos:R:3\nH 0 0 0\nH 0 zero 0.7\n",   # unparsable coordinate
    "two\ncomment\nH 0 0 0\nH 0 0 0.7\n",                            # broken atom-count line
    "3\nProperties=species:S:1:pos:R:3\nH 0 0 0\n",                  # file ends inside the frame
    "2\nProperties=species:S:1:pos:R:3:REF_forces:R:3\nH 0 0 0 1 2\nH 0 0 0.7 1 2\n",  # short row
], ids=["bad-value", "bad-count", "truncated", "short-row"])
def test_reader_is_lazy_and_names_the_bad_frame(tmp_path, bad):
    path = tmp_path / "pool.extxyz"
    good = _write_three_frames(path, bad)
    stream = read_structures(path)
    first_two = [next(stream), next(stream)]
    assert_same_structures(first_two, good)
    with pytest.raises(InputError) as err:
        next(stream)
    message = str(err.value)
    assert message.startswith(f"{path}: structure 2 (0-based): ")
    assert err.value.index == 2 and err.value.path == str(path)


def test_count_names_the_bad_frame(tmp_path):
    path = tmp_path / "pool.xyz"
    _write_three_frames(path, "two\ncomment\nH 0 0 0\n")
    with pytest.raises(InputError, match=re.escape(f"{path}: structure 2 (0-based): ")):
        count_structures(path)
    path2 = tmp_path / "short.xyz"
    _write_three_frames(path2, "5\ncomment\nH 0 0 0\n")
    with pytest.raises(InputError, match=re.escape(f"{path2}: structure 2 (0-based): ")):
        count_structures(path2)


@pytest.mark.parametrize("delta", [-1, 1], ids=["count-too-small", "count-too-large"])
def test_wrong_atom_count_is_reported_at_its_own_structure(tmp_path, delta):
    """Structure 3 of 6 announces one atom too few or too many: the reader and the counter both
    name structure 3 (a too-small count was reported at structure 4 before)."""
    structures = labelled_structures(n_bulk=3)
    path = tmp_path / "pool.extxyz"
    write_extxyz(path, structures)
    lines = path.read_text().splitlines(keepends=True)
    start = sum(len(a) + 2 for a in structures[:3])
    assert lines[start].strip() == str(len(structures[3]))
    lines[start] = f"{len(structures[3]) + delta}\n"
    path.write_text("".join(lines))
    stream = read_structures(path)
    assert_same_structures([next(stream) for _ in range(3)], structures[:3])
    expected = f"{path}: structure 3 (0-based): malformed extxyz frame: " + ("more" if delta < 0 else "fewer")
    with pytest.raises(InputError, match=re.escape(expected)):
        next(stream)
    with pytest.raises(InputError, match=re.escape(expected)):
        count_structures(path)


def test_corrupt_gzip_is_an_input_error(tmp_path):
    structures = labelled_structures(n_bulk=40)
    path = tmp_path / "pool.extxyz.gz"
    write_extxyz(path, structures)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(InputError, match=re.escape(str(path)) + ".*structure [0-9]+ \(0-based\): cannot read"):
        list(read_structures(path))
    with pytest.raises(InputError, match="cannot read"):
        count_structures(path)


def test_file_errors(tmp_path):
    missing = tmp_path / "nope.extxyz"
    for func in (read_structures, count_structures):
        with pytest.raises(InputError, match=re.escape(f"{missing}: no such file")):
            func(missing)
        with pytest.raises(InputError, match="is a directory"):
            func(tmp_path)
    unknown = tmp_path / "pool.cif"
    unknown.write_text("data_x\n")
    with pytest.raises(InputError, match=re.escape(str(unknown))) as err:
        read_structures(unknown)
    assert ".extxyz" in str(err.value) and ".db" in str(err.value) and ".gz" in str(err.value)
    zipped_db = tmp_path / "pool.db.gz"
    zipped_db.write_bytes(b"x")
    with pytest.raises(InputError, match="decompress"):
        read_structures(zipped_db)
    not_db = tmp_path / "fake.db"
    not_db.write_text("this is not sqlite\n" * 100)
    with pytest.raises(InputError, match=re.escape(str(not_db)) + ".*ASE database"):
        list(read_structures(not_db))
    with pytest.raises(InputError, match=re.escape(str(not_db))):
        count_structures(not_db)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.extxyz"
    path.write_text("1\n\nH 0 0 0\n")
    path.chmod(0)
    try:
        with pytest.raises(InputError, match="permission"):
            read_structures(path)
    finally:
        path.chmod(0o644)


# ------------------------------------------------------------------------------- structure checks


def test_check_structure_accepts_good_structures():
    for atoms in labelled_structures():
        check_structure(atoms, 0, "pool.xyz", known_numbers=[1, 6, 8, 14])
    check_structure(Atoms("H"), 0, "p")  # one atom, no cell


def _message(atoms, **kwargs):
    with pytest.raises(InputError) as err:
        check_structure(atoms, 7, "pool.xyz", **kwargs)
    message = str(err.value)
    assert message.startswith("pool.xyz: structure 7 (0-based): ")
    return message


def test_check_structure_errors():
    assert "no atoms" in _message(Atoms())
    nan = molecule("H2O")
    nan.positions[1, 2] = np.nan
    assert "NaN" in _message(nan) and "atom 1" in _message(nan)
    bad_cell = bulk("Si", "diamond", a=5.43)
    bad_cell.cell[0, 0] = np.inf
    assert "cell" in _message(bad_cell)
    close = molecule("CH4")
    close.positions[3] = close.positions[1] + [0.03, 0.0, 0.0]
    message = _message(close)
    assert "atoms 1 (H) and 3 (H)" in message and "0.03 Å" in message
    unknown = molecule("CH3CH2OH")
    message = _message(unknown, known_numbers=[1, 14])
    assert "C, O" in message and "H, Si" in message


def test_close_pair_through_periodic_image():
    atoms = Atoms("Si2", positions=[[0.01, 1.0, 1.0], [4.96, 1.0, 1.0]], cell=[5.0, 5.0, 5.0],
                  pbc=True)
    message = _message(atoms)
    assert "atoms 0 (Si) and 1 (Si) are 0.05 Å apart" in message and "periodic" in message
    atoms.pbc = False  # 4.95 Å apart without images
    check_structure(atoms, 0, "p")
    tiny = Atoms("H", positions=[[0, 0, 0]], cell=[0.05, 3.0, 3.0], pbc=True)
    assert "own periodic image" in _message(tiny)


def test_close_pair_in_large_structure_uses_neighbour_list():
    atoms = bulk("Si", "diamond", a=5.43, cubic=True) * (4, 4, 4)  # 512 atoms: not the all-pairs path
    check_structure(atoms, 0, "p", known_numbers=[14])
    atoms.positions[100] = atoms.positions[7] + [0.0, 0.05, 0.0]
    assert "atoms 7 (Si) and 100 (Si) are 0.05 Å apart" in _message(atoms)


def test_fast_close_pair_check_agrees_with_ase_neighbour_list():
    """The all-pairs path (nearest image by rounding fractional coordinates) against ASE's
    neighbour list on skewed cells, partly periodic, with atoms placed near cell faces."""
    rng = np.random.default_rng(3)
    found = 0
    for trial in range(80):
        cell = rng.normal(scale=0.4, size=(3, 3)) + np.eye(3) * rng.uniform(1.5, 3.0)
        pbc = rng.random(3) < 0.7
        n = int(rng.integers(2, 9))
        scaled = rng.random((n, 3))
        scaled[0] = rng.choice([0.002, 0.998], size=3)  # images of atoms 0 and 1 nearly touch
        scaled[1] = 1.0 - scaled[0] + rng.normal(scale=0.01, size=3)
        atoms = Atoms(f"H{n}", scaled_positions=scaled, cell=cell, pbc=pbc)
        for cutoff in (0.1, 0.4):
            _, _, d = neighbor_list("ijd", atoms, cutoff)
            if len(d):
                found += 1
                with pytest.raises(InputError, match=f"{d.min():.4g} Å apart|own periodic image"):
                    check_structure(atoms, trial, "p", min_distance=cutoff)
            else:
                check_structure(atoms, trial, "p", min_distance=cutoff)
    assert found > 20


def test_unusable_periodic_cells():
    flat = Atoms("H2", positions=[[0, 0, 0], [1, 1, 0]], cell=[3.0, 3.0, 0.0], pbc=True)
    assert "cell vector is zero" in _message(flat)
    flat.pbc = [True, True, False]  # a zero vector along a non-periodic direction is fine
    check_structure(flat, 0, "p")
    coplanar = Atoms("H2", positions=[[0, 0, 0], [1, 1, 0]], cell=[[3, 0, 0], [0, 3, 0], [3, 3, 0]],
                     pbc=True)
    assert "degenerate" in _message(coplanar)


def test_close_pair_in_a_huge_periodic_box_is_found_quickly():
    """ASE sizes its bins from the cell: uncapped, three atoms in a 1000 Å box cost 1.4 s."""
    import time

    atoms = Atoms("H3", positions=[[1, 1, 1], [1.03, 1, 1], [500, 500, 500]], cell=[1000.0] * 3,
                  pbc=True)
    start = time.process_time()
    assert "atoms 0 (H) and 1 (H) are 0.03 Å apart" in _message(atoms)
    atoms.positions[1] = [999.5, 1, 1]  # 1.5 Å through the boundary
    check_structure(atoms, 0, "p")
    assert time.process_time() - start < 0.5


def _brute_force_min_distance(atoms, reach=30):
    shifts = np.stack(np.meshgrid(*[np.arange(-reach, reach + 1) if p else [0] for p in atoms.pbc],
                                  indexing="ij"), -1).reshape(-1, 3)
    images = shifts @ atoms.cell.array
    best = np.inf
    for i in range(len(atoms)):
        for j in range(len(atoms)):
            d = np.linalg.norm(atoms.positions[j] - atoms.positions[i] + images, axis=1)
            if i == j:
                d = d[np.any(shifts != 0, axis=1)]
            best = min(best, d.min())
    return best


def test_close_pairs_in_a_strongly_sheared_cell():
    """b - a is a 0.158 Å lattice vector: every atom is that close to its own image."""
    cell = [[3.0, 0.0, 0.0], [2.95, 0.15, 0.0], [0.0, 0.0, 3.0]]
    atoms = Atoms("Si2", scaled_positions=[[0.1, 0.2, 0.3], [0.6, 0.3, 0.8]], cell=cell, pbc=True)
    expected = _brute_force_min_distance(atoms)
    assert expected == pytest.approx(np.hypot(0.05, 0.15))
    assert f"{expected:.4g} Å from its own periodic image" in _message(atoms, min_distance=0.2)
    check_structure(atoms, 0, "p", min_distance=0.15)
    atoms.pbc = [True, False, True]  # only a and c periodic: no short lattice vector left
    assert _brute_force_min_distance(atoms) > 0.15
    check_structure(atoms, 0, "p", min_distance=0.15)


# ------------------------------------------------------------------------------------ iter_chunks


def test_iter_chunks():
    assert list(iter_chunks(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(iter_chunks([], 4)) == []
    pulled = []

    def endless():
        k = 0
        while True:
            pulled.append(k)
            yield k
            k += 1

    chunks = iter_chunks(endless(), 5)
    assert next(chunks) == [0, 1, 2, 3, 4] and len(pulled) == 5
    with pytest.raises(ValueError):
        list(iter_chunks(range(3), 0))


# ---------------------------------------------------------------------------------------- writers


def test_atomic_output_on_exception_leaves_nothing(tmp_path):
    target = tmp_path / "out.extxyz"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            tmp.write_text("partial")
            raise RuntimeError("crash in the middle")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_keeps_existing_file_on_exception(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target) as tmp:
            tmp.write_text("new")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    with atomic_output(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]


def test_atomic_output_file_modes(tmp_path):
    existing = tmp_path / "kept.json"
    existing.write_text("old")
    existing.chmod(0o640)
    write_json(existing, [1])
    assert existing.stat().st_mode & 0o777 == 0o640  # an overwritten file keeps its mode
    umask = os.umask(0o022)
    os.umask(umask)
    fresh = tmp_path / "fresh.json"
    write_json(fresh, [1])
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600


def test_writer_with_failing_iterator_keeps_old_output(tmp_path):
    target = tmp_path / "sel.extxyz"
    write_extxyz(target, labelled_structures()[:2])
    before = target.read_bytes()

    def failing():
        yield from labelled_structures()[:3]
        raise RuntimeError("featurizer died")

    with pytest.raises(RuntimeError):
        write_extxyz(target, failing())
    assert target.read_bytes() == before and list(tmp_path.iterdir()) == [target]


def test_refuses_to_overwrite_inputs(tmp_path, monkeypatch):
    pool = tmp_path / "pool.extxyz"
    write_extxyz(pool, labelled_structures()[:1])
    before = pool.read_bytes()
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "link.extxyz"
    link.symlink_to(pool)
    hard = tmp_path / "hard.extxyz"
    os.link(pool, hard)
    for out, inputs in ((pool, [pool]), ("pool.extxyz", [str(pool)]), (pool, [link]),
                        (hard, ["train.xyz", pool]), (tmp_path / "sub" / ".." / "pool.extxyz", pool)):
        with pytest.raises(InputError, match="refusing to overwrite an input file"):
            write_extxyz(out, labelled_structures()[:2], inputs=inputs)
        with pytest.raises(InputError, match="refusing to overwrite an input file"):
            write_json(out, {"a": 1}, inputs=inputs)
    assert pool.read_bytes() == before
    # non-path inputs (an in-memory pool) are ignored
    write_json(tmp_path / "report.json", {"a": 1}, inputs=[labelled_structures(), None, pool])


def test_output_path_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist") as err:
        write_extxyz(tmp_path / "missing" / "out.extxyz", labelled_structures()[:1])
    assert str(tmp_path / "missing" / "out.extxyz") in str(err.value)
    with pytest.raises(InputError, match="is a directory"):
        check_output_path(tmp_path)
    with pytest.raises(InputError, match="extxyz"):
        write_extxyz(tmp_path / "out.cif", labelled_structures()[:1])
    assert list(tmp_path.iterdir()) == []


def test_write_extxyz_never_writes_plain_label_keys(tmp_path, caplog):
    frames = []
    for k in range(3):
        atoms = bulk("Cu", "fcc", a=3.6) * (2, 2, 1)
        atoms.rattle(0.05, seed=k)
        atoms.calc = EMT()
        atoms.get_forces()
        atoms.get_stress()
        frames.append(atoms)
    plain = molecule("H2O")
    plain.info["energy"] = -14.2  # plain keys set by hand
    plain.arrays["forces"] = np.ones((3, 3))
    plain.info["stress"] = np.eye(3)
    frames.append(plain)
    path = tmp_path / "sel.extxyz"
    with caplog.at_level(logging.WARNING, logger="ntkal"):
        write_extxyz(path, (f for f in frames))
    assert sum(r.name == "ntkal" and "REF_energy" in r.getMessage() for r in caplog.records) == 1
    for line in path.read_text().splitlines():
        assert not re.search(r"(^|\s)(energy|stress|free_energy)=", line)
        assert not re.search(r"[=:](forces|energies):", line)
    # the inputs are untouched
    assert frames[0].calc is not None and "REF_energy" not in frames[0].info
    assert plain.info["energy"] == -14.2 and "REF_forces" not in plain.arrays
    got = list(ase.io.iread(path, format="extxyz"))  # plain ASE, as mace_run_train reads it
    for g, f in zip(got[:3], frames[:3]):
        assert g.calc is None
        assert g.info["REF_energy"] == f.get_potential_energy()
        np.testing.assert_allclose(g.arrays["REF_forces"], f.get_forces(), atol=ARRAY_ATOL)
        np.testing.assert_allclose(g.info["REF_stress"], f.get_stress(), atol=1e-12)
    assert got[3].info["REF_energy"] == -14.2
    np.testing.assert_allclose(got[3].info["REF_stress"], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(got[3].arrays["REF_forces"], np.ones((3, 3)))


def test_write_extxyz_keeps_ntkal_outputs_and_fails_on_lost_labels(tmp_path):
    atoms = labelled_structures()[0]
    atoms.info.update(ntkal_score=np.float32(0.123456), ntkal_pool_index=np.int64(12345), ntkal_rank=0)
    atoms.arrays["ntkal_atom_variance"] = np.linspace(0.0, 2.0, len(atoms)).astype(np.float32)
    path = tmp_path / "sel.extxyz"
    write_extxyz(path, [atoms])
    (got,) = read_structures(path)
    assert got.info["ntkal_pool_index"] == 12345 and got.info["ntkal_rank"] == 0
    assert abs(got.info["ntkal_score"] - 0.123456) < 1e-6
    np.testing.assert_allclose(got.arrays["ntkal_atom_variance"], atoms.arrays["ntkal_atom_variance"],
                               atol=1e-7)
    broken = labelled_structures()[0]
    broken.info["REF_energy"] = {"not": object()}  # cannot be written: ASE skips it
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'bad.extxyz'}: structure 0 (0-based): ")):
        write_extxyz(tmp_path / "bad.extxyz", [broken])
    assert not (tmp_path / "bad.extxyz").exists()


def test_write_extxyz_verifies_every_new_layout(tmp_path, caplog):
    """Only the first frame of a layout is read back, so a later frame with a new layout (a label
    ASE cannot write, a string ASE reads back as a bool) must still be caught."""
    frames = labelled_structures(n_bulk=3)[:3]
    frames[2].info["REF_energy"] = {"not": object()}
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'a.extxyz'}: structure 2 (0-based): ")):
        write_extxyz(tmp_path / "a.extxyz", frames)
    frames = labelled_structures(n_bulk=3)[:3]
    frames[2].info["config_type"] = "T"
    with caplog.at_level(logging.WARNING, logger="ntkal"):
        write_extxyz(tmp_path / "b.extxyz", frames)
    assert sum("config_type" in r.getMessage() for r in caplog.records) == 1
    assert [a.info["config_type"] for a in read_structures(tmp_path / "b.extxyz")] == ["bulk", "bulk", True]


def test_output_is_what_mace_run_train_reads(tmp_path):
    from mace.data.utils import KeySpecification, config_from_atoms, load_from_xyz

    frames = []
    for k in range(4):
        atoms = bulk("Cu", "fcc", a=3.6) * (2, 1, 1)
        atoms.rattle(0.05, seed=10 + k)
        atoms.calc = EMT()
        atoms.get_forces()
        atoms.info["config_type"] = "cu"
        frames.append(atoms)
    path = tmp_path / "train.extxyz"
    write_extxyz(path, frames)
    _, configs = load_from_xyz(str(path), KeySpecification.from_defaults())
    assert len(configs) == 4
    for config, atoms in zip(configs, frames):
        assert config.properties["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-12)
        np.testing.assert_allclose(config.properties["forces"], atoms.get_forces(), atol=ARRAY_ATOL)
        assert config.property_weights["energy"] == 1.0 and config.property_weights["forces"] == 1.0
        assert config.config_type == "cu"
    # and through ase.io.read + config_from_atoms with the default REF keys
    config = config_from_atoms(ase.io.read(path, index=0), KeySpecification.from_defaults())
    assert config.properties["energy"] == pytest.approx(frames[0].get_potential_energy(), abs=1e-12)


def test_write_json(tmp_path):
    path = tmp_path / "report.json"
    write_json(path, {"n": np.int64(3), "x": np.float32(0.5), "arr": np.arange(3),
                      "path": Path("/a/b"), "nan": float("nan"), "flag": np.bool_(True),
                      "nested": [(1, 2), {np.int64(4): "four"}]})
    text = path.read_text()
    assert text.startswith("{\n  ") and text.endswith("\n")
    assert json.loads(text) == {"n": 3, "x": 0.5, "arr": [0, 1, 2], "path": "/a/b", "nan": None,
                                "flag": True, "nested": [[1, 2], {"4": "four"}]}
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text())["n"] == 3 and list(tmp_path.iterdir()) == [path]
