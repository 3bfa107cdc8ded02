"""Shortlist and batch selection (docs/design.md, Pipeline): LCMD equals bmdal_reg's, streaming is chunk-independent."""
import numpy as np
import pytest
import torch

import ntkal
from ntkal import RowBlock
from ntkal.acquisition.atoms_state import atoms_from_state, atoms_to_state
from ntkal.acquisition.candidates import Candidate, Shortlist, TopM, random_keys
from ntkal.acquisition.centres import Centres
from ntkal.acquisition.distances import lcmd_vectors
from ntkal.acquisition.pipeline import Pipeline
from ntkal.acquisition.scorers import PVScorer
from ntkal.acquisition.streams import Stream
from ntkal.options import Options
from ntkal.runstate import state_from_bytes, state_to_bytes

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
    post.scales["energy"] = 1.0  # bmdal's transform has no feature scaling
    lam = torch.eye(train.shape[1], dtype=F64) + train.T @ train / sigma ** 2
    post.Linv = torch.linalg.inv(torch.linalg.cholesky(lam))
    ref = _bmdal(train, pool, 20, kernel_transforms=[("train", [sigma])], sel_with_train=False)
    np.testing.assert_array_equal(ntkal.lcmd(pool.to(F64) @ post.Linv.T, None, 20, mode="p"), ref)


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
    post, scale = res.posterior, res.centres.scale
    psi = lcmd_vectors(pool)[0] * scale  # joint rows: energy row | force-kernel sketch, each part scaled
    centres = lcmd_vectors(train)[0] * scale
    torch.testing.assert_close(res.centres.psi, centres)
    for part in (slice(0, 10), slice(10, 20)):  # each part has mean squared norm 1 over the training set
        assert float(centres[:, part].square().sum(1).mean()) == pytest.approx(1.0, rel=1e-12)
    sl = torch.as_tensor(res.shortlist)
    f32 = torch.float32  # LCMD runs on float32 vectors (selectors.LCMD_DTYPE); the posterior in float64
    np.testing.assert_array_equal(res.indices, res.shortlist[ntkal.lcmd(psi[sl].to(f32), centres.to(f32), 8)])
    p_mode = ntkal.select_rows(train, pool, 8, shortlist=60, mode="p")
    psi_p = lcmd_vectors(pool, linv=post.Linv)[0] * scale  # P mode: vectors of L^-1 g
    np.testing.assert_array_equal(p_mode.indices, res.shortlist[ntkal.lcmd(psi_p[sl].to(f32), None, 8, mode="p")])


def _unfiltered(m, keys, index, payload):
    ref = TopM(m)
    ref.add(keys, index, payload)
    return ref


@pytest.mark.parametrize("chunk", [1, 7, 64, 500])
def test_prefiltered_shortlist_equals_unfiltered_with_ties(chunk):
    """Shortlist builds records only for rows that can still enter; the top-m and the reservoir are unchanged."""
    rng = np.random.default_rng(1)
    n, m, n_random = 500, 37, 11
    keys = rng.integers(0, 40, size=n).astype(float)  # many ties
    rkeys = random_keys(5, 0, n)
    built = []
    state, ref_top, ref_rnd = Shortlist(m, n_random, seed=5), TopM(m), TopM(n_random)
    for a in range(0, n, chunk):
        idx = np.arange(a, min(a + chunk, n))
        payload = [("row", int(i)) for i in idx]
        ref_top.add(keys[idx], idx, payload)
        ref_rnd.add(rkeys[idx], idx, payload)
        state.add(keys[idx], a, lambda pos, idx=idx: [built.append(int(idx[p])) or ("row", int(idx[p])) for p in pos])
    for got, ref in ((state.top, ref_top), (state.rnd, ref_rnd)):
        np.testing.assert_array_equal(got.index, ref.index)
        np.testing.assert_array_equal(got.keys, ref.keys)
        assert got.payload == ref.payload
    assert len(built) == len(set(built))  # each row's record built at most once, shared by both lists
    if chunk > m:
        assert len(built) < n
    zero = Shortlist(0)  # `ntkal score` scans with m = 0: no record is ever built
    zero.add(keys, 0, lambda pos: pytest.fail("record built for m = 0"))
    assert len(zero.top) == 0


