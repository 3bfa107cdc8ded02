"""Smoke tests of the benchmark package: every stage runs at a tiny size, so bench/ cannot rot.

No timing is checked (the numbers live in bench/RESULTS.md); only that each stage produces its record,
its table and sane fields. Triton is exercised only through the correctness gate (interpreter on CPU).
"""
import argparse
import json
import sys

import pytest
import torch

from bench import bench_end2end, bench_features, bench_kernels, bench_select, utils
from bench.__main__ import build_parser

from tiny import tiny_mace


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One torch thread here and in child processes: OpenMP barriers collapse on a shared, busy 2-core box."""
    old = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _args(mod, argv):
    p = argparse.ArgumentParser()
    mod.add_args(p)
    return p.parse_args(argv)


def test_cli_parses_every_stage():
    p = build_parser()
    for argv in (["select", "--n-train", "5000", "--skip-bmdal"], ["kernels", "--pool-size", "10"],
                 ["features", "--kernels", "embedding"], ["end2end", "--pool-size", "2000,20000"]):
        assert p.parse_args(argv).stage == argv[0]


def test_utils_child_rss_and_record(tmp_path):
    r = utils.run_child([sys.executable, "-c", "import json; print(json.dumps({'x': 1}))"])
    assert r["rc"] == 0 and utils.last_json_line(r["stdout"]) == {"x": 1}
    assert r["child_peak_rss_mib"] > 0
    doc = utils.record("t", ["t"], [{"a": 1.5, "b": None}])
    assert doc["machine"]["cores"] >= 1 and "torch" in doc["versions"]
    utils.write_json(tmp_path / "r.json", doc)
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["a"] == 1.5
    assert "| 1.5 | – |" in utils.markdown_table(doc["results"], ["a", "b"])


def test_child_peak_rss_is_the_childs_own():
    """A small child of a large parent reports its own peak (the forked copy before exec is not counted, nor the
    parent's earlier peak), and a child larger than the parent reports its peak."""
    freed = torch.ones(400 * 2**20 // 4)  # a 400 MiB peak of this process, returned before the children run
    del freed
    ballast = torch.ones(300 * 2**20 // 4)  # 300 MiB held by this process
    small = utils.run_child([sys.executable, "-c", "print(1)"])
    big = utils.run_child([sys.executable, "-c", "import numpy as np; x = np.ones(80 * 2**20); print(x.sum() > 0)"])
    assert float(ballast[0]) == 1.0
    assert small["child_peak_rss_mib"] < 100, small["child_peak_rss_mib"]
    assert 640 <= big["child_peak_rss_mib"] < 1000, big["child_peak_rss_mib"]


def test_select_cases_tiny():
    a = _args(bench_select, ["--pool-size", "3000", "--n-train", "200", "--sketch-dim", "32", "--budget", "10",
                             "--shortlist", "300", "--chunk", "1000", "--repeat", "1"])
    nt = bench_select.child_ntkal(a)
    assert len(nt["indices"]) == 10 and len(set(nt["shortlist_indices"])) == 300
    assert set(nt["indices"]) <= set(nt["shortlist_indices"])
    fl = bench_select.child_floor(a)
    assert fl["gflops"] > 0
    bm = None
    try:
        import bmdal_reg  # noqa: F401
        bm = bench_select.child_bmdal(a)
        assert len(bm["indices"]) == 10
    except ImportError:
        pass
    row = bench_select.summarise(200, nt, bm, fl)
    doc = utils.record("select", ["select"], [row], floor=fl, goals={"x": {"met": None, "target": "t"}},
                       settings={"pool_size": 3000, "sketch_dim": 32, "budget": 10, "shortlist": 300, "chunk": 1000})
    assert "n_train" in bench_select.table(doc)


def test_select_data_is_deterministic():
    a = bench_select.generate(100, 16, seed=1, families=range(8), n_clusters=8, chunk=30)
    b = bench_select.generate(100, 16, seed=1, families=range(8), n_clusters=8, chunk=30)
    assert torch.equal(a, b) and a.dtype == torch.float32


def test_kernels_stage_tiny_and_gate():
    a = _args(bench_kernels, ["--pool-size", "600", "--sketch-dim", "16", "--chunk", "300", "--repeat", "1"])
    doc = bench_kernels.run(a, ["kernels"])
    assert len(doc["results"]) == len(bench_kernels.cases(a))
    assert all(r["cpu_ref_ms"] > 0 for r in doc["results"])
    assert "tensor_sketch" in bench_kernels.table(doc)
    # the correctness gate that guards GPU timings, on tiny shapes (Triton interpreter on CPU)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for case in (bench_kernels.sketch_case(4, 8, 16, n_struct=2, rows_per=3),
                 bench_kernels.quadform_case(8, 16, 8, rows_per=2),
                 bench_kernels.lcmd_case(16, 16, "float32")):
        assert bench_kernels.gate(case, dev)["ok"]


def test_kernels_variants_are_gated_and_the_fastest_accurate_one_is_named():
    """segment_quadform's and tensor_sketch's timed variants (tiles, tf32x3) each pass the reference gate before
    timing; a failing variant is recorded, not raised; the named fastest excludes variants below fp32 accuracy."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    case = bench_kernels.quadform_case(24, 16, 12, rows_per=3)
    case["variants"]["broken"] = lambda t: 1 / 0
    timed = bench_kernels.time_variants(case, case["make"](dev), lambda fn: (fn(), {"median_ms": 1.0})[1])
    assert set(timed) == set(bench_kernels.VARIANTS) | {"broken"}
    assert timed["broken"]["error"].startswith("ZeroDivisionError")
    ok = {n: v for n, v in timed.items() if n != "broken"}
    assert all(v["rel_err"] < 1e-5 and v["median_ms"] == 1.0 for v in ok.values())
    sketch = bench_kernels.sketch_case(4, 8, 16, n_struct=2, rows_per=3, two_term=True)
    timed = bench_kernels.time_variants(sketch, sketch["make"](dev), lambda fn: (fn(), {"median_ms": 1.0})[1])
    assert set(timed) == set(bench_kernels.SKETCH_VARIANTS) and all(v["rel_err"] < 1e-5 for v in timed.values())
    fake = {"fast but coarse": {"rel_err": 1e-3, "median_ms": 0.1}, "slow": {"rel_err": 1e-7, "median_ms": 2.0},
            "fast": {"rel_err": 1e-7, "median_ms": 1.0}, "failed": {"error": "x"}}
    assert bench_kernels.fastest_accurate(fake)[0] == "fast"


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory):
    from ntkal.data import demo_files
    shipped = demo_files()["model"]
    if shipped.exists():  # loading the shipped model is cheaper than building a tiny one
        return str(shipped)
    path = tmp_path_factory.mktemp("m") / "tiny.model"
    torch.save(tiny_mace(dtype=torch.float32), path)
    return str(path)


def test_features_stage_tiny(tiny_model_file):
    a = _args(bench_features, ["--model", tiny_model_file, "--n-structures", "2", "--batch", "2", "--sketch-dim", "16",
                               "--kernels", "energy,force probes", "--probes", "1", "--min-time", "0"])
    doc = bench_features.run(a, ["features"])
    rows = {(r["impl"], r["kernel"]): r for r in doc["results"]}
    assert rows[("reference", "force probes (m=1)")]["rows_per_struct"] == 1
    fast = rows[("fast", "force probes (m=1)")]
    assert fast["rows_per_struct"] == 1 and fast["speedup_vs_reference"] > 0
    assert rows[("fast", "energy")]["coverage"] >= 0.95
    assert rows[("-", "floor: model energy+forces")]["structures_per_s"] > 0
    assert "structures/s" in bench_features.table(doc)


def test_end2end_pool_and_score(tiny_model_file, tmp_path):
    from ntkal.io import read_structures
    pool = bench_end2end.make_pool(tmp_path / "p.extxyz", 4)
    got = list(read_structures(pool))
    assert len(got) == 4 and all(x.pbc.all() for x in got)
    a = _args(bench_end2end, ["--pool-size", "3", "--model", tiny_model_file, "--workdir", str(tmp_path),
                              "--sketch-dim", "16"])
    doc = bench_end2end.run(a, ["end2end"])
    row = doc["results"][0]
    assert row["rc"] == 0, row.get("error")
    assert row["n_scored"] == 3 and row["peak_rss_mib"] > 0
    assert "peak RSS" in bench_end2end.table(doc)


def test_calibration_stage_says_where_the_line_extrapolates():
    """bench calibration --quick: beside the metrics, each energy/force record carries the calibration line,
    the raw predictions it was fitted on (sorted quantiles) and how much of the split lies beyond them."""
    from bench import bench_calibration
    a = _args(bench_calibration, ["--quick"])
    doc = bench_calibration.run(a, ["calibration", "--quick"])
    parts = [r for r in doc["results"] if r["part"] in ("energy", "force")]
    assert {(r["split"], r["pretrain"]) for r in parts} == {(s, p) for s in ("test_id", "test_ood") for p in (False, True)}
    for r in parts:
        q = r["calib_raw_q_mev"]
        assert len(r["line"]) == 2 and 0.25 <= r["line"][1] <= 4.0
        assert len(q) == 5 and all(x <= y for x, y in zip(q, q[1:])) and q[0] > 0
        assert 0.0 <= r["share_beyond_calib_max"] <= 1.0 and r["raw_median_mev"] > 0 and r["median_real_over_raw"] > 0
    assert "beyond fitted max" in bench_calibration.table(doc)
