"""The study (`python -m study`): metrics against a direct computation, the statistics against scipy,
reproducible selection, scenario / shard / replay bookkeeping, the fine-tune options mace accepts, config
errors, the config's claims judged on known records, and the --quick study end to end (curves, two shards,
resume, report-only) — the CI smoke run."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from ase import Atoms
from scipy.stats import spearmanr

from ntkal.data import demo_files
from study import acquisition, claims, committee, rails, report, stats
from study.__main__ import main as study_main
from study.claims import Claim
from study.config import ConfigError, ScenarioConfig, SelectionConfig, config_from_dict, load_config
from study.datasets import Dataset
from study.records import Records
from study.features import FeatureStore
from study.finetune import build_args, foundation_e0s, replay_foundation
from study.metrics import errors, evaluate_splits, predictor
from study.runner import (Cell, biased_pool, cheap_metrics, finetune_count, initial_set, parse_shard,
                          region_tests, shard_cells)
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


def test_predictions_match_ase_calculator_and_splits_share_predictions(si):
    """Batched predictions equal mace's own ASE calculator; evaluate_splits equals one split at a time."""
    from mace.calculators import MACECalculator
    model_path, train, pool = si
    structures = pool[:5]
    e, f = predictor(model_path, batch_size=2).predict(structures)
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
    model = predictor(model_path, batch_size=3)
    got = evaluate_splits(model, {"all": structures})["all"]
    want = errors(np.array(ref_e), [a.info["REF_energy"] for a in structures], [len(a) for a in structures],
                  ref_f, [a.arrays["REF_forces"] for a in structures])
    for k in ("e_mae", "e_rmse", "f_mae", "f_rmse"):
        assert got[k] == pytest.approx(want[k], rel=1e-9)
    splits = {"test_id": pool[:6], "test_id:sub": [pool[4], pool[1]], "other": pool[6:9]}
    both = evaluate_splits(model, splits)
    for name, items in splits.items():
        alone = evaluate_splits(model, {name: items})[name]
        for k in ("e_mae", "f_rmse"):
            assert both[name][k] == pytest.approx(alone[k], rel=1e-10)


# ------------------------------------------------------------------ statistics against scipy
def test_t_interval_and_paired_difference_match_scipy():
    from scipy import stats as sps
    rng = np.random.default_rng(1)
    a, b = rng.normal(3.0, 1.0, size=5), rng.normal(2.5, 1.0, size=5)
    ti = stats.t_interval(a)
    lo, hi = sps.t.interval(0.95, len(a) - 1, loc=a.mean(), scale=sps.sem(a))
    assert (ti["lo"], ti["hi"]) == pytest.approx((lo, hi), rel=1e-12)
    d = stats.paired_difference(dict(enumerate(a)), dict(enumerate(b)))
    ci = sps.ttest_rel(a, b).confidence_interval(0.95)
    assert (d["lo"], d["hi"]) == pytest.approx((ci.low, ci.high), rel=1e-12)
    assert d["mean"] == pytest.approx(float(np.mean(a - b)), rel=1e-12) and d["n"] == 5
    assert stats.resolved({"lo": -2.0, "hi": -0.1}) == -1 and stats.resolved({"lo": 0.1, "hi": 2.0}) == 1
    assert stats.resolved({"lo": -1.0, "hi": 1.0}) is None
    assert math.isnan(stats.t_interval([1.0])["lo"])
    only = stats.paired_difference({0: 1.0, 1: 2.0, 2: 4.0}, {1: 1.0, 2: 1.0, 3: 9.0})
    assert only["seeds"] == [1, 2] and only["mean"] == pytest.approx(2.0)


def test_variance_ratio_matches_scipy():
    from scipy import stats as sps
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 2.0, size=6), rng.normal(0, 1.0, size=4)
    vr = stats.variance_ratio(a, b)
    r = a.var(ddof=1) / b.var(ddof=1)
    assert vr["ratio"] == pytest.approx(r, rel=1e-12)
    assert vr["lo"] == pytest.approx(r / sps.f.ppf(0.975, 5, 3), rel=1e-12)
    assert vr["hi"] == pytest.approx(r / sps.f.ppf(0.025, 5, 3), rel=1e-12)


def test_labels_to_reach_interpolates_and_says_not_reached():
    ns, errs = [10, 25, 40, 55], [100.0, 80.0, 70.0, 65.0]
    assert stats.labels_to_reach(ns, errs, 75.0) == pytest.approx(32.5)
    assert stats.labels_to_reach(ns, errs, 100.0) == 10.0
    assert stats.labels_to_reach(ns, errs, 60.0) is None
    assert stats.labels_to_reach(list(reversed(ns)), list(reversed(errs)), 80.0) == pytest.approx(25.0)


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


