"""`ntkal experiment`: metrics against a direct computation, reproducible selection, config errors,
pool-shift and committee bookkeeping, and the --quick study end to end (the CI smoke run)."""
import json

import numpy as np
import pytest
import torch
from ase import Atoms

from ntkal.cli import main
from ntkal.data import demo_files
from ntkal.experiment import acquisition, committee
from ntkal.experiment.config import ConfigError, PoolShiftConfig, SelectionConfig, config_from_dict, load_config
from ntkal.experiment.features import FeatureStore
from ntkal.experiment.finetune import build_args, foundation_e0s
from ntkal.experiment.metrics import errors, evaluate, load_model, predict
from ntkal.experiment.runner import initial_set, region_tests, shifted_pool
from ntkal.io import read_structures


@pytest.fixture(scope="module")
def si():
    files = demo_files()
    pool = list(read_structures(files["pool"]))[:14]
    train = list(read_structures(files["train"]))[:4]
    for i, a in enumerate(pool):
        a.info["exp_id"] = f"pool:{i}"
    for i, a in enumerate(train):
        a.info["exp_id"] = f"train:{i}"
    return files["model"], train, pool


# ------------------------------------------------------------------ metrics
def test_errors_equal_direct_numpy():
    rng = np.random.default_rng(0)
    natoms = np.array([2, 5, 3])
    ref_e, pred_e = rng.normal(size=3), rng.normal(size=3)
    ref_f = [rng.normal(size=(n, 3)) for n in natoms]
    pred_f = [rng.normal(size=(n, 3)) for n in natoms]
    got = errors(pred_e, ref_e, natoms, pred_f, ref_f)
    de = [(pred_e[i] - ref_e[i]) / natoms[i] for i in range(3)]
    df = [x for i in range(3) for x in (pred_f[i] - ref_f[i]).flatten()]
    assert got["e_mae"] == pytest.approx(1000 * sum(abs(x) for x in de) / 3, rel=1e-12)
    assert got["e_rmse"] == pytest.approx(1000 * (sum(x * x for x in de) / 3) ** 0.5, rel=1e-12)
    assert got["f_mae"] == pytest.approx(1000 * sum(abs(x) for x in df) / len(df), rel=1e-12)
    assert got["f_rmse"] == pytest.approx(1000 * (sum(x * x for x in df) / len(df)) ** 0.5, rel=1e-12)
    assert got["n_atoms"] == 10 and got["n_structures"] == 3


def test_evaluate_matches_ase_calculator(si):
    """Batched predictions equal mace's own ASE calculator, one structure at a time."""
    from mace.calculators import MACECalculator
    model_path, train, pool = si
    structures = pool[:5]
    model = load_model(model_path)
    e, f = predict(model, structures, batch_size=2)
    calc = MACECalculator(model_paths=str(model_path), device="cpu", default_dtype="float64")
    ref_e, ref_f = [], []
    for a in structures:
        b = a.copy()
        b.calc = calc
        ref_e.append(b.get_potential_energy())
        ref_f.append(b.get_forces())
    np.testing.assert_allclose(e, ref_e, rtol=1e-10, atol=1e-9)
    for x, y in zip(f, ref_f):
        np.testing.assert_allclose(x, y, atol=1e-9)
    got = evaluate(model, structures, batch_size=3)
    want = errors(np.array(ref_e), [a.info["REF_energy"] for a in structures], [len(a) for a in structures],
                  ref_f, [a.arrays["REF_forces"] for a in structures])
    for k in ("e_mae", "e_rmse", "f_mae", "f_rmse"):
        assert got[k] == pytest.approx(want[k], rel=1e-9)


# ------------------------------------------------------------------ selection is reproducible
SEL = SelectionConfig(sketch_dim=32, force_probes=2, target_shortlist=6)


@pytest.mark.parametrize("kernel,method", [("joint", "lcmd"), ("embedding", "lcmd"), ("energy", "top")])
def test_round_selection_reproduces_exactly(si, kernel, method):
    model_path, train, pool = si
    runs = [acquisition.feature_picks(FeatureStore(model_path, SEL), kernel, method, train, pool, 4, SEL, seed=3)
            for _ in range(2)]
    np.testing.assert_array_equal(runs[0].positions, runs[1].positions)
    assert len(set(runs[0].positions.tolist())) == 4
    assert runs[0].detail["scores"] == runs[1].detail["scores"]


