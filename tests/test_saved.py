"""A saved posterior (docs/design.md, "Saved posterior"): `ntkal fit --out state.ntkal`, then score/select/evaluate
--posterior score exactly as a refit; a state of another model, kernel or sketch, or a cut or edited file, is
refused with one line (exit 2); loading never unpickles."""
import contextlib
import io
import json
import pickle
import shutil

import ase.io
import numpy as np
import pytest
import torch

import ntkal
from ntkal import saved as sv
from ntkal.cli import main
from ntkal.data import dataset_files, demo_files
from ntkal.errors import InputError
from ntkal.io import read_structures

FILES = demo_files()
MODEL = str(FILES["model"])
FEATURES = ["--kernel", "energy", "--sketch-dim", "64", "--no-progress"]
JOINT = dict(kernel="joint", sketch_dim=64, force_probes=2, train_force_probes=2)


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """Small Si subsets, a copy of the model with one weight changed, and a state from `ntkal fit` (energy NTK)."""
    d = tmp_path_factory.mktemp("saved")
    ase.io.write(d / "train.extxyz", list(read_structures(FILES["train"]))[:6])
    ase.io.write(d / "pool.extxyz", list(read_structures(FILES["pool"]))[:8])
    ase.io.write(d / "valid.extxyz", list(read_structures(dataset_files("si")["test_id"]))[:3])
    model = torch.load(MODEL, weights_only=False)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    torch.save(model, d / "foreign.model")
    with contextlib.redirect_stdout(io.StringIO()) as said:
        assert main(["fit", "--model", MODEL, "--train", str(d / "train.extxyz"), *FEATURES,
                     "--out", str(d / "state.ntkal")]) == 0
    (d / "fit.txt").write_text(said.getvalue())
    return d


def _scores(path):
    return np.array([[a.info.get(k, np.nan) for k in ("ntkal_score", "ntkal_energy_error")]
                     for a in ase.io.read(path, ":")])


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("ntkal: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_cli_fit_then_score_with_the_posterior_equals_a_refit(d, capsys, monkeypatch):
    out = (d / "fit.txt").read_text()
    assert "ntkal fit: posterior of 6 labelled structures" in out and "kernel energy" in out and "score error" in out
    assert "calibration: " in out and "cross-fitted" in out
    pool, state = str(d / "pool.extxyz"), str(d / "state.ntkal")
    fingerprinted = []
    import ntkal.runstate
    real = ntkal.runstate.file_fingerprint
    monkeypatch.setattr(ntkal.runstate, "file_fingerprint", lambda p: fingerprinted.append(str(p)) or real(p))
    assert main(["score", "--model", MODEL, "--posterior", state, "--pool", pool, "--out", str(d / "a.extxyz"),
                 "--no-progress"]) == 0
    assert state in fingerprinted  # the checkpoint's run key holds the posterior's content hash
    assert main(["score", "--model", MODEL, "--train", str(d / "train.extxyz"), "--pool", pool, *FEATURES,
                 "--out", str(d / "b.extxyz")]) == 0
    a, b = _scores(d / "a.extxyz"), _scores(d / "b.extxyz")
    assert a.shape == (8, 2) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)
    report = json.loads((d / "a.extxyz.json").read_text())
    assert report["inputs"]["posterior"] == state and "train" not in report["inputs"]
    assert report["featurizer"]["kernel"] == "energy" and report["featurizer"]["sketch_dim"] == 64
    # select with the posterior; evaluate with it evaluates only its kernel
    assert main(["select", "--model", MODEL, "--posterior", state, "--pool", pool, "--budget", "2",
                 "--out", str(d / "picks.extxyz"), "--no-progress"]) == 0
    assert len(ase.io.read(d / "picks.extxyz", ":")) == 2
    assert main(["evaluate", "--model", MODEL, "--posterior", state, "--valid", str(d / "valid.extxyz"),
                 "--out", str(d / "ev"), "--no-progress"]) == 0
    assert list(json.loads((d / "ev" / "evaluate.json").read_text())["results"]) == ["energy"]


def test_python_fit_out_round_trips_and_scores_as_the_fitted_posterior(d, tmp_path):
    train, pool = str(d / "train.extxyz"), list(read_structures(d / "pool.extxyz"))
    path = tmp_path / "joint.ntkal"
    post = ntkal.fit(MODEL, train, out=path, **JOINT)
    saved = ntkal.load_posterior(path, MODEL)
    assert isinstance(saved, ntkal.SavedPosterior) and saved.score == "error"
    assert saved.features == {"kernel": "joint", "sketch_dim": 64, "params": "all", "seed": 0, "head": "Default",
                              "dtype": "float32"}
    assert saved.model_hash == sv.model_hash(MODEL) == sv.model_hash(torch.load(MODEL, weights_only=False))
    assert saved.provenance["inputs"]["train"]["sha256"] and saved.provenance["ntkal"] == ntkal.__version__
    assert sv.digest(saved.to_state()) == sv.digest(sv.SavedPosterior.from_state(saved.to_state()).to_state())
    fz = sv.featurizer(saved, MODEL, force_probes=2)
    rows = fz(pool)
    for with_mean in (True, False):
        a, b = post.predictive(rows, with_mean), saved.posterior.predictive(rows, with_mean)
        for name in ("mu", "epistemic", "noise", "score"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-12, atol=0)
    refit = list(ntkal.score(MODEL, train, pool, **JOINT))
    loaded = list(ntkal.score(MODEL, pool=pool, posterior=path, force_probes=2))
    for x, y in zip(refit, loaded, strict=True):
        for key in ("ntkal_score", "ntkal_energy_error", "ntkal_force_error"):
            assert y.info[key] == pytest.approx(x.info[key], rel=1e-12, abs=0)
    picks = ntkal.select(MODEL, pool=pool, budget=3, posterior=saved, force_probes=2)
    assert len(picks.indices) == 3 and picks.posterior is saved.posterior