def test_random_keys_do_not_depend_on_chunking():
    whole = random_keys(9, 0, 103)
    parts = np.concatenate([random_keys(9, a, min(10, 103 - a)) for a in range(0, 103, 10)])
    np.testing.assert_array_equal(whole, parts)
    assert not np.array_equal(whole, random_keys(10, 0, 103))


def test_scan_prefiltered_equals_unfiltered_records():
    """Same indices, keys and records (score, float64 scaled psi) as adding every pool row; ties included."""
    train, base = _rowblocks(7, 20), _rowblocks(8, 60)
    pool = RowBlock.cat([base, base, base])  # every structure three times: tied scores across chunks
    post, centres = ntkal.Posterior.from_rows(train), Centres.from_rows(train, seed=3)
    blocks = [pool.select(range(i, min(i + 25, len(pool)))) for i in range(0, len(pool), 25)]
    pipe = Pipeline(Options(budget=1, seed=3).validate())
    state, n = pipe.scan(Stream(iter(blocks), rows=True), post, PVScorer(post), 40, 40, centres=centres)
    assert n == len(pool)
    draws = random_keys(3, 0, len(pool))
    ref_top, ref_rnd, off = TopM(40), TopM(40), 0
    for b in blocks:
        s = post.score(b).numpy()
        psi = lcmd_vectors(b, seed=3)[0] * centres.scale
        idx = np.arange(off, off + len(b))
        ref_top.add(s, idx, list(zip(s, psi)))
        ref_rnd.add(draws[idx], idx, list(zip(s, psi)))
        off += len(b)
    assert len(np.unique(ref_top.keys)) < len(ref_top.keys)  # the case has ties
    for got, ref in ((state.top, ref_top), (state.rnd, ref_rnd)):
        np.testing.assert_array_equal(got.index, ref.index)
        np.testing.assert_array_equal(got.keys, ref.keys)
        assert [c.values["score"] for c in got.payload] == [p[0] for p in ref.payload]
        for c, (_, b) in zip(got.payload, ref.payload):
            assert c.psi.dtype == F64 and torch.equal(c.psi, b) and c.psi.untyped_storage().nbytes() == c.psi.numel() * 8


@pytest.mark.parametrize("mode", ["tp", "p"])
def test_lcmd_float32_picks_as_float64(mode):
    """pick() runs LCMD on float32 vectors: on a fresh random case the picks equal the float64 ones.

    They can differ only where two squared distances (or two cluster sizes) agree to within float32
    rounding (~1e-7 relative), i.e. on near-ties, which random continuous features do not produce.
    """
    train, pool = _features(21, n_train=300, n_pool=1500, d=64)
    centres = train if mode == "tp" else None
    want = ntkal.lcmd(pool, centres, 60, mode=mode)
    got = ntkal.lcmd(pool.float(), None if centres is None else centres.float(), 60, mode=mode)
    np.testing.assert_array_equal(got, want)


# --- plain checkpoint state: exact round trips ----------------------------------------------------

def _through_bytes(state):
    return state_from_bytes(state_to_bytes(state))  # safetensors + JSON, as checkpoints store it


