"""Target-aware acquisition (ntkal.acquisition.target), float64: the feature-space variance reduction equals the
kernel-space GP computation and the brute-force drop of the total target variance; greedy conditioning
is exact; a candidate unrelated to the target gains nothing however novel it is; streaming is exact."""
import numpy as np
import pytest
import torch

import ntkal
from ntkal import ENERGY, EMBEDDING, FORCE, RowBlock
from ntkal.acquisition.target import TargetScorer, _Prepared, greedy_select, target_matrix
from tiny import structures, tiny_mace

F64 = torch.float64
RTOL = 1e-9


# --- helpers ------------------------------------------------------------------------------------

def _only(rb, kinds):
    """The rows of `rb` whose kind is in `kinds`, same structures."""
    m = torch.zeros(rb.rows.shape[0], dtype=torch.bool)
    for kd in kinds:
        m |= rb.kind == kd
    counts = torch.bincount(rb.seg[m], minlength=len(rb))
    ptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    return RowBlock(rb.rows[m], ptr, rb.kind[m], rb.natoms, None if rb.atom is None else rb.atom[m])


def _scaled(post, rb):
    """(scaled rows c*g, noise sigma^2 per row, target weight w per row: 1/sigma^2, x 1/N for mean force)."""
    c = torch.ones(rb.rows.shape[0], dtype=F64)
    noise = torch.full((rb.rows.shape[0],), post.sigma_e2, dtype=F64)
    for kind, name in ((ENERGY, "energy"), (FORCE, "force"), (EMBEDDING, "embedding")):
        m = rb.kind == kind
        if name in post.scales:
            c[m] = post.scales[name]
    noise[rb.kind == FORCE] = post.sigma_f2
    natoms_row = torch.repeat_interleave(rb.natoms, rb.ptr[1:] - rb.ptr[:-1]).to(F64)
    w = 1.0 / noise
    if post.force_reduce == "mean":
        w = torch.where(rb.kind == FORCE, w / natoms_row, w)
    return rb.rows.to(F64) * c[:, None], noise, w


def _kernel_space_reduction(post, train, target, cand):
    """tr((S_x + K_post(x,x))^-1 K_post(x,Tg) Omega K_post(Tg,x)) per candidate, from k(a,b) = g~a.g~b only."""
    T, noise_T, _ = _scaled(post, train)
    Tg, _, omega = _scaled(post, target)
    X, noise_X, _ = _scaled(post, cand)
    K_TT = T @ T.T + torch.diag(noise_T)

    def k_post(a, b):
        return a @ b.T - (a @ T.T) @ torch.linalg.solve(K_TT, T @ b.T)

    out = []
    for s in range(len(cand)):
        sl = slice(int(cand.ptr[s]), int(cand.ptr[s + 1]))
        xs = X[sl]
        H = torch.diag(noise_X[sl]) + k_post(xs, xs)
        kxt = k_post(xs, Tg)
        N = kxt @ torch.diag(omega) @ kxt.T
        out.append(torch.trace(torch.linalg.solve(H, N)))
    return torch.stack(out)


def _precision(post, train):
    """Lambda = I + sum_train g~ g~^T / sigma^2, built directly from the rows."""
    T, noise, _ = _scaled(post, train)
    return torch.eye(T.shape[1], dtype=F64) + (T / noise[:, None]).T @ T


def _update(post, rows):
    X, noise, _ = _scaled(post, rows)
    return (X / noise[:, None]).T @ X


def _total_target_variance(post, lam, target):
    """sum_t w_t g~_t^T Lambda^-1 g~_t (the sum of the target structures' scores under Lambda)."""
    Tg, _, w = _scaled(post, target)
    return float((w * (Tg * torch.linalg.solve(lam, Tg.T).T).sum(1)).sum())


def _brute_drop(post, lam, target, cand_one):
    return _total_target_variance(post, lam, target) - _total_target_variance(post, lam + _update(post, cand_one), target)


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data():
    """Rows of one tiny MACE (k = 24) for train / target / candidate structures, per kernel."""
    fz = ntkal.MACEFeaturizer(tiny_mace(seed=31), kernel="joint", sketch_dim=24, dtype=F64, seed=2)
    atoms = {"train": structures(3, seed=32), "target": structures(3, seed=33), "cand": structures(4, seed=34)}
    joint = {key: fz(a) for key, a in atoms.items()}
    emb = fz.with_kernel("embedding")
    probes = fz.with_kernel("force", force_probes=3)
    out = {
        "joint": joint,
        "energy": {key: _only(rb, [ENERGY]) for key, rb in joint.items()},
        "force": {key: _only(rb, [FORCE]) for key, rb in joint.items()},
        "embedding": {key: emb(a) for key, a in atoms.items()},
    }
    # probe mode: exact rows for the posterior and the target, probe rows for the candidates
    out["force-probes"] = dict(out["force"], cand=probes(atoms["cand"]))
    return out


