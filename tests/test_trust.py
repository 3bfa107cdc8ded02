"""Trust nothing read back (issue 16): checkpoint parts and state carry content hashes and are redone when
they fail; inputs are fingerprinted by content; nothing in a checkpoint is unpickled; non-finite labels,
empty files and impossible budgets are refused before the model loads, in one line with exit 2."""
import gzip
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch

from ntkal.cli import main
from ntkal.runstate import state_from_bytes, state_to_bytes
from tiny import structures, tiny_mace

BIN = Path(sys.executable).parent
FAST = ["--sketch-dim", "16", "--no-progress"]


def labelled(n, seed):
    out = structures(n, seed=seed)
    rng = np.random.default_rng(seed)
    for a in out:
        a.info["REF_energy"] = float(rng.normal())
        a.arrays["REF_forces"] = rng.normal(size=(len(a), 3))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust")
    torch.save(tiny_mace(seed=61), d / "tiny.model")
    ase.io.write(d / "train.extxyz", labelled(4, seed=62))
    ase.io.write(d / "pool.extxyz", structures(40, seed=63))
    (d / "garbage.model").write_bytes(os.urandom(256))
    return d


def _args(files, out, *extra, pool=None, train=None, model=None):
    return ["--model", str(model or files / "tiny.model"), "--train", str(train or files / "train.extxyz"),
            "--pool", str(pool or files / "pool.extxyz"), "--out", str(out), *FAST, *extra]