def test_labelled_rows_exact_or_as_the_pool_s(si):
    """selection.labelled_force_rows "pool" gives the labelled set the pool's probe rows; "~exact" methods
    (pool_rows="exact") use exact rows for both, as `ntkal select` ships."""
    model_path, train, pool = si
    store = FeatureStore(model_path, SEL)
    cheap = dataclasses.replace(SEL, labelled_force_rows="pool")
    a = acquisition.feature_picks(store, "joint", "lcmd", train, pool, 3, cheap, seed=1, score="error")
    b = acquisition.feature_picks(store, "joint", "lcmd", train, pool, 3, cheap, seed=1, score="error",
                                  pool_rows="exact")
    assert a.detail["labelled_force_rows"] == "as the pool's" and a.detail["pool_force_rows"] == "2 probes"
    assert b.detail["labelled_force_rows"] == "exact" and b.detail["pool_force_rows"] == "exact"
    n = sum(len(x) for x in train)
    assert store.rows("joint", train)[0].rows.shape[0] == len(train) * (1 + 2)          # energy + 2 probe rows
    assert store.rows("joint", train, exact=True)[0].rows.shape[0] == len(train) + 3 * n  # energy + 3N rows


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
    other = predictor(model_path).model
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


# ------------------------------------------------------------------ scenarios, splits, shards
def _fake(n, region, split="pool", start=0):
    out = []
    for i in range(n):
        a = Atoms("H", positions=[[0, 0, 0]])
        a.info.update(region=region, exp_id=f"{split}:{start + i}")
        out.append(a)
    return out


def _fake_dataset():
    from study.config import Region
    pool_all = _fake(60, "base") + _fake(60, "target", start=60)
    ds = Dataset(name="fake", model=None, pool_all=pool_all, pool=pool_all[::2], region=Region("region", ["target"]),
                 train=_fake(6, "base", "train") + _fake(8, "target", "train", 6),
                 pretrain=_fake(40, "base", "pretrain"))
    return ds


def test_biased_pool_fraction_disjoint_draws_and_errors():
    ds = _fake_dataset()
    scen = ScenarioConfig("biased", pool_size=25, pretrain_fraction=0.8)
    pool, info = biased_pool(ds, scen, seed=1, pretrain_rest=[], biased_source="pool")
    ids = [a.info["exp_id"] for a in pool]
    assert len(pool) == 25 == len(set(ids)) and sum(ds.is_target(a) for a in pool) == 5
    assert set(ids) <= {a.info["exp_id"] for a in ds.pool}               # features shared with the natural pool
    again, _ = biased_pool(ds, scen, seed=1, pretrain_rest=[], biased_source="pool")
    other, _ = biased_pool(ds, scen, seed=2, pretrain_rest=[], biased_source="pool")
    assert [a.info["exp_id"] for a in again] == ids != [a.info["exp_id"] for a in other]
    replay, rvalid, rest = ds.replay_split(10, 3)
    pool_p, info_p = biased_pool(ds, scen, seed=1, pretrain_rest=rest, biased_source="pretrain")
    taken = {a.info["exp_id"] for a in pool_p}
    assert sum(a.info["exp_id"].startswith("pretrain:") for a in pool_p) == 20
    assert not taken & {a.info["exp_id"] for a in replay + rvalid}
    with pytest.raises(ConfigError, match="target-region"):
        biased_pool(ds, ScenarioConfig("biased", pool_size=200, pretrain_fraction=0.5), 0, [], "pool")


def test_replay_held_out_and_initial_sets_are_disjoint_and_seeded():
    ds = _fake_dataset()
    r1, v1, rest1 = ds.replay_split(10, 3)
    r2, _, _ = ds.replay_split(10, 3)
    assert [a.info["exp_id"] for a in r1] == [a.info["exp_id"] for a in r2]
    assert len({a.info["exp_id"] for a in r1 + v1 + rest1}) == 40
    held = ds.held_out_targets()
    assert held and all(ds.is_target(a) for a in held)
    assert not {a.info["exp_id"] for a in held} & {a.info["exp_id"] for a in ds.pool}
    a, b, c = (initial_set(ds, 5, s) for s in (0, 0, 1))
    assert all(ds.is_target(x) for x in a)
    assert [x.info["exp_id"] for x in a] == [x.info["exp_id"] for x in b] != [x.info["exp_id"] for x in c]
    tests = region_tests(ds, {"test_id": _fake(3, "base", "test_id") + _fake(2, "target", "test_id", 3),
                              "test_ood": _fake(2, "target", "test_ood")})
    assert len(tests["test_id:target"]) == 2 and "test_ood:target" not in tests


def test_shards_partition_the_cells_in_contiguous_blocks():
    cells = [Cell(d, s, seed) for d in ("a", "b", "c") for s in ("natural", "biased") for seed in (0, 1, 2)]
    for n in (1, 2, 3, 4):
        parts = [shard_cells(cells, i, n) for i in range(n)]
        assert [c for p in parts for c in p] == cells
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parse_shard("1/2") == (1, 2) and parse_shard(None) == (0, 1)
    for bad in ("2/2", "x", "1/0"):
        with pytest.raises(ConfigError, match="shard"):
            parse_shard(bad)