def test_target_and_random_selection_reproduce(si):
    model_path, train, pool = si
    target, cand = pool[:3], pool[3:]
    a = acquisition.target_picks(FeatureStore(model_path, SEL), "energy", train, cand, target, 3, SEL)
    b = acquisition.target_picks(FeatureStore(model_path, SEL), "energy", train, cand, target, 3, SEL)
    np.testing.assert_array_equal(a.positions, b.positions)
    assert a.detail["target_variance_after"] < a.detail["target_variance_before"]
    r1 = acquisition.random_picks(20, 5, seed=1, round_index=0, key="x")
    r2 = acquisition.random_picks(20, 5, seed=1, round_index=0, key="x")
    r3 = acquisition.random_picks(20, 5, seed=2, round_index=0, key="x")
    np.testing.assert_array_equal(r1.positions, r2.positions)
    assert r1.positions.tolist() != r3.positions.tolist()


def test_committee_selection_reproduces_and_psi_norm_is_score(si, tmp_path):
    model_path, train, pool = si
    other = load_model(model_path)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in other.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    torch.save(other, tmp_path / "member1.model")
    members = [model_path, tmp_path / "member1.model"]
    a, info_a = committee.committee_select(members, train, pool, 3, seed=0)
    b, info_b = committee.committee_select(members, train, pool, 3, seed=0)
    np.testing.assert_array_equal(a, b)
    preds = committee.member_predictions(members, pool)
    score, psi = committee.scores_and_psi(preds, [len(x) for x in pool], info_a["scale_e"], info_a["scale_f"])
    np.testing.assert_allclose((psi ** 2).sum(1), score, rtol=1e-10)
    var_e, var_f, _, _ = committee.disagreement(preds, [len(x) for x in pool])
    e = np.stack([p[0] for p in preds], 1) / np.array([len(x) for x in pool])[:, None]
    np.testing.assert_allclose(var_e, e.var(axis=1), rtol=1e-10)
    i = 2
    f = np.stack([p[1][i] for p in preds])
    assert var_f[i] == pytest.approx(f.var(axis=0).mean(), rel=1e-10)


# ------------------------------------------------------------------ data bookkeeping
def _fake(n, region, start=0):
    out = []
    for i in range(n):
        a = Atoms("H", positions=[[0, 0, 0]])
        a.info.update(region=region, exp_id=f"pool:{start + i}")
        out.append(a)
    return out


def test_shifted_pool_fraction_and_disjoint_target_sample():
    class DS:
        name = "fake"
        pool_all = _fake(50, "base") + _fake(50, "target", 50)
    ps = PoolShiftConfig(dataset="fake", target_fraction=0.1, pool_size=40, target_size=7)
    pool, target, info = shifted_pool(DS, ps, seed=1)
    assert len(pool) == 40 and sum(a.info["region"] == "target" for a in pool) == 4
    assert len(target) == 7 and all(a.info["region"] == "target" for a in target)
    assert not {a.info["exp_id"] for a in target} & {a.info["exp_id"] for a in pool}
    again, _, _ = shifted_pool(DS, ps, seed=1)
    assert [a.info["exp_id"] for a in again] == [a.info["exp_id"] for a in pool]
    with pytest.raises(ConfigError, match="target-region"):
        shifted_pool(DS, PoolShiftConfig(dataset="fake", target_fraction=0.5, pool_size=100), seed=0)
    tests = region_tests({"test_id": _fake(3, "base") + _fake(2, "target")}, "region", "target")
    assert len(tests["test_id:target"]) == 2


def test_initial_set_is_seeded():
    class DS:
        train = _fake(30, "base")
    a, b, c = (initial_set(DS, 5, s) for s in (0, 0, 1))
    assert [x.info["exp_id"] for x in a] == [x.info["exp_id"] for x in b] != [x.info["exp_id"] for x in c]


