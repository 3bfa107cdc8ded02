"""The error-aware score (float64): residual posterior mean = kernel ridge regression in kernel space,
calibration recovers a known scale, the force LCMD kernel is invariant and its sketch unbiased, and the
kernel choice changes the batch."""
import math

import numpy as np
import pytest
import torch

import ntkal
from ntkal import ENERGY, FORCE, RowBlock
from ntkal.acquisition.distances import exact_force_kernel, lcmd_vectors
from ntkal.acquisition.residuals import residual_rows
from ntkal.acquisition.scorers import ErrorScorer
from ntkal.posterior import Accumulator, Posterior, ResidualModel
from tiny import rotated, structures, tiny_mace

F64 = torch.float64


@pytest.fixture(scope="module")
def featurizer():
    return ntkal.MACEFeaturizer(tiny_mace(seed=61), kernel="joint", sketch_dim=24, dtype=F64, seed=2)


def _labelled(atoms_list, seed):
    rng = np.random.default_rng(seed)
    for a in atoms_list:
        a.info["REF_energy"] = float(rng.normal(scale=2.0))
        a.arrays["REF_forces"] = rng.normal(scale=0.5, size=(len(a), 3))
    return atoms_list


def _scaled(post, rb):
    c = post.row_scale(rb.kind)
    return rb.rows.to(F64) * c[:, None], post.row_noise(rb.kind)


@pytest.mark.parametrize("kernel", ["embedding", "energy", "force", "joint"])
@pytest.mark.parametrize("with_pretrain", [False, True])
def test_residual_mean_equals_kernel_ridge_regression(featurizer, kernel, with_pretrain):
    fz = featurizer.with_kernel(kernel)
    train = _labelled(structures(5, seed=62), 1)
    pre = _labelled(structures(4, seed=63), 2) if with_pretrain else []
    pool = structures(3, seed=64)
    e, f = fz.predict(train)
    rows = fz(train)
    eps = residual_rows(rows, train, e, f)
    acc = Accumulator()
    acc.add(rows, residuals=eps)
    blocks, all_eps = [rows], [eps]
    if pre:
        pre_rows = fz(pre)
        pre_eps = residual_rows(pre_rows, pre, *fz.predict(pre))
        acc.add(pre_rows, residuals=pre_eps, labelled=False)
        blocks.append(pre_rows)
        all_eps.append(pre_eps)
    post = Posterior.from_accumulator(acc, sigma_e2=0.03, sigma_f2=0.005)
    pool_rows = fz(pool)
    # kernel space: mu = rho* g*^T G^T (G G^T + S)^-1 (eps / rho), on scaled rows
    T = RowBlock.cat(blocks)
    G, S = _scaled(post, T)
    eps_all = torch.cat(all_eps)
    rho_t = torch.tensor([post.residual.rho["force" if k == FORCE else ("embedding" if kernel == "embedding" else "energy")]
                          for k in T.kind.tolist()], dtype=F64)
    X, _ = _scaled(post, pool_rows)
    rho_x = torch.tensor([post.residual.rho["force" if k == FORCE else ("embedding" if kernel == "embedding" else "energy")]
                          for k in pool_rows.kind.tolist()], dtype=F64)
    krr = rho_x * (X @ G.T @ torch.linalg.solve(G @ G.T + torch.diag(S), eps_all / rho_t))
    torch.testing.assert_close(post.predictive(pool_rows).mu, krr, rtol=1e-8, atol=1e-12)