KERNELS = ["energy", "force", "joint", "embedding", "force-probes"]


def _post(rows, force_reduce="mean"):
    return ntkal.Posterior.from_rows(rows["train"], sigma_e2=0.03, sigma_f2=0.005, force_reduce=force_reduce)


# --- equivalences -------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", KERNELS)
def test_feature_space_reduction_equals_kernel_space(data, kernel):
    rows = data[kernel]
    post = _post(rows)
    scorer = TargetScorer(post, target_matrix(post, rows["target"]))
    red = scorer.reduction(rows["cand"])
    assert red.dtype == F64 and red.shape == (len(rows["cand"]),)
    expected = _kernel_space_reduction(post, rows["train"], rows["target"], rows["cand"])
    assert (expected > 0).all()
    torch.testing.assert_close(red, expected, rtol=RTOL, atol=1e-12)
    # the state's total target variance is the sum of the target structures' scores
    assert scorer.target_variance() == pytest.approx(float(post.score(rows["target"]).sum()), rel=1e-10)


@pytest.mark.parametrize("kernel", ["joint", "force-probes", "embedding"])
@pytest.mark.parametrize("force_reduce", ["mean", "sum"])
def test_reduction_is_the_brute_force_drop_of_the_target_variance(data, kernel, force_reduce):
    rows = data[kernel]
    post = _post(rows, force_reduce)
    lam = _precision(post, rows["train"])
    torch.testing.assert_close(lam, torch.linalg.inv(post.Linv.T @ post.Linv), rtol=1e-8, atol=1e-8)
    assert _total_target_variance(post, lam, rows["target"]) == pytest.approx(
        float(post.score(rows["target"]).sum()), rel=1e-10)
    red = TargetScorer(post, target_matrix(post, rows["target"])).reduction(rows["cand"])
    brute = torch.tensor([_brute_drop(post, lam, rows["target"], rows["cand"].select([s]))
                          for s in range(len(rows["cand"]))], dtype=F64)
    torch.testing.assert_close(red, brute, rtol=1e-8, atol=1e-10)


def test_one_row_fast_path_equals_the_batched_solve(data):
    rows = data["energy"]
    post = _post(rows)
    scorer = TargetScorer(post, target_matrix(post, rows["target"]))
    prep = _Prepared(post, rows["cand"])
    assert [P.shape[1] for _, P in prep.buckets] == [1]
    torch.testing.assert_close(scorer._reduce(prep, quadform=True), scorer._reduce(prep, quadform=False),
                               rtol=1e-11, atol=1e-14)


def test_condition_equals_refitting_with_the_candidates_added(data):
    rows = data["joint"]
    post = _post(rows)
    scorer = TargetScorer(post, target_matrix(post, rows["target"]))
    scorer.condition(rows["cand"].select([1, 3]))  # two structures at once
    lam = _precision(post, rows["train"]) + _update(post, rows["cand"].select([1, 3]))
    assert scorer.target_variance() == pytest.approx(_total_target_variance(post, lam, rows["target"]), rel=1e-9)
    # kernel space with the conditioned structures appended to the training rows
    train_plus = RowBlock.cat([rows["train"], rows["cand"].select([1, 3])])
    expected = _kernel_space_reduction(post, train_plus, rows["target"], rows["cand"])
    torch.testing.assert_close(scorer.reduction(rows["cand"]), expected, rtol=1e-8, atol=1e-10)
    # the posterior itself is untouched
    assert scorer.post.Linv is post.Linv


# --- greedy selection ---------------------------------------------------------------------------

def test_greedy_picks_are_exact_sequential_reductions(data):
    rows = data["joint"]
    post = _post(rows)
    C_T = target_matrix(post, rows["target"])
    cand = rows["cand"]
    idx, red = greedy_select(post, C_T, cand, 3)
    assert idx.dtype == np.int64 and red.dtype == np.float64
    assert len(set(idx.tolist())) == 3
    first = TargetScorer(post, C_T).reduction(cand)
    assert idx[0] == int(torch.argmax(first)) and red[0] == pytest.approx(float(first.max()), rel=1e-12)
    lam = _precision(post, rows["train"])
    for t in range(1, 3):
        lam = lam + _update(post, cand.select([int(idx[t - 1])]))
        drops = [(_brute_drop(post, lam, rows["target"], cand.select([s])), s)
                 for s in range(len(cand)) if s not in idx[:t].tolist()]
        best, best_s = max(drops, key=lambda d: (d[0], -d[1]))
        assert idx[t] == best_s
        assert red[t] == pytest.approx(best, rel=1e-8)
    # the reductions add up: target variance after all picks = before - sum of reductions
    lam = lam + _update(post, cand.select([int(idx[2])]))
    assert TargetScorer(post, C_T).target_variance() - red.sum() == pytest.approx(
        _total_target_variance(post, lam, rows["target"]), rel=1e-8)


