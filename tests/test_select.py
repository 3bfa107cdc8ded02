"""Shortlist and batch selection (DESIGN §4-5): LCMD equals bmdal_reg's, streaming is chunk-independent."""
import numpy as np
import pytest
import torch

import ntkal
from ntkal import RowBlock
from ntkal.select import TopM

F64 = torch.float64


def _features(seed, n_train=40, n_pool=600, d=12):
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, -1.5, d, dtype=F64)  # anisotropic, like real NTK features
    return (torch.randn(n_train, d, generator=g, dtype=F64) * spectrum,
            torch.randn(n_pool, d, generator=g, dtype=F64) * spectrum * 1.5)


def _bmdal(train, pool, budget, **kw):
    np.Inf = np.inf  # bmdal_reg 3.0.2 still uses the NumPy 1 alias
    from bmdal_reg.bmdal.algorithms import select_batch
    from bmdal_reg.bmdal.feature_data import TensorFeatureData
    idx, _ = select_batch(batch_size=budget, models=[torch.nn.Identity()],
                          data={"train": TensorFeatureData(train), "pool": TensorFeatureData(pool)},
                          y_train=None, base_kernel="linear", selection_method="lcmd", verbosity=0, **kw)
    return idx.numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lcmd_tp_equals_bmdal(seed):
    pytest.importorskip("bmdal_reg")
    train, pool = _features(seed)
    ref = _bmdal(train, pool, 25, kernel_transforms=[], sel_with_train=True)
    np.testing.assert_array_equal(ntkal.lcmd(pool, train, 25, mode="tp"), ref)


@pytest.mark.parametrize("seed", [0, 1])
def test_lcmd_p_equals_bmdal(seed):
    pytest.importorskip("bmdal_reg")
    train, pool = _features(seed)
    ref = _bmdal(train, pool, 25, kernel_transforms=[], sel_with_train=False)
    np.testing.assert_array_equal(ntkal.lcmd(pool, None, 25, mode="p"), ref)


def test_lcmd_p_with_posterior_transform_equals_bmdal():
    """P mode on L^-1 psi is bmdal's LCMD-P after its ('train', [sigma]) posterior transform."""
    pytest.importorskip("bmdal_reg")
    train, pool = _features(3)
    sigma = 0.3
    rows = RowBlock(train, torch.arange(len(train) + 1), torch.zeros(len(train), dtype=torch.int8),
                    torch.ones(len(train), dtype=torch.int64), psi=train)
    post = ntkal.Posterior.from_rows(rows, sigma_e2=sigma ** 2)
    post.scales["energy"], post.psi_scale = 1.0, 1.0  # bmdal's transform has no feature scaling
    lam = torch.eye(train.shape[1], dtype=F64) + train.T @ train / sigma ** 2
    post.Linv = torch.linalg.inv(torch.linalg.cholesky(lam))
    ref = _bmdal(train, pool, 20, kernel_transforms=[("train", [sigma])], sel_with_train=False)
    np.testing.assert_array_equal(ntkal.lcmd(post.transform(pool), None, 20, mode="p"), ref)


def test_lcmd_picks_distinct_points_and_fills_up_when_stuck():
    train, pool = _features(4, n_pool=30)
    idx = ntkal.lcmd(pool, train, 30)
    assert sorted(idx.tolist()) == list(range(30))
    dup = torch.zeros(10, 3, dtype=F64)  # every candidate on a training point: no cluster has size
    idx, status = ntkal.lcmd(dup, torch.zeros(1, 3, dtype=F64), 4, return_status=True)
    assert len(set(idx.tolist())) == 4
    with pytest.raises(ValueError, match="budget"):
        ntkal.lcmd(pool, train, 31)


def test_topm_is_independent_of_chunking():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 50, size=500).astype(float)  # many ties
    whole = TopM(37)
    whole.add(keys, np.arange(500))
    chunked = TopM(37)
    for a in range(0, 500, 23):
        chunked.add(keys[a:a + 23], np.arange(a, min(a + 23, 500)))
    np.testing.assert_array_equal(whole.index, chunked.index)
    order = np.lexsort((np.arange(500), -keys))[:37]
    np.testing.assert_array_equal(whole.index, order)


def _rowblocks(seed, n, k=10):
    g = torch.Generator().manual_seed(seed)
    natoms = torch.randint(1, 5, (n,), generator=g)
    counts = 1 + 3 * natoms
    ptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    kind = torch.cat([torch.tensor([0] + [1] * (3 * int(a)), dtype=torch.int8) for a in natoms])
    atom = torch.cat([torch.tensor([-1] + [i // 3 for i in range(3 * int(a))]) for a in natoms])
    return RowBlock(torch.randn(int(ptr[-1]), k, generator=g, dtype=F64), ptr, kind, natoms, atom)


@pytest.mark.parametrize("method", ["lcmd", "top", "random"])
def test_select_rows_is_deterministic_and_chunk_independent(method):
    train, pool = _rowblocks(1, 30), _rowblocks(2, 300)
    a = ntkal.select_rows(train, pool, 12, method=method, shortlist=50, seed=7)
    chunks = [pool.select(range(i, min(i + 37, 300))) for i in range(0, 300, 37)]
    b = ntkal.select_rows(train, iter(chunks), 12, method=method, shortlist=50, seed=7)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.scores, b.scores)
    assert len(set(a.indices.tolist())) == 12 and a.n_pool == 300
    full = ntkal.Posterior.from_rows(train).score(pool).numpy()
    np.testing.assert_allclose(a.shortlist_scores, np.sort(full)[::-1][:50])
    if method == "top":
        np.testing.assert_array_equal(a.indices, np.argsort(-full, kind="stable")[:12])
    if method == "lcmd":
        assert set(a.indices.tolist()) <= set(a.shortlist.tolist())


def test_select_rows_errors():
    train, pool = _rowblocks(3, 5), _rowblocks(4, 6)
    with pytest.raises(ntkal.InputError, match="larger than the pool"):
        ntkal.select_rows(train, pool, 7)
    with pytest.raises(ntkal.InputError, match="empty"):
        ntkal.select_rows(train, iter([]), 1)


def test_select_rows_lcmd_tp_uses_the_training_centres():
    train, pool = _rowblocks(5, 20), _rowblocks(6, 200)
    res = ntkal.select_rows(train, pool, 8, shortlist=60)
    post = res.posterior
    psi = pool.lcmd_vectors().double() * post.psi_scale
    centres = train.lcmd_vectors().double() * post.psi_scale
    torch.testing.assert_close(post.train_psi, centres)
    sl = torch.as_tensor(res.shortlist)
    np.testing.assert_array_equal(res.indices, res.shortlist[ntkal.lcmd(psi[sl], centres, 8)])
    p_mode = ntkal.select_rows(train, pool, 8, shortlist=60, mode="p")
    np.testing.assert_array_equal(p_mode.indices, res.shortlist[ntkal.lcmd(post.transform(psi[sl]), None, 8, mode="p")])