def test_cheap_metrics_against_direct_means():
    rng = np.random.default_rng(3)
    avail = _fake(12, "base") + _fake(4, "target", start=12)
    err = {a.info["exp_id"]: (float(rng.uniform(1, 9)), float(rng.uniform(10, 90))) for a in avail}
    chosen = [avail[1], avail[13], avail[14]]
    scores = rng.normal(size=len(avail))
    got = cheap_metrics(err, chosen, avail, lambda a: a.info["region"] == "target", scores)
    pe = np.array([err[a.info["exp_id"]] for a in avail])
    ce = np.array([err[a.info["exp_id"]] for a in chosen])
    assert got["pick_pool_error_ratio_e"] == pytest.approx(ce[:, 0].mean() / pe[:, 0].mean(), rel=1e-12)
    assert got["pick_pool_error_ratio_f"] == pytest.approx(ce[:, 1].mean() / pe[:, 1].mean(), rel=1e-12)
    assert got["picks_target_share"] == pytest.approx(2 / 3) and got["pool_target_share"] == pytest.approx(0.25)
    assert got["spearman_score_error_f"] == pytest.approx(spearmanr(scores, pe[:, 1]).statistic, rel=1e-12)
    assert "spearman_score_error_e" not in cheap_metrics(err, chosen, avail, lambda a: False, scores[:3])


# ------------------------------------------------------------------ fine-tune options
def test_finetune_args_are_mace_options_for_both_protocols(tmp_path):
    from mace.tools import build_default_arg_parser
    cfg = load_config().finetune
    model = demo_files()["model"]
    e0s = foundation_e0s(model)
    assert e0s.startswith("{14: -4.69")
    replay = build_args(cfg, model, tmp_path / "t.xyz", tmp_path / "v.xyz", tmp_path, 7, e0s,
                        replay=tmp_path / "r.xyz", replay_valid=tmp_path / "rv.xyz")
    parsed = build_default_arg_parser().parse_args(replay)
    assert parsed.multiheads_finetuning and parsed.pt_train_file == str(tmp_path / "r.xyz") and parsed.force_mh_ft_lr
    assert parsed.foundation_model == str(model) and parsed.max_num_epochs == cfg.epochs and parsed.seed == 7
    assert parsed.lr == cfg.lr and parsed.default_dtype == cfg.dtype and parsed.ema == (cfg.ema_decay is not None)
    assert cfg.ema_decay is None or parsed.ema_decay == cfg.ema_decay
    from dataclasses import replace
    naive = build_default_arg_parser().parse_args(build_args(replace(cfg, protocol="naive"), model, tmp_path / "t.xyz",
                                                             tmp_path / "v.xyz", tmp_path, 7, e0s))
    assert not naive.multiheads_finetuning and naive.pt_train_file is None
    with pytest.raises(ValueError, match="replay"):
        build_args(cfg, model, tmp_path / "t.xyz", tmp_path / "v.xyz", tmp_path, 7, e0s)


def test_replay_foundation_keeps_the_model_s_predictions(si, tmp_path):
    model_path, train, pool = si
    flat = replay_foundation(model_path, tmp_path / "flat.model")
    assert flat != model_path
    assert torch.load(flat, weights_only=False).atomic_energies_fn.atomic_energies.ndim == 1
    e0, f0 = predictor(model_path).predict(pool[:4])
    e1, f1 = predictor(flat).predict(pool[:4])
    np.testing.assert_allclose(e1, e0, rtol=1e-12)
    for x, y in zip(f0, f1):
        np.testing.assert_allclose(x, y, atol=1e-12)


# ------------------------------------------------------------------ config validation
BASE = {"datasets": [{"name": "si"}], "scenarios": {"natural": {"methods": ["random"]}}}