def _synthetic(n, k, alpha, sigma2, seed):
    """Energy rows g; residuals from the model with every variance scaled by alpha^2 (rho = 1)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, k, generator=g, dtype=F64) * torch.logspace(0, -1, k, dtype=F64)
    v = alpha * torch.randn(k, generator=g, dtype=F64)
    rb = RowBlock(rows, torch.arange(n + 1), torch.full((n,), ENERGY, dtype=torch.int8), torch.ones(n, dtype=torch.int64))
    return rb, v


def test_calibration_recovers_a_known_scale():
    """Data drawn from the model with prior and noise variances scaled by alpha^2 = 6.25: the posterior mean
    does not change with that scale, so only the cross-fitted calibration can find it."""
    alpha, sigma2, k = 2.5, 0.05, 6
    rb, v = _synthetic(3000, k, alpha, sigma2, seed=3)
    acc = Accumulator()
    acc.add(rb)
    post = Posterior.from_accumulator(acc, sigma_e2=sigma2)
    c = post.scales["energy"]
    noise = alpha * math.sqrt(sigma2) * torch.randn(len(rb), generator=torch.Generator().manual_seed(4), dtype=F64)
    eps = c * rb.rows @ v + noise  # in units where the scaled row c g observes g.v with prior N(0, alpha^2)
    acc = Accumulator()
    acc.add(rb, residuals=eps)
    post = Posterior.from_accumulator(acc, sigma_e2=sigma2)
    post.residual = ResidualModel.fit(post, acc, rho={"energy": 1.0})
    assert post.residual.alpha2["energy"] == pytest.approx(alpha ** 2, rel=0.1)
    # moment-matched rho instead: the written error is the median of fresh held-out errors' size
    post = Posterior.from_accumulator(acc, sigma_e2=sigma2)
    test, _ = _synthetic(2000, k, alpha, sigma2, seed=5)
    eps_t = post.scales["energy"] * test.rows @ v + alpha * math.sqrt(sigma2) * torch.randn(
        len(test), generator=torch.Generator().manual_seed(6), dtype=F64)
    scored = ErrorScorer(post)(test)
    predicted = scored.values["energy_error"] / 1e3
    assert float((eps_t.abs().numpy() <= predicted).mean()) == pytest.approx(0.5, abs=0.04)


def test_force_kernel_is_invariant_and_its_sketch_unbiased(featurizer):
    fz = featurizer.with_kernel("force")
    ats = structures(3, seed=65)
    moved = []
    for i, a in enumerate(ats):
        b = rotated(a, seed=i)
        b.positions += np.array([0.3, -1.1, 2.0])
        perm = np.random.default_rng(i).permutation(len(b))
        moved.append(b[perm])
    rows, rows_moved = fz(ats), fz(moved)
    torch.testing.assert_close(lcmd_vectors(rows)[0], lcmd_vectors(rows_moved)[0], rtol=1e-8, atol=1e-10)
    exact = exact_force_kernel(rows)
    torch.testing.assert_close(exact, exact_force_kernel(rows_moved), rtol=1e-8, atol=1e-12)
    est = torch.stack([(lambda p: p @ p.T)(lcmd_vectors(rows, seed=s)[0]) for s in range(400)])
    err = (est.mean(0) - exact).abs() / exact.abs().max()
    sem = est.std(0) / math.sqrt(len(est)) / exact.abs().max()
    assert bool((err < 4 * sem + 1e-9).all()), (err, sem)


def test_error_score_outputs_physical_units_per_structure_and_atom(featurizer, tmp_path):
    fz = featurizer.with_kernel("joint")
    train = _labelled(structures(6, seed=66), 3)
    pool = structures(4, seed=67)
    opts = ntkal.Options(score="error", budget=2).validate()
    from ntkal.acquisition.pipeline import Pipeline
    pipe = Pipeline(opts, fz)
    post = pipe.fit(train)
    assert set(post.residual.rho) == {"energy", "force"} and all(v > 0 for v in post.residual.alpha2.values())
    scored = pipe.scorer(post)(fz(pool))
    assert (scored.values["energy_error"] > 0).all() and (scored.values["force_error"] > 0).all()
    rows = fz(pool)
    err = post.residual.errors(rows, post.predictive(rows))
    cal = err["calibration"]
    for s, a in enumerate(pool):
        per_atom = scored.atom_values["atom_force_error"][s]
        assert per_atom.shape == (len(a),) and (per_atom > 0).all()
        # before calibration the structure's force error is the RMS over its atoms' (same noise floor)
        raw_atoms = err["raw"]["atom_force"][err["atom_seg"] == s]
        assert math.sqrt((raw_atoms ** 2).mean()) == pytest.approx(err["raw"]["force"][s], rel=1e-9)
        np.testing.assert_allclose(per_atom, 1e3 * cal.apply("atom_force", raw_atoms), rtol=1e-12)
    np.testing.assert_allclose(scored.values["force_error"], 1e3 * cal.apply("force", err["raw"]["force"]), rtol=1e-12)
    res = ntkal.select(fz.model, train, pool, budget=2, score="error", sketch_dim=24, seed=2, dtype="float64")
    assert all("ntkal_force_error" in a.info and "ntkal_energy_error" in a.info for a in res.atoms)


def test_default_score_falls_back_to_pv_out_loud(featurizer, caplog):
    """Score auto with some labelled structures unlabelled: posterior variance, one warning that says how many
    and why, and the reason in the posterior's and the selection's info (the JSON reports carry them)."""
    import logging
    fz = featurizer.with_kernel("energy")
    train = _labelled(structures(5, seed=72), 5)
    for a in train[1:3]:
        del a.info["REF_energy"]
    from ntkal.acquisition.pipeline import Pipeline
    pipe = Pipeline(ntkal.Options(budget=2).validate(), fz)
    with caplog.at_level(logging.WARNING, logger="ntkal"):
        res = pipe.select(train, structures(4, seed=73))
    said = [r for r in caplog.records if r.name == "ntkal" and "posterior variance" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "2 of 5 labelled structures" in said[0].getMessage()
    assert pipe.score == "pv" and res.info["score"] == "pv" and res.posterior.residual is None
    assert res.info["score_fallback"] == said[0].getMessage() == res.posterior.info["score_fallback"]
    assert res.posterior.summary()["score_fallback"] == said[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ntkal"):  # every structure labelled: the error score, silently
        post = Pipeline(ntkal.Options().validate(), fz).fit(_labelled(structures(5, seed=72), 5))
    assert post.residual is not None and "score_fallback" not in post.info and not caplog.records


def test_evaluate_summary_calibration_statistics():
    """summary(): components drawn from the predicted distribution give 95 % coverage and a small
    miscalibration area; predicted errors three times too small do not. The area is checked against a
    second implementation (the polygon area between the calibration curve and the diagonal, computed from
    the standardised residuals, as uncertainty-toolbox defines it)."""
    from scipy.stats import norm
    from ntkal.evaluate import summary
    rng = np.random.default_rng(5)
    s = rng.uniform(0.5, 2.0, size=4000)
    real = rng.normal(size=4000) * s

    def pit(z):
        return 2 * norm.cdf(np.abs(z)) - 1

    def area_second(z):  # uncertainty-toolbox style: trapezoid of |observed - expected| over 100 levels
        expected = np.linspace(0, 1, 100)
        observed = np.array([(np.abs(z) <= norm.ppf(0.5 + p / 2)).mean() if p < 1 else 1.0 for p in expected])
        return float(np.trapezoid(np.abs(observed - expected), expected))
    good = summary(s, np.abs(real), pit(real / s))
    assert abs(good["coverage_95"] - 0.95) < 0.015 and good["miscalibration_area"] < 0.02
    assert good["spearman"] > 0.2 and sum(b["n"] for b in good["bins"]) == 4000
    assert good["miscalibration_area"] == pytest.approx(area_second(real / s), abs=0.005)
    bad = summary(s / 3, np.abs(real), pit(real / (s / 3)))
    assert bad["coverage_95"] < 0.5 and bad["miscalibration_area"] > 0.2
    assert bad["miscalibration_area"] == pytest.approx(area_second(real / (s / 3)), abs=0.005)


def test_calibration_line_is_robust_and_spreads_compressed_predictions():
    """Real errors 2·raw^1.5 times lognormal scatter, with 5 % wild outliers: the least-absolute-deviation line
    recovers (log 2, 1.5), so the calibrated error is the conditional median at small and large sizes; a
    moment fit would follow the outliers."""
    from ntkal.posterior.calibration import Calibration
    rng = np.random.default_rng(7)
    raw = np.exp(rng.uniform(np.log(5), np.log(500), 2000))
    real = 2 * raw ** 1.5 * np.exp(0.3 * rng.normal(size=2000))
    real[rng.random(2000) < 0.05] *= 100
    cal = Calibration.fit({"force": raw}, {"force": real}, {})
    a, b = cal.line["force"]
    assert b == pytest.approx(1.5, abs=0.03) and a == pytest.approx(math.log(2), abs=0.1)
    for lo, hi in ((5, 20), (200, 500)):  # half above, half below, in both regions
        m = (raw >= lo) & (raw < hi)
        assert float((real[m] <= cal.apply("force", raw[m])).mean()) == pytest.approx(0.5, abs=0.08)


def test_calibration_quantiles_fix_heavy_tails():
    """Components t ~ Student-t(3) (heavy tails, as a mixture of structure sizes makes them): the Gaussian
    reading misstates the 50 % interval, the fitted |t| quantiles hold at every level on fresh draws."""
    from scipy.stats import norm
    from ntkal.evaluate import summary
    from ntkal.posterior.calibration import Calibration
    rng = np.random.default_rng(8)
    raw = np.ones(4000)
    t_fit, t_new = rng.standard_t(3, size=4000), rng.standard_t(3, size=4000)
    cal = Calibration.fit({"force": raw}, {"force": np.full(4000, np.sqrt(3.0))}, {"force": (t_fit, raw)})
    sigma = cal.apply("force", raw)
    fresh = summary(sigma, np.abs(t_new), cal.pit("force", t_new / sigma))
    gauss = summary(sigma, np.abs(t_new), 2 * norm.cdf(np.abs(t_new) / np.std(t_fit)) - 1)
    assert fresh["miscalibration_area"] < 0.02 and abs(fresh["coverage_50"] - 0.5) < 0.03
    assert abs(fresh["coverage_95"] - 0.95) < 0.015
    assert gauss["miscalibration_area"] > 0.05 and gauss["coverage_50"] > 0.58


def test_calibration_halves_keep_each_region_s_shape():
    """Two regions whose components differ in shape, not only in size (small σ: Student-t(3), large σ:
    Gaussian), as a pretraining sample and a labelled set do: one pooled |t| table misstates the 50 %
    interval of each; the tables of σ's two halves, blended by log σ, hold on fresh draws of both."""
    from ntkal.evaluate import summary
    from ntkal.posterior.calibration import Calibration
    rng = np.random.default_rng(9)
    n = 3000
    raw = np.concatenate([np.full(n, 0.1), np.full(n, 1.0)])
    real = np.concatenate([np.full(n, 0.1), np.full(n, 1.0)])

    def draw():
        return np.concatenate([0.1 * rng.standard_t(3, size=n) / np.sqrt(3.0), rng.normal(size=n)])
    cal = Calibration.fit({"force": raw}, {"force": real}, {"force": (draw(), raw)})
    assert set(cal.halves) == {"force"} and cal.halves["force"]["q"].shape == (2, len(cal.abs_t["force"]))
    sigma = cal.apply("force", raw)
    t = draw() / sigma
    for region in (slice(0, n), slice(n, 2 * n)):
        blended = summary(sigma[region], np.abs(t[region]), cal.pit("force", t[region], sigma[region]))
        pooled = summary(sigma[region], np.abs(t[region]), cal.pit("force", t[region]))
        assert abs(blended["coverage_50"] - 0.5) < 0.03 and blended["miscalibration_area"] < 0.02
        assert abs(pooled["coverage_50"] - 0.5) > 0.05
    back = Calibration.from_state(cal.to_state())
    np.testing.assert_array_equal(back.pit("force", t, sigma), cal.pit("force", t, sigma))
    # the raw predictions the line was fitted on travel with it; a state saved before they were kept loads
    np.testing.assert_array_equal(back.raw_q["force"], [0.1, 0.1, 0.55, 1.0, 1.0])
    old = {k: v for k, v in cal.to_state().items() if k != "raw_q"}
    assert Calibration.from_state(old).raw_q == {} and Calibration.from_state(old).line == cal.line
    few = Calibration.fit({"force": raw[::40]}, {"force": real[::40]}, {"force": (draw()[::40], raw[::40])})
    assert few.halves == {}  # under MIN_PER_HALF components a half: one table


