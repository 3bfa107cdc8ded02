"""Posterior (docs/design.md, Posterior) in float64: feature-space PV equals the kernel-space GP posterior variance."""
import numpy as np
import pytest
import torch

import ntkal
from ntkal import ENERGY, EMBEDDING, FORCE, RowBlock
from ntkal.acquisition.scorers import ErrorScorer, PVScorer
from ntkal.posterior import Accumulator, Posterior, robust_cholesky
from ntkal.runstate import state_from_bytes, state_to_bytes
from tiny import structures, tiny_mace

F64 = torch.float64


@pytest.fixture(scope="module")
def featurizer():
    return ntkal.MACEFeaturizer(tiny_mace(seed=21), kernel="joint", sketch_dim=24, dtype=F64, seed=1)


def _kernel_space_variances(post, train, pool):
    """GP variance k(x,x) - k(x,T)(K_TT + Sigma)^-1 k(T,x) on scaled rows, per pool row."""
    def scaled(rb):
        c = torch.ones(rb.rows.shape[0], dtype=F64)
        noise = torch.ones(rb.rows.shape[0], dtype=F64)
        for kind, name in ((ENERGY, "energy"), (FORCE, "force"), (EMBEDDING, "embedding")):
            m = rb.kind == kind
            if name in post.scales:
                c[m] = post.scales[name]
            noise[m] = post.sigma_f2 if kind == FORCE else post.sigma_e2
        return rb.rows * c[:, None], noise
    T, noise = scaled(train)
    X, _ = scaled(pool)
    K = T @ T.T + torch.diag(noise)
    kxT = X @ T.T
    return (X * X).sum(1) - (kxT * torch.linalg.solve(K, kxT.T).T).sum(1)


@pytest.mark.parametrize("kernel", ["embedding", "energy", "force", "joint"])
def test_feature_space_pv_equals_kernel_space_gp_variance(featurizer, kernel):
    fz = featurizer.with_kernel(kernel)
    train, pool = fz(structures(5, seed=22)), fz(structures(4, seed=23))
    post = ntkal.Posterior.from_rows(train, sigma_e2=0.03, sigma_f2=0.005)
    gp = _kernel_space_variances(post, train, pool)
    row_variances = post.variances(pool)[1] * post.row_scale(pool.kind) ** 2  # v(c g) = c² ‖L⁻¹g‖²
    torch.testing.assert_close(row_variances, gp, rtol=1e-9, atol=1e-12)
    # the structure score is the noise-normalised, force-averaged sum of those variances
    natoms_row = torch.repeat_interleave(pool.natoms, pool.ptr[1:] - pool.ptr[:-1]).to(F64)
    w = torch.where(pool.kind == FORCE, 1 / (post.sigma_f2 * natoms_row), torch.full_like(natoms_row, 1 / post.sigma_e2))
    expected = torch.zeros(len(pool), dtype=F64).index_add_(0, pool.seg, w * gp)
    torch.testing.assert_close(post.score(pool), expected, rtol=1e-9, atol=1e-12)


def test_scales_make_each_kind_average_one_on_the_training_set(featurizer):
    train = featurizer(structures(6, seed=24))
    post = ntkal.Posterior.from_rows(train)
    ident = ntkal.Posterior.from_rows(train)
    ident.Linv = torch.eye(post.k, dtype=F64)  # Lambda = I: the score parts are plain squared norms
    ident.sigma_e2 = ident.sigma_f2 = 1.0
    per_kind = {}
    for kind, name in ((ENERGY, "energy"), (FORCE, "force")):
        m = train.kind == kind
        rb = RowBlock(train.rows[m], torch.cat([torch.zeros(1, dtype=torch.int64),
                      torch.cumsum(torch.bincount(train.seg[m], minlength=len(train)), 0)]),
                      train.kind[m], train.natoms, train.atom[m])
        per_kind[name] = float(ident.score(rb).mean())
    assert per_kind["energy"] == pytest.approx(1.0, rel=1e-10)
    assert per_kind["force"] == pytest.approx(1.0, rel=1e-10)


def test_chunked_accumulation_equals_one_block(featurizer):
    train = featurizer(structures(6, seed=25))
    whole = ntkal.Posterior.from_rows(train)
    chunks = ntkal.Posterior.from_rows([train.select([0, 1]), train.select([2]), train.select([3, 4, 5])])
    torch.testing.assert_close(chunks.L, whole.L, rtol=1e-12, atol=1e-12)
    assert chunks.scales == pytest.approx(whole.scales, rel=1e-12)


def test_atom_variances_average_to_the_force_part(featurizer):
    fz = featurizer.with_kernel("force")
    post = ntkal.fit(fz, structures(4, seed=26))
    pool = fz(structures(3, seed=27))
    scores, row_out = post.variances(pool)
    atom_var = post.atom_split(pool, row_out)
    for s, v in enumerate(atom_var):
        assert v.shape == (int(pool.natoms[s]),) and (v > 0).all()
        assert v.mean() == pytest.approx(float(scores[s]), rel=1e-10)