@pytest.mark.parametrize("change,message", [
    ({"scenarios": {"natural": {"methods": ["random", "bogus"]}}}, "unknown method 'bogus'"),
    ({"scenarios": {"natural": {"methods": ["random", "random"]}}}, "lists a method twice"),
    ({"scenarios": {"sideways": {}}}, "unknown scenario 'sideways'"),
    ({"scenarios": {"biased": {"methods": ["random"]}}}, "pool_size is required"),
    ({"scenarios": {"natural": {"methods": ["joint+target"]}}}, "target_size is 0"),
    ({"scenarios": {"natural": {"methods": ["random"], "primary": "pool"}}}, "must name a test split"),
    ({"budget": 0}, "budget must be a positive integer"),
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"seeds": [1, 1]}, "repeated seeds"),
    ({"datasets": []}, "'datasets' must be a non-empty list"),
    ({"epochs": 3}, "unknown setting epochs"),
    ({"finetune": {"epoch": 3}}, "unknown setting finetune.epoch"),
    ({"finetune": {"lr": -1}}, "finetune.lr must be a positive number"),
    ({"finetune": {"protocol": "lora"}}, "protocol must be one of"),
    ({"datasets": [{"name": "si", "finetune": {"epochs": 0}}]}, r"datasets\[si\].finetune.epochs"),
    ({"datasets": [{"name": "si", "finetune": {"epoks": 2}}]}, "unknown setting datasets.0..finetune.epoks"),
    ({"selection": {"mode": "x"}}, "selection.mode"),
    ({"curve": {"protocols": ["fast"]}}, "curve.protocols"),
    ({"datasets": [{"name": "si", "splits": {"pool": "pool"}}]}, "needs a 'train' split"),
    ({"claims": [{"id": "c", "text": "t", "test": "bigger", "method": "joint"}]}, r"claims\[c\].test must be one of"),
    ({"claims": [{"id": "c", "text": "t", "test": "lower", "method": "jiont"}]}, "unknown method 'jiont'"),
    ({"claims": [{"id": "c", "text": "t", "test": "reaches", "method": "joint"}]}, r"claims\[c\].threshold"),
    ({"claims": [{"id": "c", "text": "t", "test": "lower", "method": "joint", "scenarios": ["both"]}]},
     r"claims\[c\].scenarios"),
    ({"claims": [{"id": "c", "text": "t", "test": "lower", "method": "joint", "quantity": "f"}]},
     r"unknown setting claims\[0\].quantity"),
    ({"scenarios": {"natural": {"methods": ["random"], "curves": ["joint"]}}}, r"scenarios.natural.curves"),
    ({"rails": ["random"]}, "rails must be a non-empty list of oracle:top, oracle:diverse"),
    ({"datasets": [{"name": "si", "methods": ["joint"]}]}, r"datasets\[si\].methods"),
    ({"claims": [{"id": "c", "text": "t", "test": "closes_gap", "method": "joint", "threshold": 50}]},
     r"claims\[c\].threshold must be a share"),
    ({"scenarios": {"natural": {"methods": ["random", "embedding~probes"]}}}, "unknown method 'embedding~probes'"),
])
def test_config_errors_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**BASE, **change})


def test_planned_method_names_are_accepted():
    scen = {"natural": {"methods": ["random", "error:joint", "error+pretrain:force", "llpr", "top"]},
            "biased": {"pool_size": 60, "target_size": 5, "methods": ["joint+target", "committee"]}}
    cfg = config_from_dict({"datasets": [{"name": "si", "biased_source": "pretrain"}], "scenarios": scen})
    assert cfg.scenario("natural").methods[1] == "error:joint"


def test_packaged_config_and_quick_overrides():
    full, quick = load_config(), load_config(quick=True)
    assert len(full.seeds) >= 5 and full.rounds >= 4 and full.initial_size + full.rounds * full.budget >= 130
    families = {}
    for d in full.datasets:
        families.setdefault(d.family, []).append(d.name)
    assert {f: len(v) for f, v in families.items()} == {"metals/surfaces": 2, "molecules": 3}
    assert all(d.epochs_reason and d.max_pool >= 2000 for d in full.datasets) and full.finetune.protocol == "replay"
    assert set(full.rails) == {"oracle:top", "oracle:diverse"}
    for d in full.datasets:     # every scenario runs the rails and the default with and without --pretrain
        assert {"random", "oracle:top", "oracle:diverse", "error:joint", "error+pretrain:joint"} <= set(
            full.methods_for(d.name, "natural"))
    assert quick.quick and quick.rounds == 2 and [d.name for d in quick.datasets] == ["t1xnew"]
    assert quick.finetune.lr == full.finetune.lr            # nested merge keeps what quick does not set
    assert quick.finetune_for("t1xnew").epochs == 1
    assert full.claims and quick.claims == full.claims and {c.test for c in full.claims} <= set(claims.TESTS)
    assert {"resolves", "closes_gap", "reaches"} <= {c.test for c in full.claims}


def test_finetune_count_follows_curves_and_dataset_methods():
    raw = {"datasets": [{"name": "a", "biased_source": "pretrain"},
                        {"name": "b", "biased_source": "pretrain", "methods": ["random", "joint"]}],
           "scenarios": {"natural": {"methods": ["random", "joint", "committee"], "curves": ["random"]}},
           "rounds": 3, "committee_size": 4}
    cfg = config_from_dict(raw)
    # round 0 + random 3 + joint 1 + committee 1; members: 3 in round 0 (member 0 = round 0's), 4 in rounds 1, 2
    assert finetune_count(cfg, Cell("a", "natural", 0)) == 1 + 3 + 1 + 1 + 3 + 2 * 4
    assert finetune_count(cfg, Cell("b", "natural", 0)) == 1 + 3 + 1
    assert cfg.methods_for("b", "natural") == ["random", "joint"]
    with_curve = config_from_dict({**raw, "datasets": raw["datasets"][:1],
                                   "scenarios": {"natural": {"methods": ["random", "committee"]}}})
    assert finetune_count(with_curve, Cell("a", "natural", 0)) == 1 + 3 + 3 + 3 + 2 * 3