def _same(a, b):
    """Equal in type and value (NaN equal to NaN), recursively; arrays and tensors also in dtype."""
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and \
            bool(np.all((a == b) | ((a != a) & (b != b))) if a.dtype.kind in "fc" else np.array_equal(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


def _odd_atoms(seed):
    """A structure with every kind of value a reader or a user may attach: fresh random float64 numbers."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms
    rng = np.random.default_rng(seed)
    n = 5
    a = Atoms(numbers=rng.choice([1, 6, 8, 14], n), positions=rng.normal(size=(n, 3)) * 3,
              cell=rng.normal(size=(3, 3)) + 6 * np.eye(3), pbc=[True, False, True], celldisp=rng.normal(size=3))
    a.info.update({"REF_energy": float(rng.normal()), "name": "frame 7", "step": 12, "ok": True, "none": None,
                   "nan": float("nan"), "inf": -np.inf, "f32": np.float32(rng.normal()), "i64": np.int64(-3),
                   "pair": (1, 2.5), "nested": {"a": [1, "b", np.float64(0.25)], 3: "int key"},
                   "vec": rng.normal(size=3), "flags": np.array([True, False]), "words": np.array(["x", "yz"])})
    a.arrays["REF_forces"] = rng.normal(size=(n, 3))
    a.arrays["tags32"] = rng.integers(0, 9, n).astype(np.int32)
    a.arrays["label"] = np.array(["p", "q", "r", "s", "t"])
    a.set_constraint(FixAtoms(indices=[0, 3]))
    a.calc = SinglePointCalculator(a, energy=float(rng.normal()), forces=rng.normal(size=(n, 3)),
                                   stress=rng.normal(size=6))
    return a


def _assert_same_atoms(b, a):
    assert _same(b.numbers, a.numbers) and _same(b.positions, a.positions)
    assert _same(b.cell.array, a.cell.array) and _same(b.pbc, a.pbc) and _same(b.get_celldisp(), a.get_celldisp())
    assert _same(b.info, a.info)
    assert _same(b.arrays, a.arrays)
    assert [c.todict() for c in b.constraints] == [c.todict() for c in a.constraints]
    assert (a.calc is None) == (b.calc is None)
    if a.calc is not None:
        assert _same(b.calc.results, a.calc.results)


def test_atoms_state_round_trip_is_exact():
    a = _odd_atoms(90)
    _assert_same_atoms(atoms_from_state(_through_bytes(atoms_to_state(a))), a)


def _candidate(g, index, atoms=None):
    return Candidate(index, float(torch.randn(1, generator=g, dtype=F64)), torch.randn(7, generator=g, dtype=F64),
                     atoms, {"score": float(torch.rand(1, generator=g, dtype=F64)), "force_error": float("nan")},
                     {"atom_variance": torch.rand(3, generator=g, dtype=F64).numpy(), "atom_force_error": None})


def test_candidate_state_round_trip_is_exact():
    g = torch.Generator().manual_seed(91)
    for c in (_candidate(g, 4, _odd_atoms(92)), _candidate(g, 5)):
        b = Candidate.from_state(_through_bytes(c.to_state()))
        assert b.index == c.index and _same(b.key, c.key) and _same(b.psi, c.psi)
        assert _same(b.values, c.values) and _same(b.atom_values, c.atom_values)
        if c.atoms is None:
            assert b.atoms is None
        else:
            _assert_same_atoms(b.atoms, c.atoms)


def test_shortlist_state_round_trip_is_exact_and_keeps_shared_records():
    g = torch.Generator().manual_seed(93)
    sl = Shortlist(6, 4, seed=11)
    atoms = [_odd_atoms(94 + i) for i in range(40)]
    for start in range(0, 40, 9):
        keys = torch.randn(min(9, 40 - start), generator=g, dtype=F64).numpy()
        sl.add(keys, start, lambda pos, start=start: [_candidate(g, start + int(p), atoms[start + int(p)]) for p in pos])
    shared = {id(c) for c in sl.top.payload} & {id(c) for c in sl.rnd.payload}
    back = Shortlist.from_state(_through_bytes(sl.to_state()))
    assert back.seed == sl.seed
    for got, want in ((back.top, sl.top), (back.rnd, sl.rnd)):
        assert got.m == want.m and _same(got.keys, want.keys) and _same(got.index, want.index)
        for x, y in zip(got.payload, want.payload):
            assert x.index == y.index and _same(x.psi, y.psi) and _same(x.values, y.values)
            _assert_same_atoms(x.atoms, y.atoms)
    back_shared = {id(c) for c in back.top.payload} & {id(c) for c in back.rnd.payload}
    assert len(back_shared) == len(shared)  # a record in both lists is still one record
    keys = torch.randn(9, generator=g, dtype=F64).numpy()  # and it goes on as the original would
    for x in (sl, back):
        x.add(keys, 40, lambda pos: [Candidate(40 + int(p), float(keys[p]), torch.zeros(7, dtype=F64)) for p in pos])
    assert _same(back.top.index, sl.top.index) and _same(back.rnd.index, sl.rnd.index)


@pytest.mark.parametrize("joint", [True, False])
def test_centres_state_round_trip_is_exact(joint):
    rows = _rowblocks(95, 12)
    if not joint:
        rows = rows.only([0])
    centres = Centres.from_rows([rows.select(range(5)), rows.select(range(5, 12))], seed=4)
    assert isinstance(centres.scale, torch.Tensor) == joint
    back = Centres.from_state(_through_bytes(centres.to_state()))
    assert _same(back.psi, centres.psi) and _same(back.scale, centres.scale) and back.seed == centres.seed
    pool = _rowblocks(96, 5)
    assert _same(back.vectors(pool), centres.vectors(pool))


class _Killed(Exception):
    pass


def test_resumed_select_writes_the_same_bytes(tmp_path):
    """A select run killed mid-scan and run again with the same checkpoint resumes from the saved posterior,
    centres and shortlist (records with their structures) and writes the bytes of an uninterrupted run."""
    from ntkal.io import write_extxyz
    from ntkal.runstate import Checkpoint, Dist
    from tiny import structures, tiny_mace
    fz = ntkal.MACEFeaturizer(tiny_mace(seed=97), kernel="energy", sketch_dim=12, dtype=F64, seed=3)
    train = structures(4, seed=98)
    pool = structures(14, seed=99)
    for i, a in enumerate(pool):  # values of every kind a pool file may carry
        a.info.update({"name": f"frame {i}", "step": i, "vec": np.arange(3.0) * i, "flag": bool(i % 2)})
        a.arrays["weights"] = np.linspace(0, 1, len(a))
    opts = Options(budget=5, shortlist=14, chunk_size=2, score="pv", seed=3).validate()

    def run(out, train, on_chunk=None, ckpt=None):
        res = Pipeline(opts, fz, checkpoint=ckpt).select(train, pool, on_chunk=on_chunk)
        write_extxyz(out, res.atoms)
        return res

    ref = run(tmp_path / "ref.extxyz", train)
    folder = tmp_path / "picks.extxyz.ntkal-ckpt"

    def kill(c, *_):
        if c == 4:
            raise _Killed
    with pytest.raises(_Killed):
        with Checkpoint(folder, {"run": 1}, Dist(), every_s=0) as ckpt:
            run(tmp_path / "never.extxyz", train, kill, ckpt)
    assert (folder / "posterior.safetensors").exists() and folder.glob("scan-*.safetensors")
    seen = []
    with Checkpoint(folder, {"run": 1}, Dist(), every_s=0) as ckpt:  # the labelled set is not read again
        res = run(tmp_path / "resumed.extxyz", iter(()), lambda c, *_: seen.append(c), ckpt)
    assert seen == [4, 5, 6] and not folder.exists()
    assert any(i < 8 for i in res.indices)  # picks restored from the saved shortlist are among the output
    np.testing.assert_array_equal(res.indices, ref.indices)
    assert (tmp_path / "resumed.extxyz").read_bytes() == (tmp_path / "ref.extxyz").read_bytes()


def test_checkpoint_state_this_version_cannot_read_is_redone(tmp_path, caplog):
    """A state of this run's key that is not what the pipeline wrote (another version's layout) is not
    trusted: a warning, and that work is done again, to the uninterrupted result."""
    import logging
    from ntkal.runstate import Checkpoint, Dist
    train, pool = _rowblocks(100, 20), _rowblocks(101, 90)
    chunks = [pool.select(range(i, min(i + 30, 90))) for i in range(0, 90, 30)]
    opts = Options(budget=6, shortlist=20, score="pv").validate()
    ref = Pipeline(opts).select(Stream([train], rows=True), Stream(list(chunks), rows=True))
    with Checkpoint(tmp_path / "ck", {"run": 2}, Dist(), every_s=3600) as ckpt:
        ckpt.save("posterior", {"posterior": {"format": "ntkal.Posterior/0"}, "score": "pv"}, shared=True)
        ckpt.save("scan", {"state": {"top": []}, "done": 1})
        with caplog.at_level(logging.WARNING, logger="ntkal"):
            res = Pipeline(opts, checkpoint=ckpt).select(Stream([train], rows=True), Stream(list(chunks), rows=True))
    said = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(said) == 2 and "posterior" in said[0] and "scan" in said[1]
    np.testing.assert_array_equal(res.indices, ref.indices)
    np.testing.assert_array_equal(res.shortlist_scores, ref.shortlist_scores)