def test_evaluate_end_to_end(featurizer):
    """ntkal.evaluate.evaluate on labelled structures: every kernel and score, energy and force parts, each
    structure counted once; an unknown kernel is an InputError naming the flag."""
    from ntkal.evaluate import evaluate
    train, valid = _labelled(structures(8, seed=70), 3), _labelled(structures(6, seed=71), 4)
    out = evaluate(featurizer.model, train, valid, kernels=("energy", "force", "joint"), scores=("error", "pv"),
                   sketch_dim=24, dtype="float64", seed=2)
    assert set(out) == {"energy", "force", "joint"}
    for kernel, parts in (("energy", {"energy"}), ("force", {"force"}), ("joint", {"energy", "force"})):
        for score in ("error", "pv"):
            got = out[kernel][score]
            assert set(got) == parts | ({"atom_force"} if "force" in parts else set())
            n_atoms = sum(len(a) for a in valid)
            assert got.get("atom_force", {"n": n_atoms})["n"] == n_atoms
            for part in parts:
                m = got[part]
                assert m["n"] == len(valid) and sum(b["n"] for b in m["bins"]) == len(valid)
                assert 0.0 <= m["coverage_95"] <= 1.0 and m["rms_predicted"] > 0 and m["rmse_real"] > 0
        assert set(out[kernel]["calibration"]["rho"]) >= parts
    with pytest.raises(ntkal.InputError, match="--kernels"):
        evaluate(featurizer.model, train, valid, kernels=("nope",))