def test_variance_shrinks_where_training_data_is():
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(30, 8, generator=g, dtype=F64)
    rb = RowBlock(rows, torch.arange(31), torch.zeros(30, dtype=torch.int8), torch.ones(30, dtype=torch.int64))
    post = ntkal.Posterior.from_rows(rb.select(range(20)))
    s_train, s_new = post.score(rb.select(range(20))), post.score(rb.select(range(20, 30)))
    assert s_train.mean() < s_new.mean()


def test_robust_cholesky_adds_and_reports_jitter():
    g = torch.Generator().manual_seed(6)
    v = torch.randn(6, 2, generator=g, dtype=F64)
    A = v @ v.T  # rank 2: plain Cholesky fails
    L, jitter = robust_cholesky(A)
    assert jitter > 0
    torch.testing.assert_close(L @ L.T, A + jitter * torch.eye(6, dtype=F64), rtol=1e-8, atol=1e-8)
    L, jitter = robust_cholesky(A + torch.eye(6, dtype=F64))
    assert jitter == 0.0


def test_bad_training_rows_are_errors():
    with pytest.raises(ntkal.NtkalError, match="empty"):
        ntkal.Posterior.from_rows([])
    rows = torch.full((2, 4), float("nan"), dtype=F64)
    rb = RowBlock(rows, torch.arange(3), torch.zeros(2, dtype=torch.int8), torch.ones(2, dtype=torch.int64))
    with pytest.raises(ntkal.NtkalError, match="NaN"):
        ntkal.Posterior.from_rows(rb)


# --- plain state (checkpoints, a saved posterior) ------------------------------------------------

def _random_rows(g, n, k, kinds=(0, 1)):
    """n structures of 1..3 atoms: an energy row and 3N exact force rows each (or energy rows only)."""
    natoms = torch.randint(1, 4, (n,), generator=g)
    force = 1 in kinds
    counts = 1 + 3 * natoms if force else torch.ones(n, dtype=torch.int64)
    ptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    kind = torch.cat([torch.tensor([ENERGY] + [FORCE] * (3 * int(a) if force else 0), dtype=torch.int8)
                      for a in natoms])
    atom = torch.cat([torch.tensor([-1] + ([i // 3 for i in range(3 * int(a))] if force else [])) for a in natoms])
    return RowBlock(torch.randn(int(ptr[-1]), k, generator=g, dtype=F64), ptr, kind, natoms, atom)


def _fitted(seed, residuals=True):
    g = torch.Generator().manual_seed(seed)
    acc = Accumulator()
    for _ in range(3):
        rows = _random_rows(g, 7, 9)
        acc.add(rows, residuals=torch.randn(rows.rows.shape[0], generator=g, dtype=F64) if residuals else None)
    post = Posterior.from_accumulator(acc, sigma_e2=0.02, sigma_f2=0.007)
    post.info.update({"featurizer": {"kernel": "joint", "sketch_dim": 9, "coverage": 0.5, "head": None},
                      "score_fallback": "why not"})
    return post, g


def _through_bytes(state):
    return state_from_bytes(state_to_bytes(state))  # safetensors + JSON, as checkpoints store it


@pytest.mark.parametrize("residuals", [True, False])
def test_posterior_state_round_trip_is_exact_and_scores_the_same(residuals):
    post, g = _fitted(80 + residuals, residuals)
    back = Posterior.from_state(_through_bytes(post.to_state()))
    for name in ("L", "Linv"):
        got, want = getattr(back, name), getattr(post, name)
        assert got.dtype == F64 and torch.equal(got, want)
        assert got.stride() == want.stride()  # the layout too: BLAS rounds products by layout
    for name in ("scales", "sigma_e2", "sigma_f2", "force_reduce", "jitter", "n_train", "info"):
        assert getattr(back, name) == getattr(post, name), name
    assert back.summary() == post.summary()
    if residuals:
        assert torch.equal(back.residual.mean, post.residual.mean) and back.residual.mean.dtype == F64
        for name in ("rho", "alpha2", "alpha2_pv", "resid_ms", "calibration"):
            assert getattr(back.residual, name) == getattr(post.residual, name), name
    else:
        assert back.residual is None
    fresh = _random_rows(g, 11, 9)
    torch.testing.assert_close(back.score(fresh), post.score(fresh), rtol=1e-12, atol=1e-12)
    scorers = [PVScorer] + ([ErrorScorer] if residuals else [])
    for scorer in scorers:  # the same bits, so that a resumed run writes what an uninterrupted one writes
        a, b = scorer(post)(fresh), scorer(back)(fresh)
        np.testing.assert_array_equal(b.key, a.key)
        for name in a.values:
            np.testing.assert_array_equal(b.values[name], a.values[name])


def test_posterior_state_is_plain_and_versioned():
    post, _ = _fitted(83)
    state = post.to_state()

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, (str, bool, int, float, torch.Tensor, np.ndarray))
    assert plain(state) and state["format"] == "ntkal.Posterior/1"
    with pytest.raises(ValueError, match="format"):
        Posterior.from_state({**state, "format": "something else"})