def test_finetune_args_use_the_foundation_model(tmp_path):
    cfg = load_config().finetune
    e0s = foundation_e0s(demo_files()["model"])
    assert e0s.startswith("{14: -4.69")
    args = build_args(cfg, demo_files()["model"], tmp_path / "t.xyz", tmp_path / "v.xyz", tmp_path, 7, e0s)
    assert f"--foundation_model={demo_files()['model']}" in args
    assert f"--max_num_epochs={cfg.epochs}" in args and "--seed=7" in args
    from mace.tools import build_default_arg_parser
    parsed = build_default_arg_parser().parse_args(args)   # mace accepts every option
    assert parsed.foundation_model == str(demo_files()["model"]) and parsed.max_num_epochs == cfg.epochs


# ------------------------------------------------------------------ config validation
BASE = {"datasets": [{"name": "si"}]}


@pytest.mark.parametrize("change,message", [
    ({"methods": ["random", "bogus"]}, "unknown method 'bogus'"),
    ({"budget": 0}, "budget must be a positive integer"),
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"seeds": [1, 1]}, "repeated seeds"),
    ({"datasets": []}, "'datasets' must be a non-empty list"),
    ({"epochs": 3}, "unknown setting epochs"),
    ({"finetune": {"epoch": 3}}, "unknown setting finetune.epoch"),
    ({"finetune": {"lr": -1}}, "finetune.lr must be a positive number"),
    ({"selection": {"mode": "x"}}, "selection.mode"),
    ({"pool_shift": {"dataset": "t1x"}}, "pool_shift.dataset 't1x' is not one of the datasets"),
    ({"pool_shift": {"dataset": "si", "target_fraction": 1.5}}, "target_fraction"),
    ({"pool_shift": {"dataset": "si", "target_kernels": ["embedding"]}}, "target_kernels"),
    ({"datasets": [{"name": "si", "splits": {"pool": "pool"}}]}, "needs a 'train' split"),
])
def test_config_errors_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**BASE, **change})


def test_packaged_config_and_quick_overrides():
    full, quick = load_config(), load_config(quick=True)
    assert full.rounds >= 2 and len(full.pool_shift.seeds) >= 3 and set(full.methods) >= {"random", "committee", "joint"}
    assert quick.quick and quick.rounds == 1 and [d.name for d in quick.datasets] == ["si"]
    assert quick.finetune.lr == full.finetune.lr            # nested merge keeps what quick does not set


def test_cli_config_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [{name: si}]\nbudget: -2\n")
    assert main(["experiment", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "budget must be a positive integer" in err and "\n" not in err
    assert not (tmp_path / "o").exists()
    (tmp_path / "y.yaml").write_text("datasets: [\n")
    assert main(["experiment", str(tmp_path / "y.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


# ------------------------------------------------------------------ the CI smoke run
@pytest.mark.slow
def test_quick_study_end_to_end_and_resume(tmp_path):
    out = tmp_path / "exp"
    assert main(["experiment", "--quick", "--out", str(out)]) == 0
    text = (out / "results.md").read_text()
    for needle in ("si · test_id", "Pool shift", "paper's claims", "ntkal experiment --quick"):
        assert needle in text
    assert (out / "figures" / "si_learning_curves.png").stat().st_size > 1000
    cfg = load_config(quick=True)
    runs = {}
    for method in cfg.methods:
        run = json.loads((out / "results" / "si_natural" / "seed0" / f"{method}.json").read_text())
        assert run["done"] and [r["n_labels"] for r in run["rounds"]] == [6, 9]
        assert len(set(run["rounds"][0]["picks"])) == 3 and run["rounds"][0]["acquisition_s"] >= 0
        runs[method] = run
    shift = json.loads((out / "results" / "si_shift" / "seed0" / "joint+target.json").read_text())
    assert 0.0 <= shift["rounds"][0]["picks_target_fraction"] <= 1.0
    before = json.loads((out / "results" / "run.json").read_text())
    # a rerun resumes: nothing is fine-tuned again and the recorded picks stay
    assert main(["experiment", "--quick", "--out", str(out)]) == 0
    after = json.loads((out / "results" / "run.json").read_text())
    assert after["finetunes"] == 0 and len(after["invocations"]) == len(before["invocations"]) + 1
    for method, run in runs.items():
        again = json.loads((out / "results" / "si_natural" / "seed0" / f"{method}.json").read_text())
        assert again["rounds"][0]["picks"] == run["rounds"][0]["picks"]
