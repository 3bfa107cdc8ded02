"""ntkal.Calculator (MACE energy, forces, stress + the predicted error of each step) and `ntkal md`."""
import numpy as np
import pytest
import torch

import ntkal
from ntkal.acquisition.scorers import ErrorScorer
from ntkal.calculator import Calculator
from ntkal.data import demo_files
from ntkal.errors import NtkalError
from ntkal.features.fast import rows_and_outputs

K = 64  # small sketch: the numbers are what is tested, not their quality


@pytest.fixture(scope="module")
def si():
    files = demo_files()
    train = list(ntkal.io.read_structures(files["train"]))[:12]
    pool = list(ntkal.io.read_structures(files["pool"]))
    fz = ntkal.MACEFeaturizer(files["model"], kernel="joint", sketch_dim=K, force_probes=2, dtype=torch.float64)
    post = ntkal.fit(fz, train, train_force_probes=2)
    return {"files": files, "train": train, "pool": pool, "fz": fz, "post": post}


def _mace_calc(files):
    from mace.calculators import MACECalculator
    return MACECalculator(model_paths=str(files["model"]), device="cpu", default_dtype="float64")


@pytest.mark.parametrize("kernel,probes", [("energy", None), ("joint", 2), ("joint", None)])
def test_fast_path_outputs_leave_rows_unchanged(si, kernel, probes):
    """rows_and_outputs: the rows fz() gives (bit for bit on one structure) and the model's predictions."""
    fz = si["fz"].with_kernel(kernel, probes)
    atoms = si["pool"][3]
    for stress in (False, True):
        rows, out = rows_and_outputs(fz, [atoms], stress, vmap=False)
        assert torch.equal(rows.rows, fz([atoms]).rows)
        rows_vmapped, _ = rows_and_outputs(fz, [atoms], stress)  # the calculator's route: same rows to rounding
        torch.testing.assert_close(rows_vmapped.rows, rows.rows, rtol=1e-9, atol=1e-12)
        e, f = fz.predict([atoms])
        np.testing.assert_allclose(out["energy"].numpy(), e, rtol=1e-12)
        np.testing.assert_allclose(out["forces"].numpy(), f[0], atol=1e-10)
        assert (out["stress"] is not None) == stress


def test_one_step_vmaps_its_probes_only_when_differentiated_directly(si, monkeypatch):
    """A calculator step vmaps the probe double backwards on a CPU only for a small structure differentiated
    directly; it loops when layers keep their taps (mp0-medium: 2x faster, 40 % less memory) and for larger
    structures (1.1-1.5x faster from 26 atoms; fast.rows_and_outputs); the rows agree to rounding either way."""
    from ntkal.features import fast
    seen = []
    real = fast._double_backward
    monkeypatch.setattr(fast, "_double_backward", lambda *a: seen.append(a[-1]) or real(*a))
    atoms = si["pool"][3]
    direct = si["fz"].with_kernel("joint", 2)
    tapped = ntkal.MACEFeaturizer(si["files"]["model"], kernel="joint", sketch_dim=K, force_probes=2,
                                  dtype=torch.float64, route=fast.FastRoute(big_layer_numel=0))
    rows = {}
    for name, fz in (("direct", direct), ("tapped", tapped)):
        seen.clear()
        rows[name] = rows_and_outputs(fz, [atoms])[0].rows
        assert seen and all(b is (name == "direct") for b in seen), (name, seen)
    torch.testing.assert_close(rows["direct"], rows["tapped"], rtol=1e-9, atol=1e-12)
    big = atoms.repeat((2, 2, 2))
    assert len(atoms) <= fast.VMAP_MAX_ATOMS_CPU < len(big)
    seen.clear()
    rows_and_outputs(direct, [big])
    assert seen and not any(seen)


def test_calculator_equals_mace_and_error_scorer(si):
    calc = Calculator(si["fz"], si["post"], force_probes=2)
    ref = _mace_calc(si["files"])
    for atoms in (si["pool"][0], si["pool"][406]):
        a, b = atoms.copy(), atoms.copy()
        a.calc, b.calc = calc, ref
        assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), rel=1e-12, abs=1e-10)
        np.testing.assert_allclose(a.get_forces(), b.get_forces(), atol=1e-10)
        np.testing.assert_allclose(a.get_stress(), b.get_stress(), atol=1e-10)
        assert calc.get_property("free_energy", a) == a.get_potential_energy()
        scored = ErrorScorer(si["post"])(si["fz"].with_kernel("joint", 2)([atoms]))
        for key in ("energy_error", "force_error"):
            got = calc.get_property(f"ntkal_{key}", a)
            assert np.isfinite(got) and got > 0
            assert got == pytest.approx(float(scored.values[key][0]), rel=1e-9)
        assert calc.results["ntkal_error_age"] == 0