def test_cli_config_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [{name: si}]\nscenarios: {natural: {methods: [random]}}\nbudget: -2\n")
    assert study_main([str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "budget must be a positive integer" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ the config's claims on known records
def _runs(values: dict, dataset="oc20", scenario="natural"):
    """Method records with final F/E MAE per seed from {method: [per-seed final F]} (E = F / 10)."""
    runs = []
    for method, finals in values.items():
        for seed, f in enumerate(finals):
            r0 = {"round": 0, "n_labels": 10, "metrics": {"test_id": {"e_mae": 20.0, "f_mae": 100.0}},
                  "pretrained_metrics": {"test_id": {"e_mae": 25.0, "f_mae": 110.0}},
                  "condition": {"primary_split": "test_id"}, "picks": [], "acquisition_s": 1.0}
            r1 = {"round": 1, "n_labels": 25, "metrics": {"test_id": {"e_mae": f / 10, "f_mae": f}}}
            runs.append({"dataset": dataset, "condition": scenario, "seed": seed, "method": method, "rounds": [r0, r1]})
    return runs


def _cells(values: dict, datasets=("oc20",), scenario="natural"):
    return {(d, scenario): Records(_runs(values, d, scenario), d, scenario) for d in datasets}


LOWEST = Claim("lowest", "joint is lowest on OC20", "lowest", "joint", scenarios=["natural"], datasets=["oc20"],
               quantities=["e_mae", "f_mae"])


def test_claims_follow_the_intervals():
    clear = _cells({"random": [99.0, 97.0, 98.0], "joint": [80.0, 79.0, 81.5], "force": [90.0, 91.0, 89.0]})
    assert claims.judge(LOWEST, clear).state == "held"
    noisy = _cells({"random": [99.0, 97.0, 98.0], "joint": [80.0, 95.0, 81.5], "force": [90.0, 81.0, 96.0]})
    assert claims.judge(LOWEST, noisy).state == "not resolved"
    worse = _cells({"random": [99.0, 97.0, 98.0], "joint": [95.0, 96.0, 97.0], "force": [80.0, 81.0, 80.5]})
    assert claims.judge(LOWEST, worse).state == "did not hold"
    assert claims.judge(LOWEST, _cells({"random": [99.0, 97.0, 98.0]})).state == "not tested"
    elsewhere = _cells({"random": [99.0, 97.0, 98.0], "joint": [80.0, 79.0, 81.5]}, ("t1x",))
    assert claims.judge(LOWEST, elsewhere).state == "not tested"
    got, ratio, seeds = clear[("oc20", "natural")].reach("joint", "f_mae")
    assert got == pytest.approx(10 + 15 * (100.0 - 98.0) / (100.0 - 80.1666666), rel=1e-6)
    assert ratio == pytest.approx(got / 25) and seeds == (3, 3)
    goal = Claim("goal", "joint reaches random's error sooner", "reaches", "joint", threshold=0.6, scenarios=["biased"])
    biased = _cells({"random": [99.0, 97.0, 98.0], "joint": [80.0, 79.0, 81.5]}, scenario="biased")
    assert claims.judge(goal, biased).state == "held"
    assert claims.judge(dataclasses.replace(goal, threshold=0.3), biased).state == "did not hold"
    assert claims.judge(dataclasses.replace(goal, method="error:joint"), biased).state == "not tested"
    margin = Claim("ni", "force as good as joint", "non_inferior", "force", against="joint", threshold=0.2)
    assert claims.judge(margin, clear).state == "held"                       # +10 [+3, +18] below 16
    assert claims.judge(dataclasses.replace(margin, threshold=0.05), clear).state == "did not hold"
    assert claims.judge(dataclasses.replace(margin, cheaper=True), clear).state == "did not hold"   # same seconds


def test_claims_combine_cells_by_needed():
    """`needed` of the cells must hold; more failures than cells - needed is 'did not hold'."""
    lower = Claim("lower", "joint beats random", "lower", "joint", needed=2)
    good, bad, flat = [80.0, 79.0, 81.5], [120.0, 119.0, 121.0], [80.0, 120.0, 100.0]
    rand = [99.0, 97.0, 98.0]

    def cells(*finals):
        return {(d, "natural"): Records(_runs({"random": rand, "joint": f}, d), d, "natural")
                for d, f in zip("abc", finals)}
    assert claims.judge(lower, cells(good, good, bad)).state == "held"
    assert claims.judge(lower, cells(good, bad, bad)).state == "did not hold"
    assert claims.judge(lower, cells(good, flat, flat)).state == "not resolved"
    assert claims.judge(dataclasses.replace(lower, needed=None), cells(good, good, bad)).state == "did not hold"
    assert claims.judge(dataclasses.replace(lower, needed=None), cells(good, good, good)).state == "held"


# ------------------------------------------------------------------ rails: resolving power and gap closure
def test_fieller_interval_is_the_set_of_ratios_a_t_test_does_not_reject():
    rng = np.random.default_rng(4)
    b = 10.0 + rng.normal(0.0, 2.0, 6)
    a = 0.6 * b + rng.normal(0.0, 1.5, 6)
    got = rails.fieller(a, b)
    assert got["ratio"] == pytest.approx(a.mean() / b.mean())
    from scipy import stats as st
    crit = st.t.ppf(0.975, 5)

    def accepted(theta):
        d = a - theta * b
        return abs(d.mean()) / (d.std(ddof=1) / math.sqrt(6)) <= crit
    grid = np.linspace(-1, 3, 40001)
    inside = grid[[accepted(t) for t in grid]]
    assert got["lo"] == pytest.approx(inside.min(), abs=2e-4) and got["hi"] == pytest.approx(inside.max(), abs=2e-4)
    noise = rails.fieller(a, rng.normal(0.0, 1.0, 6))         # a gap that is noise: no bounded interval
    assert math.isnan(noise["lo"]) and math.isnan(noise["hi"])


def _rail_cells(values: dict, dataset="m"):
    return {(dataset, "natural"): Records(_runs(values, dataset), dataset, "natural")}


def test_resolving_power_and_gap_closure_claims():
    rand, top, div = [100.0, 98.0, 101.0, 99.0, 102.0], [95.0, 97.0, 96.0, 99.0, 94.0], [80.0, 79.0, 82.0, 78.0, 81.0]
    half = [90.0, 88.5, 91.5, 89.0, 91.0]             # closes about half of random − diverse
    cells = _rail_cells({"random": rand, "oracle:top": top, "oracle:diverse": div, "joint": div[::-1], "force": half})
    rec = cells[("m", "natural")]
    got = rails.resolving(rec, ["oracle:top", "oracle:diverse"], "f_mae")
    assert got["rail"] == "oracle:diverse" and got["resolves"]
    g = rails.gap_closure(rec, "force", "oracle:diverse", "f_mae")
    assert g["ratio"] == pytest.approx((np.mean(rand) - np.mean(half)) / (np.mean(rand) - np.mean(div)))
    power = Claim("p", "it can answer", "resolves", rails=["oracle:top", "oracle:diverse"])
    assert claims.judge(power, cells).state == "held"
    gap = Claim("g", "joint closes half", "closes_gap", "joint", threshold=0.5, rails=["oracle:top", "oracle:diverse"])
    assert claims.judge(gap, cells).state == "held"
    assert claims.judge(dataclasses.replace(gap, method="force"), cells).state == "not resolved"
    assert claims.judge(dataclasses.replace(gap, method="force", threshold=0.9), cells).state == "did not hold"
    flat = _rail_cells({"random": rand, "oracle:top": rand[::-1], "oracle:diverse": [101.0, 97.0, 100.0, 99.5, 101.0],
                        "joint": div})
    assert claims.judge(power, flat).state == "did not hold"
    assert claims.judge(gap, flat).state == "not tested"      # no scenario with power: nothing to judge
    both = {**cells, **_rail_cells({"random": rand, "oracle:top": rand[::-1], "oracle:diverse": rand, "joint": rand},
                                   "n")}
    assert claims.judge(gap, both).state == "held"            # the cell without power is left out
    text = "\n".join(report._rails_section(both, {"rails": ["oracle:top", "oracle:diverse"],
                                                  "datasets": [{"name": "m", "family": "metals"},
                                                               {"name": "n", "family": "metals"}]}))
    assert "| m · natural | metals | F MAE |" in text and "**yes**" in text
    assert "Scenarios with resolving power for forces, per family: metals 1." in text


class _Embeddings:
    """A FeatureStore stand-in: embedding rows from info['x']."""

    def rows(self, kernel, structures, exact=False, probes=False):
        class Block:
            rows = torch.tensor(np.array([a.info["x"] for a in structures], dtype=np.float64))
        return Block(), 0.0


def test_oracles_take_the_largest_errors_or_spread_over_them():
    pool = []
    for i in range(12):
        a = Atoms("H")
        a.info["x"] = [float(i // 4), 0.0] if i < 8 else [10.0 + i, 5.0]   # two tight clusters + spread ones
        pool.append(a)
    err = np.array([50.0, 49.0, 48.0, 47.0, 46.0, 45.0, 44.0, 43.0, 10.0, 9.0, 8.0, 7.0])
    top = acquisition.oracle_picks("top", err, _Embeddings(), [], pool, 3)
    assert top.positions.tolist() == [0, 1, 2]
    labelled = [Atoms("H")]
    labelled[0].info["x"] = [0.0, 0.0]
    div = acquisition.oracle_picks("diverse", err, _Embeddings(), labelled, pool, 3)
    # among the 3B = 9 largest errors: the far one, then the cluster away from the labelled structure (its
    # largest error first), and only then the labelled structure's own cluster
    assert div.positions.tolist() == [8, 4, 0]
    with pytest.raises(ValueError, match="real errors"):
        acquisition.oracle_picks("top", err[:3], _Embeddings(), [], pool, 3)


def test_report_judges_the_claims_it_is_given(tmp_path):
    """The verdicts are the config's claims: their text, how they are judged, and the state."""
    for run in _runs({"random": [99.0, 97.0, 98.0], "joint": [80.0, 79.0, 81.5], "force": [90.0, 91.0, 89.0]}):
        folder = tmp_path / "results" / "oc20_natural" / f"seed{run['seed']}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{run['method']}.json").write_text(json.dumps(run))
    text = report.write_report(tmp_path, [LOWEST], "my.yaml").read_text()
    assert "1. joint is lowest on OC20 (the paired difference of `joint` to every other method below 0" in text
    assert "**held**" in text and "my.yaml" in text
    assert "The config declares no claims." in report.write_report(tmp_path).read_text()


def test_report_lists_every_evaluate_record(tmp_path):
    """The evaluation section has one row per record, kernel, score and part, with the record's own numbers."""
    m = {"n": 7, "spearman": 0.5, "median_ratio": 1.1, "miscalibration_area": 0.125, "coverage_95": 0.9,
         "rms_predicted": 12.0, "rmse_real": 15.0, "units": "meV/A", "bins": []}
    doc = {"inputs": {"model": "a/si.model", "train": "a/si_train.xyz", "valid": "a/si_test.xyz"},
           "results": {"force": {"error": {"force": m, "atom_force": {"n": 30, "spearman": 0.7, "median_ratio": 0.9}},
                                 "pv": {"force": {**m, "spearman": None}},
                                 "calibration": {"rho": {"force": 1.0}}}}}
    (tmp_path / "si_plain").mkdir()
    (tmp_path / "si_plain" / "evaluate.json").write_text(json.dumps(doc))
    rows = [line for line in report._evaluate_section(tmp_path) if line.startswith("| si_plain")]
    assert len(rows) == 3
    assert "--valid si_test.xyz" in rows[0] and "| 7 | 0.50 | 1.10 | 0.90 | 0.125 |" in rows[0]
    assert "| atom_force | 30 | 0.70 | 0.90 | – | – |" in rows[1]
    assert "| pv | force | 7 | – |" in rows[2]
    assert report._evaluate_section(tmp_path / "none") == []


def test_random_curve_at_the_end_is_its_last_step_and_late_slope():
    """Random's last-round change and its least-squares slope over the rounds with ≥ half the final labels
    (here 70, 100, 130), per 100 labels, each with a t-interval over seeds."""
    runs = []
    for seed, (a, b, c, d) in enumerate([(200.0, 190.0, 180.0, 175.0), (210.0, 196.0, 186.0, 177.0), (205.0, 195.0, 182.0, 178.0)]):
        rounds = [{"round": i, "n_labels": n, "metrics": {"test_id": {"e_mae": f / 10, "f_mae": f}}}
                  for i, (n, f) in enumerate(zip((40, 70, 100, 130), (a, b, c, d)))]
        runs.append({"dataset": "x", "condition": "natural", "seed": seed, "method": "random", "rounds": rounds})
    text = report._random_last_step(Records(runs, "x", "natural"))
    slopes = [100 * np.polyfit([70, 100, 130], ys, 1)[0] for ys in ([190, 180, 175], [196, 186, 177], [195, 182, 178])]
    step = [175 - 180.0, 177 - 186.0, 178 - 182.0]
    assert f"F: last round {np.mean(step):+.1f} [" in text
    from scipy import stats as sps
    lo, hi = sps.t.interval(0.95, 2, loc=np.mean(slopes), scale=np.std(slopes, ddof=1) / np.sqrt(3))
    assert f"slope over the second half {np.mean(slopes):+.1f} [{lo:+.1f}, {hi:+.1f}] per 100 labels" in text
    assert f"E: last round {np.mean(step) / 10:+.1f} [" in text
    runs.append({"dataset": "x", "condition": "natural", "seed": 3, "method": "random",   # unfinished: left out
                 "rounds": [{"round": 0, "n_labels": 40, "metrics": {"test_id": {"e_mae": 1.0, "f_mae": 999.0}}},
                            {"round": 1, "n_labels": 70, "metrics": {"test_id": {"e_mae": 1.0, "f_mae": 1.0}}}]})
    assert report._random_last_step(Records(runs, "x", "natural")) == text


def test_how_it_was_run_groups_overlapping_shards_and_sums_their_running_time(tmp_path):
    """Shards whose invocations overlap share a line ("&"); one that ran later gets its own, even if another
    shard resumed after it; the running time is the union of the invocations (pauses nobody ran in left out)."""
    def record(shard, *invocations):  # (finished "HH:MM:SS", wall minutes)
        inv = [{"finished": f"2026-12-03 {end}", "wall_s": 60.0 * wall, "cpu_s": 1.0} for end, wall in invocations]
        (tmp_path / f"run-{shard}.json").write_text(json.dumps({"shard": shard, "invocations": inv}))
    record("all-a-b", ("11:00:00", 60.0), ("16:01:00", 1.0))    # 10:00-11:00, resumed 16:00-16:01
    record("all-c-d", ("10:30:00", 20.0), ("11:20:00", 30.0))   # 10:10-10:30, 10:50-11:20
    record("all-e", ("13:00:00", 60.0))                         # 12:00-13:00: alone
    record("all-f", ("15:10:00", 10.0), ("15:40:00", 10.0))     # 15:00-15:10, pause, 15:30-15:40: alone
    text = "\n".join(report._how_run(tmp_path, tmp_path))
    assert ("python -m study --only a,b --out DIR & python -m study --only c,d --out DIR; wait\n"
            "python -m study --only e --out DIR; wait\npython -m study --only f --out DIR; wait\n") in text
    # 10:00-11:20, 12:00-13:00, 15:00-15:10, 15:30-15:40, 16:00-16:01
    assert "- running time: 161.0 min" in text and "361.0 min from the first start" in text


def test_report_acquisition_section_pairs_each_method_with_random_by_draw(tmp_path):
    """ΔF vs random is the per-draw difference of the F ratios with its 95 % t-interval (n = 3, t = 4.303)."""
    rows = []
    for d, (rand, pv) in enumerate([(1.0, 2.0), (1.2, 2.4), (0.8, 2.0)]):
        for method, f in (("random", rand), ("pv", pv)):
            rows.append({"dataset": "si", "draw": d, "method": method, "kernel": None if method == "random" else "joint",
                         "shortlist": None, "pool": 300, "budget": 40, "pool_target_share": 0.2, "f_ratio": f,
                         "e_ratio": 1.0, "target_share": 0.2, "spearman_f": None})
    path = tmp_path / "acquisition.json"
    path.write_text(json.dumps({"command": "python -m bench acquisition", "timestamp": "t", "results": rows}))
    lines = {line.split(" | ")[1]: line for line in report._acquisition_section(path) if line.startswith("| si |")}
    half = 4.302653 * math.sqrt(((1.0 - 1.1333333) ** 2 + (1.2 - 1.1333333) ** 2 + (1.2 - 1.1333333) ** 2) / 2) / math.sqrt(3)
    assert f"| +1.13 [{1.1333333 - half:+.2f}, {1.1333333 + half:+.2f}] |" in lines["pv"]
    assert "| 1.00 ± 0.20 |  |" in lines["random"]


# ------------------------------------------------------------------ the CI smoke run
@pytest.mark.slow
def test_quick_study_curves_shards_resume_and_report_only(tmp_path):
    out = tmp_path / "exp"
    assert study_main(["--quick", "--curves", "--out", str(out)]) == 0
    curve = json.loads((out / "results" / "t1xnew_finetune_curve.json").read_text())
    assert set(curve) == {"replay"} and len(curve["replay"]["curve"]["Default"]) == 3   # before + 2 epochs
    assert study_main(["--quick", "--shard", "0/2", "--out", str(out)]) == 0
    assert study_main(["--quick", "--shard", "1/2", "--out", str(out)]) == 0
    cfg = load_config(quick=True)
    for seed in (0, 1):
        for method in cfg.scenario("natural").methods:
            run = json.loads((out / "results" / "t1xnew_natural" / f"seed{seed}" / f"{method}.json").read_text())
            assert run["done"] and [r["n_labels"] for r in run["rounds"]] == [4, 7, 10]
            # random has a learning curve; the others are fine-tuned after the last round only
            assert ("metrics" in run["rounds"][1]) == (method == "random") and "metrics" in run["rounds"][2]
            for r in run["rounds"][:2]:
                assert len(set(r["picks"])) == 3 and r["acquisition_s"] >= 0
                assert "pick_pool_error_ratio_f" in r["cheap"]
            if method == "oracle:top":   # the rail takes the largest real errors of what was left
                assert run["rounds"][0]["cheap"]["pick_pool_error_ratio_f"] > 1
    shards = {p.name for p in (out / "results").glob("run-*.json")}
    assert shards == {"run-0of2.json", "run-1of2.json"}
    text = (out / "results.md").read_text()
    for needle in ("t1xnew · natural", "Verdicts", "fine-tune curve", "Rails: can each scenario answer",
                   "| t1xnew · natural | molecules | F MAE |", "| oracle:top | 10 |", "– (no curve)"):
        assert needle in text
    assert (out / "figures" / "t1xnew_natural_learning_curves.png").stat().st_size > 1000
    assert (out / "figures" / "t1xnew_finetune_curve.png").stat().st_size > 1000
    before = json.loads((out / "results" / "run-0of2.json").read_text())
    # a rerun resumes: nothing is fine-tuned again; --report-only rewrites the same page from the records
    assert study_main(["--quick", "--shard", "0/2", "--out", str(out)]) == 0
    after = json.loads((out / "results" / "run-0of2.json").read_text())
    assert after["finetunes"] == 0 and len(after["invocations"]) == len(before["invocations"]) + 1
    text = (out / "results.md").read_text()
    assert study_main(["--quick", "--report-only", "--out", str(out)]) == 0
    assert (out / "results.md").read_text() == text