def test_another_model_kernel_or_sketch_is_refused_in_one_line(d, tmp_path, capsys):
    state, pool, out = str(d / "state.ntkal"), str(d / "pool.extxyz"), tmp_path / "x.extxyz"
    base = ["score", "--posterior", state, "--pool", pool, "--out", str(out), "--no-progress"]
    assert main([*base, "--model", str(d / "foreign.model")]) == 2
    _one_line_error(capsys, "--posterior", "made for another model")
    for flag, value in (("--kernel", "joint"), ("--sketch-dim", "128"), ("--params", "readout"), ("--seed", "1")):
        assert main([*base, "--model", MODEL, flag, value]) == 2
        _one_line_error(capsys, f"{flag} {value}", f"fitted with {flag}")
    assert main([*base, "--model", MODEL, "--kernel", "energy", "--sketch-dim", "64", "--score", "pv"]) == 0  # same values
    assert not list(tmp_path.glob("*.ntkal-ckpt"))
    with pytest.raises(InputError, match="made for another model"):
        sv.load(state, model=d / "foreign.model")
    with pytest.raises(InputError, match="--kernel joint"):
        sv.load(state, kernel="joint")
    saved = sv.load(state, model=MODEL, kernel="energy", sketch_dim=64)
    with pytest.raises(InputError, match="--sketch-dim 128"):
        sv.featurizer(saved, MODEL, sketch_dim=128)
    with pytest.raises(InputError, match="--kernel joint"):
        list(ntkal.score(MODEL, pool=pool, posterior=saved, kernel="joint"))
    from ntkal.acquisition.pipeline import Pipeline
    from ntkal.options import Options
    fz = ntkal.MACEFeaturizer(MODEL, kernel="energy", sketch_dim=32)
    with pytest.raises(InputError, match="--sketch-dim 32"):
        Pipeline(Options(), fz).use(saved)


@pytest.mark.parametrize("damage", ["cut_header", "cut_tensors", "edit_tensor", "edit_value", "not_state", "empty"])
def test_a_cut_or_edited_state_is_one_line_and_nothing_is_written(d, tmp_path, capsys, damage):
    data = (d / "state.ntkal").read_bytes()
    n = int.from_bytes(data[:8], "little")
    bad = tmp_path / "bad.ntkal"
    if damage == "cut_header":
        bad.write_bytes(data[:n // 2])
    elif damage == "cut_tensors":
        bad.write_bytes(data[:-100])
    elif damage == "edit_tensor":
        bad.write_bytes(data[:-50] + bytes([data[-50] ^ 1]) + data[-49:])
    elif damage == "edit_value":  # a number in the JSON metadata (sigma_e2 0.01 -> 0.02): still readable
        at = data.index(b"sigma_e2", 8)
        at = data.index(b"0.01", at)
        bad.write_bytes(data[:at] + b"0.02" + data[at + 4:])
    elif damage == "not_state":
        shutil.copy(d / "pool.extxyz", bad)
    else:
        bad.write_bytes(b"")
    out = tmp_path / "x.extxyz"
    assert main(["score", "--model", MODEL, "--posterior", str(bad), "--pool", str(d / "pool.extxyz"),
                 "--out", str(out), "--no-progress"]) == 2
    _one_line_error(capsys, f"--posterior {bad}", "corrupted" if damage.startswith("edit") else "not a saved posterior")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ntkal"]
    with pytest.raises(InputError):
        ntkal.load_posterior(bad)


def test_loading_never_unpickles(d, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a saved posterior must load without unpickling")
    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(mod, name, refuse)
    saved = sv.load(d / "state.ntkal")
    assert saved.features["kernel"] == "energy" and saved.posterior.L.dtype == torch.float64
    assert b"\x80\x04\x95" not in (d / "state.ntkal").read_bytes()[:64]  # no pickle protocol header


def test_usage_errors_and_outputs(d, tmp_path, capsys):
    state, pool, train = str(d / "state.ntkal"), str(d / "pool.extxyz"), str(d / "train.extxyz")
    out = str(tmp_path / "x.extxyz")
    assert main(["score", "--model", MODEL, "--posterior", state, "--train", train, "--pool", pool, "--out", out]) == 2
    _one_line_error(capsys, "--posterior and --train cannot be given together")
    assert main(["select", "--model", MODEL, "--pool", pool, "--out", out]) == 2
    _one_line_error(capsys, "one of --train or --posterior is required")
    assert main(["fit", "--model", MODEL, "--train", train, "--out", str(tmp_path / "s.extxyz")]) == 2
    _one_line_error(capsys, ".ntkal")
    theirs = tmp_path / "theirs.ntkal"
    theirs.write_bytes(b"someone else's file")
    assert main(["fit", "--model", MODEL, "--train", train, "--out", str(theirs)]) == 2
    _one_line_error(capsys, "ntkal did not write")
    assert theirs.read_bytes() == b"someone else's file"
    with pytest.raises(InputError, match="not both"):
        ntkal.select(MODEL, train, pool, budget=2, posterior=state)
    saved = sv.load(state)
    mine = tmp_path / "mine.ntkal"
    for _ in range(2):  # ntkal replaces a state it wrote
        sv.save(mine, saved)
    assert sv.load(mine).model_hash == saved.model_hash
    with pytest.raises(InputError, match="ntkal did not write"):
        sv.save(theirs, saved)