def test_exact_rows_give_atom_errors_and_no_stress_without_a_cell(si):
    calc = Calculator(si["fz"], si["post"], force_probes=None)
    mol = si["pool"][3].copy()
    mol.pbc, mol.cell = False, None
    mol.center(vacuum=3.0)
    mol.pbc = False
    mol.calc = calc
    atom_err = calc.get_property("ntkal_atom_force_error", mol)
    scored = ErrorScorer(si["post"])(si["fz"].with_kernel("joint", None)([mol]))
    np.testing.assert_allclose(atom_err, scored.atom_values["atom_force_error"][0], rtol=1e-9)
    assert atom_err.shape == (len(mol),) and np.isfinite(atom_err).all()
    assert "stress" not in calc.results
    ref = mol.copy()
    ref.calc = _mace_calc(si["files"])
    np.testing.assert_allclose(mol.get_forces(), ref.get_forces(), atol=1e-10)


def test_error_every_holds_the_values(si):
    calc = Calculator(si["fz"], si["post"], force_probes=2, error_every=3)
    atoms = si["pool"][0].copy()
    atoms.calc = calc
    seen, at_3 = [], None
    for step in range(5):
        atoms.positions[0, 0] += 0.02
        atoms.get_forces()
        seen.append((calc.results["ntkal_force_error"], calc.results["ntkal_error_age"]))
        at_3 = atoms.copy() if step == 3 else at_3
    assert [age for _, age in seen] == [0, 1, 2, 0, 1]
    assert seen[0][0] == seen[1][0] == seen[2][0] != seen[3][0] == seen[4][0]
    assert calc.n_evaluated == 2 and calc.n_calls == 5
    at_3.calc = Calculator(si["fz"], si["post"], force_probes=2)  # the held value is step 3's
    assert at_3.calc.get_property("ntkal_force_error", at_3) == pytest.approx(seen[4][0], rel=1e-12)


def test_calculator_refuses_a_posterior_without_residuals(si):
    post = ntkal.fit(si["fz"], [a.copy() for a in si["train"][:4]], score="pv", train_force_probes=2)
    post.residual = None
    with pytest.raises(NtkalError, match="no residual model"):
        Calculator(si["fz"], post)
    with pytest.raises(ntkal.InputError, match="error_every"):
        Calculator(si["fz"], si["post"], error_every=0)


# --- ntkal md / ntkal.md ------------------------------------------------------------------------------

def _start(si, tmp_path, periodic=True):
    start = si["pool"][3].copy()  # 4 Si atoms
    if not periodic:
        start.pbc = False
    path = tmp_path / ("start.extxyz" if periodic else "start_mol.extxyz")
    import ase.io
    ase.io.write(path, start)
    return path


def test_md_writes_a_pool_that_select_reads(si, tmp_path):
    import ase.io
    import json
    from ntkal.cli import main
    out = tmp_path / "pool.extxyz"
    body = ntkal.md(si["fz"], si["post"], [si["pool"][3], si["pool"][81]], out, steps=20, every=5, lower=0.0,
                    force_probes=2, seed=1, temperature=600.0)
    frames = ase.io.read(out, ":")
    assert body["frames_written"] == len(frames) == 2 * 5  # steps 0, 5, 10, 15, 20 of both trajectories
    assert [f.info["ntkal_md_step"] for f in frames[:5]] == [0, 5, 10, 15, 20]
    assert [f.info["ntkal_md_trajectory"] for f in frames] == [0] * 5 + [1] * 5
    for f in frames:
        assert np.isfinite(f.info["ntkal_force_error"]) and f.info["ntkal_force_error"] > 0
        assert "REF_energy" not in f.info and f.calc is None
    report = json.loads((tmp_path / "pool.extxyz.json").read_text())
    assert report["stops"] == {"steps": 2} and report["trajectories"][0]["visited"] == 21
    assert report["steps_per_s"] > 0 and (tmp_path / "pool.extxyz.png").stat().st_size > 0
    # the same seed gives the same trajectory; the run replaces its own outputs
    again = ntkal.md(si["fz"], si["post"], [si["pool"][3], si["pool"][81]], out, steps=20, every=5,
                     force_probes=2, seed=1, temperature=600.0)
    np.testing.assert_allclose(ase.io.read(out, ":")[4].positions, frames[4].positions, atol=1e-12)
    assert again["frames_written"] == 10
    train = tmp_path / "train.extxyz"
    ase.io.write(train, si["train"][:6])
    picks = tmp_path / "picks.extxyz"
    assert main(["select", "--model", str(si["files"]["model"]), "--train", str(train), "--pool", str(out),
                 "--budget", "2", "--kernel", "energy", "--sketch-dim", "16", "--no-progress",
                 "--out", str(picks)]) == 0
    assert len(ase.io.read(picks, ":")) == 2


