"""The command line end to end on small files: outputs, report, and bad input (one line, nothing written)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms

from ntkal.cli import main
from tiny import structures, tiny_mace

FAST = ["--sketch-dim", "16", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.save(tiny_mace(seed=31), d / "tiny.model")
    rng = np.random.default_rng(0)
    train = structures(4, seed=32)
    for a in train:
        a.info["REF_energy"] = float(rng.normal())
        a.arrays["REF_forces"] = rng.normal(size=(len(a), 3))
        a.info["config_type"] = "train"
    pool = structures(9, seed=33)
    for i, a in enumerate(pool):
        a.info["REF_energy"] = float(rng.normal())
        a.arrays["REF_forces"] = rng.normal(size=(len(a), 3))
        a.info["config_type"] = f"pool{i}"
    ase.io.write(d / "train.extxyz", train)
    ase.io.write(d / "pool.extxyz", pool)
    return d


def _args(files, *extra):
    return ["--model", str(files / "tiny.model"), "--train", str(files / "train.extxyz"),
            "--pool", str(files / "pool.extxyz"), *FAST, *extra]


def test_select_writes_picks_that_mace_reads(files, tmp_path):
    out = tmp_path / "picked.extxyz"
    assert main(["select", *_args(files, "--budget", "3", "--out", str(out))]) == 0
    picks = ase.io.read(out, ":")
    pool = ase.io.read(files / "pool.extxyz", ":")
    assert [a.info["ntkal_rank"] for a in picks] == [0, 1, 2]
    for a in picks:
        src = pool[a.info["ntkal_pool_index"]]
        np.testing.assert_allclose(a.positions, src.positions)
        assert a.info["config_type"] == src.info["config_type"]
        assert a.info["REF_energy"] == pytest.approx(src.info["REF_energy"])
        np.testing.assert_allclose(a.arrays["REF_forces"], src.arrays["REF_forces"])
        assert a.info["ntkal_score"] > 0 and a.arrays["ntkal_atom_variance"].shape == (len(a),)
        assert a.calc is None  # no plain energy/forces keys were written
    assert "energy=" not in out.read_text().replace("REF_energy=", "")
    # what mace_run_train --train_file does with it
    from mace.data.utils import KeySpecification, load_from_xyz
    ks = KeySpecification.from_defaults()  # REF_energy, REF_forces, ... as mace_run_train's defaults
    _, configs = load_from_xyz(str(out), key_specification=ks)
    assert len(configs) == 3
    assert configs[0].properties["energy"] == pytest.approx(picks[0].info["REF_energy"])
    report = json.loads((tmp_path / "picked.extxyz.json").read_text())
    assert [s["pool_index"] for s in report["selected"]] == [a.info["ntkal_pool_index"] for a in picks]
    assert report["coverage"] == 1.0 and report["jitter"] == 0.0 and report["n_pool"] == 9
    assert {"torch", "mace-torch", "ase", "triton"} <= set(report["versions"])
    assert report["options"]["kernel"] == "joint" and report["timings_s"]["total"] > 0


def test_same_seed_same_selection(files, tmp_path):
    a, b = tmp_path / "a.extxyz", tmp_path / "b.extxyz"
    for out in (a, b):
        assert main(["select", *_args(files, "--budget", "4", "--force-probes", "2", "--out", str(out))]) == 0
    ia = [x.info["ntkal_pool_index"] for x in ase.io.read(a, ":")]
    assert ia == [x.info["ntkal_pool_index"] for x in ase.io.read(b, ":")]


def test_score_writes_every_pool_structure_in_order(files, tmp_path):
    out = tmp_path / "scored.extxyz"
    assert main(["score", *_args(files, "--kernel", "energy", "--out", str(out))]) == 0
    scored = ase.io.read(out, ":")
    assert [a.info["ntkal_pool_index"] for a in scored] == list(range(9))
    assert all(a.info["ntkal_score"] > 0 for a in scored)
    assert json.loads((tmp_path / "scored.extxyz.json").read_text())["n_pool"] == 9


def _bad(files, tmp_path, capsys, argv, *needles):
    out = tmp_path / "out.extxyz"
    code = main([*argv, "--out", str(out)] if "--out" not in argv else argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert str(n) in err, err
    assert not out.exists() and not (tmp_path / "out.extxyz.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ntkal-tmp")]
    return err


def _write(path, atoms_list):
    ase.io.write(path, atoms_list)
    return path


def test_unknown_element_names_file_and_index(files, tmp_path, capsys):
    pool = structures(3, seed=34) + [Atoms("FeH", positions=[[0, 0, 0], [0, 0, 1.6]])]
    bad = _write(tmp_path / "fe.extxyz", pool)
    args = _args(files, "--budget", "1")
    args[args.index("--pool") + 1] = str(bad)
    _bad(files, tmp_path, capsys, ["select", *args], bad, "structure 3", "Fe")


@pytest.mark.parametrize("what", ["nan", "coincide"])
def test_nan_or_coinciding_positions(files, tmp_path, capsys, what):
    a = structures(2, seed=35)
    p = a[1].positions.copy()
    if what == "nan":
        p[0, 0] = np.nan
    else:
        p[1] = p[0]
    a[1].positions = p
    bad = _write(tmp_path / f"{what}.extxyz", a)
    args = _args(files, "--budget", "1")
    args[args.index("--train") + 1] = str(bad)
    _bad(files, tmp_path, capsys, ["select", *args], bad, "structure 1")


def test_empty_pool_and_budget_larger_than_pool(files, tmp_path, capsys):
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    args = _args(files, "--budget", "1")
    args[args.index("--pool") + 1] = str(empty)
    _bad(files, tmp_path, capsys, ["select", *args], empty, "empty")
    _bad(files, tmp_path, capsys, ["select", *_args(files, "--budget", "10")], "pool.extxyz", "budget 10", "9")


def test_missing_malformed_and_not_a_model(files, tmp_path, capsys):
    args = _args(files, "--budget", "1")
    args[args.index("--pool") + 1] = str(tmp_path / "nope.extxyz")
    _bad(files, tmp_path, capsys, ["select", *args], "nope.extxyz", "no such")
    bad = tmp_path / "bad.extxyz"
    good = (files / "pool.extxyz").read_text().splitlines()
    n0 = int(good[0])
    bad.write_text("\n".join(good[: 2 + n0] + ["3", "comment", "Si 0 0"]) + "\n")
    args[args.index("--pool") + 1] = str(bad)
    _bad(files, tmp_path, capsys, ["select", *args], bad, "structure 1")
    fake = tmp_path / "fake.model"
    torch.save({"weights": torch.ones(3)}, fake)
    args = _args(files, "--budget", "1")
    args[args.index("--model") + 1] = str(fake)
    _bad(files, tmp_path, capsys, ["select", *args], fake, "not a MACE model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a pickle at all")
    args[args.index("--model") + 1] = str(junk)
    _bad(files, tmp_path, capsys, ["select", *args], junk, "not a MACE model")


def test_never_overwrites_an_input(files, tmp_path, capsys):
    before = (files / "pool.extxyz").read_bytes()
    code = main(["select", *_args(files, "--budget", "1", "--out", str(files / "pool.extxyz"))])
    err = capsys.readouterr().err
    assert code != 0 and "input" in err and "Traceback" not in err
    assert (files / "pool.extxyz").read_bytes() == before


def test_real_entry_point_prints_one_line_without_traceback(files, tmp_path):
    pool = _write(tmp_path / "fe.extxyz", [Atoms("Fe2", positions=[[0, 0, 0], [0, 0, 2.0]])])
    args = _args(files, "--budget", "1", "--out", str(tmp_path / "x.extxyz"))
    args[args.index("--pool") + 1] = str(pool)
    exe = Path(sys.executable).with_name("ntkal")
    r = subprocess.run([str(exe), "select", *args], capture_output=True, text=True)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.startswith("ntkal:")]
    assert len(lines) == 1 and "structure 0" in lines[0] and "Traceback" not in r.stderr
    help_text = subprocess.run([str(exe), "--help"], capture_output=True, text=True).stdout
    assert "select" in help_text and "demo" in help_text


def test_select_and_score_with_target(files, tmp_path):
    target = _write(tmp_path / "target.extxyz", structures(3, seed=36, kinds=("mol",)))
    out = tmp_path / "t.extxyz"
    assert main(["select", *_args(files, "--budget", "3", "--target", str(target), "--out", str(out))]) == 0
    picks = ase.io.read(out, ":")
    reds = [a.info["ntkal_target_reduction"] for a in picks]
    assert all(r > 0 for r in reds) and all(a.info["ntkal_score"] > 0 for a in picks)
    report = json.loads((tmp_path / "t.extxyz.json").read_text())
    assert report["method"] == "greedy"
    t = report["target"]
    assert t["variance_after"] == pytest.approx(t["variance_before"] - sum(reds), rel=1e-6)
    scored = tmp_path / "ts.extxyz"
    assert main(["score", *_args(files, "--target", str(target), "--out", str(scored))]) == 0
    assert all(a.info["ntkal_target_reduction"] >= 0 for a in ase.io.read(scored, ":"))


def test_demo_on_the_shipped_data(tmp_path, capsys):
    """`ntkal demo` end to end on the shipped model and Si data (energy kernel here; CI runs the default)."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--kernel", "energy", "--budget", "5", "--no-progress"]) == 0
    picks = ase.io.read(out / "selected.extxyz", ":")
    assert len(picks) == 5 and all(set(a.get_chemical_symbols()) == {"Si"} for a in picks)
    assert all("REF_energy" in a.info and "REF_forces" in a.arrays for a in picks)
    report = json.loads((out / "selected.extxyz.json").read_text())
    assert report["n_pool"] == 600 and report["n_train"] == 40
    assert (out / "scores.png").stat().st_size > 1000
    assert "picked 5 of 600" in capsys.readouterr().out


def test_multihead_model_end_to_end_with_head(files, tmp_path, capsys):
    """A model written by mace_run_train --multiheads_finetuning: --head picks the head (default: the
    fine-tuned one, not pt_head), the report names it, and an unknown head is a one-line error."""
    from bench.archs import multihead_model
    mh = multihead_model(tiny_mace(seed=37), tmp_path / "mh", head="target")
    assert set(mh.heads) == {"pt_head", "target"}
    args = _args(files, "--budget", "3", "--kernel", "energy")
    args[args.index("--model") + 1] = str(mh.path)
    scores = {}
    for head in (None, "target", "pt_head"):
        out = tmp_path / f"picks_{head}.extxyz"
        extra = [] if head is None else ["--head", head]
        assert main(["select", *args, *extra, "--out", str(out)]) == 0
        report = json.loads((tmp_path / f"{out.name}.json").read_text())
        assert report["featurizer"]["head"] == (head or "target")
        scores[head] = [a.info["ntkal_score"] for a in ase.io.read(out, ":")]
    assert scores[None] == scores["target"] and scores["pt_head"] != scores["target"]
    _bad(files, tmp_path, capsys, ["select", *args, "--head", "nope"], "--head", "nope", "pt_head")