def _refused(argv, capsys, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("ntkal: error:") and "Traceback" not in err, err
    for n in needles:
        assert str(n) in err, err
    return err


def _scores(path):
    return [(a.info["ntkal_pool_index"], a.info["ntkal_score"]) for a in ase.io.read(path, ":")]


def _killed_score_run(files, out, pool, min_parts=3):
    """Start `ntkal score` in a child, SIGKILL it once `min_parts` chunk parts are sealed; the checkpoint stays."""
    ck = out.with_name(out.name + ".ntkal-ckpt")
    argv = [str(BIN / "ntkal"), "score", *_args(files, out, "--chunk-size", "2", "--checkpoint-every", "0",
                                                   "--kernel", "energy", pool=pool)]
    child = subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    t0 = time.time()
    while len(list(ck.glob("part-*.sha256"))) < min_parts and child.poll() is None and time.time() - t0 < 300:
        time.sleep(0.02)
    assert child.poll() is None, "the run ended before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    parts = sorted(ck.glob("part-*.extxyz"))
    assert len(parts) >= min_parts
    return ck, parts


def test_edited_truncated_and_stale_checkpoint_parts_are_redone(files, tmp_path):
    pool = tmp_path / "pool.extxyz"
    ase.io.write(pool, structures(40, seed=64))
    ref = tmp_path / "ref.extxyz"
    assert main(["score", *_args(files, ref, "--chunk-size", "2", "--kernel", "energy", pool=pool)]) == 0
    out = tmp_path / "scored.extxyz"
    ck, parts = _killed_score_run(files, out, pool)
    edited = re.sub(r"ntkal_score=\S+", "ntkal_score=999.0", parts[0].read_text(), count=1)  # an edited score
    assert edited != parts[0].read_text()
    parts[0].write_text(edited)
    parts[1].write_text(parts[1].read_text()[:-40])
    assert main(["score", *_args(files, out, "--chunk-size", "2", "--kernel", "energy", pool=pool)]) == 0
    assert _scores(out) == _scores(ref) and len(_scores(out)) == 40 and not ck.exists()
    assert json.loads(out.with_name(out.name + ".json").read_text())["n_pool"] == 40

    # the pool edited in place with the same size and mtime: the old parts belong to another input
    out2 = tmp_path / "scored2.extxyz"
    ck, _ = _killed_score_run(files, out2, pool)
    st = pool.stat()
    edited = structures(40, seed=64)
    edited[0].positions[0, 0] += 0.01
    ase.io.write(pool, edited)
    text = pool.read_text()
    assert len(text.encode()) == st.st_size  # the same size (positions are fixed-width in extxyz)
    os.utime(pool, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert main(["score", *_args(files, out2, "--chunk-size", "2", "--kernel", "energy", pool=pool)]) == 0
    ref2 = tmp_path / "ref2.extxyz"
    assert main(["score", *_args(files, ref2, "--chunk-size", "2", "--kernel", "energy", pool=pool)]) == 0
    assert _scores(out2) == _scores(ref2) and _scores(out2) != _scores(ref)


class _Planted:
    """Unpickling this writes a marker file: proof that a checkpoint was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_a_planted_pickle_in_the_checkpoint_is_never_run(files, tmp_path):
    pool = tmp_path / "pool.extxyz"
    ase.io.write(pool, structures(40, seed=65))
    out = tmp_path / "scored.extxyz"
    ck, _ = _killed_score_run(files, out, pool)
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"posterior": _Planted(marker)})
    state = ck / "posterior.safetensors"
    assert state.exists()
    for f in (state, ck / "posterior.pt"):  # in place of the state (hash re-sealed), and under the old name
        f.write_bytes(payload)
        import hashlib
        f.with_name(f.name + ".sha256").write_text(hashlib.sha256(payload).hexdigest())
    assert main(["score", *_args(files, out, "--chunk-size", "2", "--kernel", "energy", pool=pool)]) == 0
    assert not marker.exists()
    assert len(_scores(out)) == 40


def test_state_round_trip_is_plain_data():
    g = torch.Generator().manual_seed(66)
    state = {"L": torch.randn(5, 5, dtype=torch.float64, generator=g), "n": 7, "x": [1.5, float("inf"), None],
             "arr": np.random.default_rng(66).normal(size=(3, 2)), "nested": {"name": "pv", "flag": True}}
    back = state_from_bytes(state_to_bytes(state))
    assert torch.equal(back["L"], state["L"]) and np.array_equal(back["arr"], state["arr"])
    assert back["x"][:1] == [1.5] and back["x"][1] == float("inf") and back["x"][2] is None
    assert back["nested"] == state["nested"] and back["n"] == 7
    with pytest.raises(TypeError):
        state_to_bytes({"obj": object()})
    with pytest.raises(ValueError):  # not a safetensors file: refused, never unpickled
        state_from_bytes(pickle.dumps({"a": 1}))


@pytest.mark.parametrize("key,value", [("REF_forces", np.inf), ("REF_forces", np.nan), ("REF_energy", np.nan)])
@pytest.mark.parametrize("flag", ["--train", "--pretrain"])
def test_non_finite_labels_are_refused_naming_file_structure_and_key(files, tmp_path, capsys, key, value, flag):
    bad = labelled(5, seed=67)
    if key == "REF_forces":
        bad[3].arrays[key][1, 2] = value
    else:
        bad[3].info[key] = value
    path = tmp_path / "bad.extxyz"
    ase.io.write(path, bad)
    argv = _args(files, tmp_path / "picks.extxyz", "--budget", "2", model=files / "garbage.model")
    if flag == "--train":
        argv[argv.index("--train") + 1] = str(path)
    else:
        argv += ["--pretrain", str(path)]
    # refused before the model is read: the model file here is garbage
    _refused(["select", *argv], capsys, flag, path, "structure 3", key)
    assert not (tmp_path / "picks.extxyz").exists()


def test_late_errors_come_before_the_model_loads(files, tmp_path, capsys):
    garbage = files / "garbage.model"
    _refused(["select", *_args(files, tmp_path / "p.extxyz", "--budget", "41", model=garbage)], capsys,
             "--budget 41", "40 structures")
    wrong = tmp_path / "wrong.extxyz"
    ase.io.write(wrong, structures(6, seed=68))
    lines = wrong.read_text().splitlines(keepends=True)
    first = structures(6, seed=68)
    lines[sum(len(a) + 2 for a in first[:4])] = f"{len(first[4]) + 3}\n"
    wrong.write_text("".join(lines))
    _refused(["select", *_args(files, tmp_path / "p.extxyz", "--budget", "2", model=garbage, pool=wrong)], capsys,
             "--pool", wrong, "structure 4")
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    _refused(["select", *_args(files, tmp_path / "p.extxyz", "--budget", "2", "--pretrain", str(empty),
                               model=garbage)], capsys, "--pretrain", "no structures")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.extxyz", "wrong.extxyz"]


def test_the_crashes_users_met_are_one_line_exit_2(files, tmp_path, capsys, monkeypatch):
    # a corrupted (not truncated) gzip
    raw = gzip.compress((files / "pool.extxyz").read_bytes())
    broken = bytearray(raw)
    broken[len(broken) // 2: len(broken) // 2 + 64] = os.urandom(64)
    gz = tmp_path / "pool.extxyz.gz"
    gz.write_bytes(bytes(broken))
    _refused(["select", *_args(files, tmp_path / "p.extxyz", "--budget", "2", pool=gz)], capsys, gz)
    # evaluate with too few validation structures: refused, no output folder
    valid = tmp_path / "valid.extxyz"
    ase.io.write(valid, labelled(2, seed=69))
    ev = tmp_path / "ev"
    _refused(["evaluate", "--model", str(files / "tiny.model"), "--train", str(files / "train.extxyz"),
              "--valid", str(valid), "--out", str(ev), *FAST], capsys, "--valid", "at least")
    assert not ev.exists()
    # an output folder nobody may write in (/sys refuses new files, also to root)
    _refused(["select", *_args(files, "/sys/picks.extxyz", "--budget", "2", model=files / "garbage.model")],
             capsys, "--out", "cannot write")
    # select without --out: <pool name>_selected.extxyz in the current folder
    monkeypatch.chdir(tmp_path)
    argv = _args(files, "x", "--budget", "2", "--kernel", "energy")
    del argv[argv.index("--out"):argv.index("--out") + 2]
    assert main(["select", *argv]) == 0
    assert len(ase.io.read(tmp_path / "pool_selected.extxyz", ":")) == 2


def test_temporaries_of_killed_runs_are_removed_and_nothing_else(files, tmp_path):
    out = tmp_path / "picks.extxyz"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".ntkal-tmp-{dead.pid}-abc123-picks.extxyz"
    live = tmp_path / f".ntkal-tmp-{os.getppid()}-def456-picks.extxyz"
    other = tmp_path / ".ntkal-tmp-notes-picks.extxyz"
    for f in (stale, live, other):
        f.write_text("partial")
    assert main(["select", *_args(files, out, "--budget", "2", "--kernel", "energy")]) == 0
    assert not stale.exists() and live.exists() and other.exists() and out.exists()


def test_the_python_api_refuses_non_finite_labels(files):
    import ntkal
    from ntkal.errors import InputError
    train = labelled(4, seed=70)
    train[2].arrays["REF_forces"][0, 0] = np.nan
    with pytest.raises(InputError, match=r"structure 2 \(0-based\).*REF_forces"):
        ntkal.select(files / "tiny.model", train=train, pool=structures(6, seed=71), budget=2, kernel="energy",
                     sketch_dim=16)
