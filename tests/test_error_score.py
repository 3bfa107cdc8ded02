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
    # moment-matched rho instead: the calibrated predictive variance matches fresh held-out errors
    post = Posterior.from_accumulator(acc, sigma_e2=sigma2)
    test, _ = _synthetic(2000, k, alpha, sigma2, seed=5)
    eps_t = post.scales["energy"] * test.rows @ v + alpha * math.sqrt(sigma2) * torch.randn(
        len(test), generator=torch.Generator().manual_seed(6), dtype=F64)
    scored = ErrorScorer(post)(test)
    predicted = (scored.values["energy_error"] / 1e3) ** 2
    assert float(predicted.mean()) == pytest.approx(float(eps_t.square().mean()), rel=0.15)


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
    for s, a in enumerate(pool):
        per_atom = scored.atom_values["atom_force_error"][s]
        assert per_atom.shape == (len(a),)
        # the structure's force error is the RMS over its atoms' errors (same noise floor)
        assert math.sqrt((per_atom ** 2).mean()) == pytest.approx(scored.values["force_error"][s], rel=1e-9)
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
    """summary(): residuals drawn from the predicted distribution give 95 % coverage and a small
    miscalibration area; predicted errors three times too small do not."""
    from ntkal.evaluate import summary
    rng = np.random.default_rng(5)
    s = rng.uniform(0.5, 2.0, size=4000)
    real = rng.normal(size=4000) * s
    good = summary(s, np.abs(real), real / s)
    assert abs(good["coverage_95"] - 0.95) < 0.015 and good["miscalibration_area"] < 0.02
    assert good["spearman"] > 0.2 and sum(b["n"] for b in good["bins"]) == 4000
    bad = summary(s / 3, np.abs(real), real / (s / 3))
    assert bad["coverage_95"] < 0.5 and bad["miscalibration_area"] > 0.2


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
            assert set(got) == parts
            for part in parts:
                m = got[part]
                assert m["n"] == len(valid) and sum(b["n"] for b in m["bins"]) == len(valid)
                assert 0.0 <= m["coverage_95"] <= 1.0 and m["rms_predicted"] > 0 and m["rmse_real"] > 0
        assert set(out[kernel]["calibration"]["rho"]) >= parts
    with pytest.raises(ntkal.InputError, match="--kernels"):
        evaluate(featurizer.model, train, valid, kernels=("nope",))