def test_md_stops_at_upper(si, tmp_path):
    import ase.io
    out = tmp_path / "stop.extxyz"
    body = ntkal.md(si["fz"], si["post"], [si["pool"][3]], out, steps=20, lower=0.0, upper=1e-3, force_probes=2)
    frames = ase.io.read(out, ":")
    assert len(frames) == 1 and frames[0].info["ntkal_md_stop"] == "upper"
    assert body["trajectories"][0]["stop"] == "upper" and body["trajectories"][0]["stop_step"] == 0


@pytest.mark.parametrize("extra,needle", [
    (["--steps", "0"], "--steps"), (["--pressure", "1"], "--pressure needs --ensemble npt"),
    (["--upper", "-1"], "--upper"), (["--every", "x"], "--every"), (["--out", "pool.txt"], "--out"),
    (["--posterior", "missing.ntkal"], "--posterior"), (["--structures", "missing.extxyz"], "--structures"),
    (["--ensemble", "npt", "--structures", "MOL"], "npt needs a 3-D periodic cell"),
])
def test_md_refuses_bad_flags(si, tmp_path, capsys, extra, needle):
    from ntkal.cli import main
    start, mol = _start(si, tmp_path), _start(si, tmp_path, periodic=False)
    post = tmp_path / "state.ntkal"
    post.write_bytes(b"not yet read")  # the checks above come first
    args = {"--model": str(si["files"]["model"]), "--posterior": str(post), "--structures": str(start),
            "--out": str(tmp_path / "pool.extxyz")}
    rest = []
    for i in range(0, len(extra), 2):
        value = str(mol) if extra[i + 1] == "MOL" else extra[i + 1]
        value = str(tmp_path / value) if extra[i] in ("--out", "--posterior", "--structures") and "/" not in value else value
        if extra[i] in args:
            args[extra[i]] = value
        else:
            rest += [extra[i], value]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["md", *[x for kv in args.items() for x in kv], *rest, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_md_command_with_a_saved_posterior(si, tmp_path, capsys):
    import ase.io
    from ntkal.cli import main
    pytest.importorskip("ntkal.saved")
    state = tmp_path / "state.ntkal"
    ntkal.fit(si["files"]["model"], si["train"][:8], out=state, kernel="joint", sketch_dim=K, force_probes=2,
              train_force_probes=2)
    start = _start(si, tmp_path)
    out = tmp_path / "md_pool.extxyz"
    assert main(["md", "--model", str(si["files"]["model"]), "--posterior", str(state), "--structures", str(start),
                 "--out", str(out), "--steps", "6", "--every", "3", "--force-probes", "2", "--no-progress"]) == 0
    assert [f.info["ntkal_md_step"] for f in ase.io.read(out, ":")] == [0, 3, 6]
    assert "frames kept" in capsys.readouterr().out
    unlabelled = tmp_path / "pv.ntkal"
    ntkal.fit(si["files"]["model"], [a.copy() for a in si["train"][:4]], out=unlabelled, kernel="joint",
              sketch_dim=K, train_force_probes=2, score="pv")
    code = main(["md", "--model", str(si["files"]["model"]), "--posterior", str(unlabelled), "--structures",
                 str(start), "--out", str(tmp_path / "x.extxyz"), "--steps", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "residual model" in err, err