def _synthetic(multi_row, seed):
    """Train and target rows in the subspace S = span(e_0..e_5) of R^12; candidates:
    0: a copy of target structure 0; 1: large rows in S-perp (novel, unrelated to the target);
    2: small rows in S; 3: another copy-like structure near target structure 1."""
    g = torch.Generator().manual_seed(seed)
    k, d = 12, 6
    r = 4 if multi_row else 1

    def in_s(n, scale=1.0):
        x = torch.zeros(n * r, k, dtype=F64)
        x[:, :d] = scale * torch.randn(n * r, d, generator=g, dtype=F64)
        return x

    def block(x):
        n = x.shape[0] // r
        kind = torch.tensor(([ENERGY] + [FORCE] * (r - 1)) * n, dtype=torch.int8)
        return RowBlock(x, torch.arange(n + 1) * r, kind, torch.full((n,), 2, dtype=torch.int64))

    train, target = block(in_s(8)), block(in_s(3))
    perp = torch.zeros(r, k, dtype=F64)
    perp[:, d:] = 10.0 * torch.randn(r, k - d, generator=g, dtype=F64)
    near = target.rows[r:2 * r] + 0.1 * in_s(1)
    cand = block(torch.cat([target.rows[:r].clone(), perp, in_s(1, 0.05), near]))
    return train, target, cand


@pytest.mark.parametrize("multi_row", [False, True])
def test_unrelated_novelty_gains_nothing_and_target_copies_gain_most(multi_row):
    train, target, cand = _synthetic(multi_row, seed=41 + multi_row)
    post = ntkal.Posterior.from_rows(train, sigma_e2=0.02, sigma_f2=0.01)
    C_T = target_matrix(post, target)
    red = TargetScorer(post, C_T).reduction(cand)
    pv = post.score(cand)
    assert int(torch.argmax(pv)) == 1  # the unrelated candidate is by far the most novel ...
    assert float(pv[1]) > 10 * float(pv[[0, 2, 3]].max())
    assert abs(float(red[1])) < 1e-12 * float(red.max())  # ... and would not help the target at all
    assert int(torch.argmax(red)) in (0, 3) and float(red[0]) > 10 * float(red[2])
    # exact zero for the unrelated one in kernel space too
    expected = _kernel_space_reduction(post, train, target, cand)
    torch.testing.assert_close(red, expected, rtol=RTOL, atol=1e-12)
    idx, r_at = greedy_select(post, C_T, cand, 3)
    assert 1 not in idx.tolist()
    assert (r_at > 0).all()  # every pick helps the target


def test_greedy_ties_go_to_the_lower_index():
    train, target, cand = _synthetic(False, seed=7)
    dup = RowBlock.cat([cand.select([2]), cand.select([0]), cand.select([0])])
    post = ntkal.Posterior.from_rows(train)
    idx, _ = greedy_select(post, target_matrix(post, target), dup, 1)
    assert idx.tolist() == [1]


# --- streaming ----------------------------------------------------------------------------------

def test_streaming_target_matrix_and_reduction_equal_one_block(data):
    rows = data["joint"]
    post = _post(rows)
    tg = rows["target"]
    whole = target_matrix(post, tg)
    chunked = target_matrix(post, iter([tg.select([0]), tg.select([1, 2])]))
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)
    assert torch.equal(whole, whole.T) and whole.dtype == F64
    scorer = TargetScorer(post, whole)
    cand = rows["cand"]
    one = scorer.reduction(cand)
    parts = torch.cat([scorer.reduction(cand.select([0, 1])), scorer.reduction(cand.select([2])),
                       scorer.reduction(cand.select([3]))])
    torch.testing.assert_close(parts, one, rtol=1e-12, atol=1e-15)
    assert scorer.reduction(cand.select([])).shape == (0,)


# --- errors -------------------------------------------------------------------------------------

def test_bad_targets_and_candidates_are_clear_errors(data):
    post = _post(data["energy"])
    with pytest.raises(ntkal.NtkalError, match="empty"):
        target_matrix(post, [])
    with pytest.raises(ntkal.NtkalError, match="empty"):
        target_matrix(post, data["energy"]["target"].select([]))
    with pytest.raises(ntkal.NtkalError, match="force rows"):
        target_matrix(post, data["joint"]["target"])  # the posterior knows no force rows
    with pytest.raises(ntkal.NtkalError, match="width"):
        target_matrix(post, data["embedding"]["target"])
    C_T = target_matrix(post, data["energy"]["target"])
    with pytest.raises(ntkal.NtkalError, match="force rows"):
        TargetScorer(post, C_T).reduction(data["force"]["cand"])
    with pytest.raises(ntkal.NtkalError, match="target matrix"):
        TargetScorer(post, torch.zeros(3, 3, dtype=F64))
    with pytest.raises(ValueError, match="budget"):
        greedy_select(post, C_T, data["energy"]["cand"], 5)
