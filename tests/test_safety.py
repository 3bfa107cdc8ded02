"""Safe on disk, as a shell loop over ntkal would need it: bad options and inputs change nothing and exit 2
with one line naming the flag or file; files ntkal did not write are never replaced; two runs on one
--out never mix (one result consistent with its report, or a clear refusal)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms

from ntkal.cli import main
from tiny import structures, tiny_mace

BIN = Path(sys.executable).parent
FAST = ["--sketch-dim", "16", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    torch.save(tiny_mace(seed=51), d / "tiny.model")
    ase.io.write(d / "train.extxyz", structures(4, seed=52))
    ase.io.write(d / "pool.extxyz", structures(9, seed=53))
    return d


def _args(files, out, *extra, pool=None):
    return ["--model", str(files / "tiny.model"), "--train", str(files / "train.extxyz"),
            "--pool", str(pool or files / "pool.extxyz"), "--out", str(out), *FAST, *extra]


def _listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _refused(argv, folder, capsys, *needles):
    before = _listing(folder)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("ntkal: error:") and "Traceback" not in err, err
    for n in needles:
        assert str(n) in err, err
    assert _listing(folder) == before, "the output folder changed"
    return err


BAD_OPTIONS = [
    (["--sigma-e2", "-1"], "--sigma-e2"), (["--sigma-f2", "0"], "--sigma-f2"),
    (["--sketch-dim", "0"], "--sketch-dim"), (["--force-probes", "0"], "--force-probes"),
    (["--memory-gb", "-1"], "--memory-gb"), (["--chunk-size", "0"], "--chunk-size"),
    (["--budget", "0"], "--budget"), (["--shortlist", "1"], "--shortlist"), (["--threads", "0"], "--threads"),
    (["--checkpoint-every", "-5"], "--checkpoint-every"), (["--method", "greedy"], "--target"),
    (["--kernel", "nope"], "--kernel"), (["--sketch-dim", "x"], "--sketch-dim"),
]


@pytest.mark.parametrize("extra,flag", BAD_OPTIONS, ids=[f for _, f in BAD_OPTIONS])
def test_bad_option_exits_2_names_the_flag_and_writes_nothing(files, tmp_path, capsys, extra, flag):
    _refused(["select", *_args(files, tmp_path / "picks.extxyz", "--budget", "3", *extra)], tmp_path, capsys, flag)


def _bad_files(tmp_path, files):
    pool = structures(6, seed=54)
    wrong = tmp_path / "in" / "wrong_count.extxyz"
    wrong.parent.mkdir()
    ase.io.write(wrong, pool)
    lines = wrong.read_text().splitlines(keepends=True)
    start = sum(len(a) + 2 for a in pool[:3])
    lines[start] = f"{len(pool[3]) - 1}\n"
    wrong.write_text("".join(lines))
    fe = tmp_path / "in" / "fe.extxyz"
    ase.io.write(fe, structures(3, seed=55) + [Atoms("FeH", positions=[[0, 0, 0], [0, 0, 1.6]])])
    empty = tmp_path / "in" / "empty.extxyz"
    empty.write_text("")
    fake = tmp_path / "in" / "fake.model"
    torch.save({"weights": torch.ones(3)}, fake)
    return {"wrong": wrong, "fe": fe, "empty": empty, "fake": fake}


def test_bad_inputs_exit_2_and_leave_the_output_folder_as_it_was(files, tmp_path, capsys):
    bad = _bad_files(tmp_path, files)
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "notes.txt").write_text("keep me")
    out = outdir / "picks.extxyz"
    cases = [
        (_args(files, out, "--budget", "2", pool=bad["wrong"]), [bad["wrong"], "structure 3"]),
        (_args(files, out, "--budget", "2", pool=bad["fe"]), [bad["fe"], "structure 3", "Fe"]),
        (_args(files, out, "--budget", "2", pool=bad["empty"]), [bad["empty"], "empty"]),
        (_args(files, out, "--budget", "10"), ["budget 10", "9"]),
        (_args(files, out, "--budget", "2", pool=tmp_path / "nope.extxyz"), ["--pool", "no such file"]),
        (_args(files, outdir / "picks.json", "--budget", "2"), ["--out", "extxyz"]),
        (_args(files, tmp_path / "missing" / "p.extxyz", "--budget", "2"), ["--out", "does not exist"]),
        (_args(files, files / "pool.extxyz", "--budget", "2"), ["--out", "input"]),
        (_args(files, out, "--budget", "2", "--device", "cuda"), ["--device cuda"]) if not torch.cuda.is_available()
        else (_args(files, out, "--budget", "2", pool=bad["empty"]), ["empty"]),
    ]
    model_args = _args(files, out, "--budget", "2")
    model_args[model_args.index("--model") + 1] = str(bad["fake"])
    cases.append((model_args, [bad["fake"], "not a MACE model"]))
    for argv, needles in cases:
        _refused(["select", *argv], outdir, capsys, *needles)
    _refused(["score", *_args(files, outdir / "s.extxyz", pool=bad["wrong"])], outdir, capsys, "structure 3")


def test_files_ntkal_did_not_write_are_never_replaced(files, tmp_path, capsys):
    out = tmp_path / "picks.extxyz"
    for path, content in ((out, "my own structures\n"), (tmp_path / "picks.extxyz.json", '{"mine": 1}')):
        path.write_text(content)
        _refused(["select", *_args(files, out, "--budget", "2")], tmp_path, capsys, path.name, "did not write")
        assert path.read_text() == content
        path.unlink()
    ck = tmp_path / "picks.extxyz.ntkal-ckpt"
    ck.mkdir()
    (ck / "data.bin").write_bytes(b"mine")
    _refused(["select", *_args(files, out, "--budget", "2")], tmp_path, capsys, "checkpoint folder")
    assert (ck / "data.bin").read_bytes() == b"mine"
    ck.joinpath("data.bin").unlink()
    ck.rmdir()
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "scores.png").write_bytes(b"\x89PNG my plot")
    _refused(["demo", "--out", str(demo), "--budget", "2", "--no-progress"], demo, capsys, "scores.png")
    # what ntkal wrote itself it may replace: the same command twice succeeds, the unrelated neighbour stays
    (tmp_path / "picks.json").write_text('{"unrelated": true}')
    for _ in range(2):
        assert main(["select", *_args(files, out, "--budget", "2")]) == 0
    assert json.loads((tmp_path / "picks.json").read_text()) == {"unrelated": True}
    assert json.loads((tmp_path / "picks.extxyz.json").read_text())["written_by"].startswith("ntkal")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "picks.extxyz", "picks.extxyz.json", "picks.json"]


def test_report_names_cannot_collide(files, tmp_path):
    for name in ("round.1.extxyz", "round.2.extxyz", "other.v2.extxyz"):
        assert main(["select", *_args(files, tmp_path / name, "--budget", "2")]) == 0
    reports = {p.name: json.loads(p.read_text())["output"] for p in tmp_path.glob("*.json")}
    assert reports == {f"{n}.json": str(tmp_path / n) for n in ("round.1.extxyz", "round.2.extxyz", "other.v2.extxyz")}


def _scores(path):
    return [(a.info["ntkal_pool_index"], a.info["ntkal_score"]) for a in ase.io.read(path, ":")]


def test_two_runs_with_other_settings_on_one_out_never_mix(files, tmp_path):
    """B starts while A holds the output: B is refused with a clear message, A's output is complete and
    consistent with A's report; a run after A finished replaces A's output whole."""
    pool = tmp_path / "pool.extxyz"
    ase.io.write(pool, structures(40, seed=56))
    out = tmp_path / "scored.extxyz"
    ck = out.with_name(out.name + ".ntkal-ckpt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = _args(files, out, "--chunk-size", "2", "--checkpoint-every", "0", "--kernel", "energy", pool=pool)
    a = subprocess.Popen([str(BIN / "ntkal"), "score", *common, "--seed", "0"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not list(ck.glob("part-*")) and a.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    assert a.poll() is None, "run A ended before it could be raced"
    a.send_signal(signal.SIGSTOP)  # A holds the output while B starts, however fast A would have been
    try:
        b = subprocess.run([str(BIN / "ntkal"), "score", *common, "--seed", "1"], env=env, capture_output=True,
                           text=True, timeout=600)
    finally:
        a.send_signal(signal.SIGCONT)
    assert a.wait(timeout=600) == 0, a.stderr.read()
    assert b.returncode == 2 and "another ntkal run" in b.stderr and len(b.stderr.strip().splitlines()) == 1, b.stderr
    ref = tmp_path / "ref.extxyz"
    assert main(["score", *_args(files, ref, "--chunk-size", "2", "--seed", "0", "--kernel", "energy", pool=pool)]) == 0
    assert _scores(out) == _scores(ref) and len(_scores(out)) == 40
    report = json.loads(out.with_name(out.name + ".json").read_text())
    assert report["options"]["seed"] == 0 and report["n_pool"] == 40 and not ck.exists()
    assert main(["score", *_args(files, out, "--chunk-size", "2", "--seed", "1", "--kernel", "energy", pool=pool)]) == 0
    assert json.loads(out.with_name(out.name + ".json").read_text())["options"]["seed"] == 1
    assert _scores(out) != _scores(ref)