def _region(n, k, dims, weight, v, noise, seed):
    """Energy rows living on `dims` and their residuals weight·g·v + noise."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.zeros(n, k, dtype=F64)
    rows[:, dims] = torch.randn(n, len(dims), generator=g, dtype=F64)
    eps = weight * rows @ v + noise * torch.randn(n, generator=g, dtype=F64)
    return RowBlock(rows, torch.arange(n + 1), torch.full((n,), ENERGY, dtype=torch.int8),
                    torch.ones(n, dtype=torch.int64)), eps


def test_labelled_pretraining_sample_calibrates_where_the_model_is_right():
    """The labelled set comes from where the model is wrong (large residuals), the pretraining sample from
    where it is right (residuals 100× smaller). With the pretraining residuals in the cross-fitting, fresh
    structures of the known region read about their real error; without them the noise floor set by the
    labelled set's residuals makes them read many times too large (the MD review's 58×)."""
    k = 16
    v = torch.randn(k, generator=torch.Generator().manual_seed(1), dtype=F64)
    wrong, right = list(range(8)), list(range(8, 16))
    train, r_train = _region(60, k, wrong, 1.0, v, 0.05, seed=2)
    pre, r_pre = _region(300, k, right, 0.01, v, 0.0005, seed=3)
    test, r_test = _region(400, k, right, 0.01, v, 0.0005, seed=4)
    ratios = {}
    for with_pre in (True, False):
        acc = Accumulator()
        acc.add(train, 0, r_train)
        acc.add(pre, 0, r_pre if with_pre else torch.full_like(r_pre, float("nan")), labelled=False)
        post = Posterior.from_accumulator(acc)
        assert ("300 labelled pretraining" in post.residual.calibration) == with_pre
        pred = ErrorScorer(post)(test).values["energy_error"] / 1e3
        ratios[with_pre] = float(np.median(pred / r_test.abs().numpy()))
    assert 0.5 < ratios[True] < 2.0, ratios
    assert ratios[False] > 5.0, ratios


def test_evaluate_standardises_energy_rows_of_a_block_without_force_rows():
    """evaluate's components of an energy-only block (the energy kernel's) are residual ÷ written error: the
    probe-row factor √(m/3N) is for force rows only (it is 0 where a structure has no force rows, which made
    every energy interval hold: coverage 1.0 at 50 %, area 0.5)."""
    from ntkal.evaluate import _metrics
    k = 16
    v = torch.randn(k, generator=torch.Generator().manual_seed(5), dtype=F64)
    dims = list(range(k))
    train, r_train = _region(200, k, dims, 1.0, v, 0.05, seed=6)
    test, r_test = _region(600, k, dims, 1.0, v, 0.05, seed=7)
    acc = Accumulator()
    acc.add(train, 0, r_train)
    post = Posterior.from_accumulator(acc)
    m = _metrics(post, test, r_test, "error")["energy"]
    assert m["n_components"] == 600
    assert abs(m["coverage_50"] - 0.5) < 0.1 and m["miscalibration_area"] < 0.1, m
