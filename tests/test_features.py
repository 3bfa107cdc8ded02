"""Feature maps on a tiny random MACE in float64: the mathematics of docs/design.md, Features."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ntk_kernels
import ntkal
from ntkal.acquisition.scorers import PVScorer
from ntkal.features import FORCE, ENERGY, Sketch, parameter_blocks
from tiny import rotated, structures, tiny_mace

F64 = torch.float64


@pytest.fixture(scope="module")
def model():
    return tiny_mace(seed=11)


@pytest.fixture(scope="module")
def joint(model):
    return ntkal.MACEFeaturizer(model, kernel="joint", sketch_dim=48, dtype=F64, seed=5)


def test_rowblock_layout(joint):
    ats = structures(3, seed=4)
    rb = joint(ats)
    n_rows = [1 + 3 * len(a) for a in ats]
    assert rb.ptr.tolist() == [0] + np.cumsum(n_rows).tolist()
    assert rb.natoms.tolist() == [len(a) for a in ats]
    for s, a in enumerate(ats):
        kinds = rb.kind[rb.ptr[s]:rb.ptr[s + 1]].tolist()
        assert kinds == [ENERGY] + [FORCE] * (3 * len(a))
        assert rb.atom[rb.ptr[s]:rb.ptr[s + 1]].tolist() == [-1] + [i // 3 for i in range(3 * len(a))]
    assert torch.isfinite(rb.rows).all() and rb.rows.dtype == F64
    assert rb.psi.shape == (3, 48)


def test_force_rows_are_minus_position_derivative_of_energy_row(joint):
    """S(grad_theta F) = -d(phi_E)/dR, checked by central finite differences."""
    energy = joint.with_kernel("energy")
    for a in structures(2, seed=7):
        rows = joint([a]).rows
        n, h = len(a), 1e-5
        for atom, comp in [(0, 0), (n - 1, 2), (n // 2, 1)]:
            p, m = a.copy(), a.copy()
            p.positions[atom, comp] += h
            m.positions[atom, comp] -= h
            fd = -(energy([p]).rows[0] - energy([m]).rows[0]) * n / (2 * h)
            got = rows[1 + 3 * atom + comp]
            assert torch.linalg.norm(fd - got) <= 1e-6 * torch.linalg.norm(got)


def test_force_rows_sum_to_zero_over_atoms(joint):
    """Translation invariance: sum over atoms of grad_theta F_{a,c} = 0 for each Cartesian c."""
    for a in structures(2, seed=8):
        f = joint.with_kernel("force")([a]).rows.reshape(len(a), 3, -1)
        assert torch.linalg.norm(f.sum(0)) <= 1e-9 * torch.linalg.norm(f)


@pytest.mark.parametrize("kernel", ["energy", "joint", "embedding"])
def test_scores_invariant_under_rotation(joint, kernel):
    fz = joint.with_kernel(kernel)
    post = ntkal.fit(fz, structures(3, seed=9))
    ats = structures(2, seed=10)
    s0 = post.score(fz(ats))
    s1 = post.score(fz([rotated(a, seed=i) for i, a in enumerate(ats)]))
    torch.testing.assert_close(s1, s0, rtol=1e-8, atol=0)
    if kernel == "joint":
        v0 = PVScorer(post)(fz(ats)).atom_values["atom_variance"]
        v1 = PVScorer(post)(fz([rotated(a, seed=i) for i, a in enumerate(ats)])).atom_values["atom_variance"]
        for x, y in zip(v0, v1):
            np.testing.assert_allclose(y, x, rtol=1e-8)


def _exact_energy_gradient(model, fz, atoms):
    data = fz.batch([atoms])
    out = fz.model(data, training=False, compute_force=False)
    params = [p for p in fz.model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(out["energy"].sum(), params)])


def test_sketched_kernel_approaches_exact_ntk(model):
    """E<phi_E(x), phi_E(x')> = grad E(x) . grad E(x'): the error shrinks like 1/sqrt(k)."""
    ats = structures(4, seed=12)
    fz = ntkal.MACEFeaturizer(model, kernel="energy", sketch_dim=8, dtype=F64)
    grads = torch.stack([_exact_energy_gradient(model, fz, a) for a in ats])
    exact = grads @ grads.T
    errors = {}
    for k in (64, 4096):
        errs = []
        for seed in range(2):
            f = ntkal.MACEFeaturizer(model, kernel="energy", sketch_dim=k, dtype=F64, seed=seed)
            phi = f(ats).rows * torch.tensor([len(a) for a in ats], dtype=F64)[:, None]  # undo 1/N
            errs.append(float(torch.linalg.norm(phi @ phi.T - exact) / torch.linalg.norm(exact)))
        errors[k] = np.mean(errs)
    assert errors[4096] < 0.15
    assert errors[4096] < errors[64] / 3


def test_tensor_sketch_block_equals_per_row_projection():
    """TS(sum_i x_i dy_i^T) equals the fused per-row form sum_i (x_i A) * (dy_i B) / sqrt(k) of ntk_kernels."""
    g = torch.Generator().manual_seed(0)
    from ntkal.features.sketch import Block
    x, dy = torch.randn(13, 5, generator=g, dtype=F64), torch.randn(13, 7, generator=g, dtype=F64)
    seg = torch.tensor([0] * 6 + [1] * 7)
    sk = Sketch(["w"], [35], [Block("w", 0, (5, 7), "test")], k=32, seed=3, dtype=F64)
    grads = torch.stack([(x[seg == s, :, None] * dy[seg == s, None, :]).sum(0).reshape(-1) for s in (0, 1)])
    A, B = sk.factors[0]
    fused = ntk_kernels.tensor_sketch(x, dy, A, B, seg, 2)
    torch.testing.assert_close(sk.apply([grads]), fused, rtol=1e-12, atol=1e-12)


def test_parameter_sets_and_coverage(model):
    cov = {p: parameter_blocks(model, p)[2] for p in ("readout", "last", "all")}
    assert 0 < cov["readout"] < cov["last"] < cov["all"] == 1.0
    _, blocks, _ = parameter_blocks(model, "all")
    kinds = {b.layer for b in blocks}
    assert {"e3nn.Linear", "e3nn.TensorProduct", "e3nn.FullyConnectedNet", "SymmetricContraction"} <= kinds
    assert sum(b.numel for b in blocks) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_same_seed_same_features_and_different_seed_differs(model):
    ats = structures(2, seed=13)
    a = ntkal.MACEFeaturizer(model, kernel="joint", sketch_dim=16, force_probes=3, dtype=F64, seed=2)(ats)
    b = ntkal.MACEFeaturizer(model, kernel="joint", sketch_dim=16, force_probes=3, dtype=F64, seed=2)(ats)
    c = ntkal.MACEFeaturizer(model, kernel="joint", sketch_dim=16, force_probes=3, dtype=F64, seed=3)(ats)
    assert torch.equal(a.rows, b.rows)
    assert not torch.allclose(a.rows, c.rows)
    # chunking and position in the pool do not change a structure's rows (probes included)
    d = ntkal.MACEFeaturizer(model, kernel="joint", sketch_dim=16, force_probes=3, dtype=F64, seed=2)(ats[::-1])
    torch.testing.assert_close(d.select([1, 0]).rows, a.rows, rtol=1e-12, atol=1e-12)


def test_features_identical_in_another_process(model, tmp_path):
    """Bit-identical rows from a fresh process (same thread count: the summation order is part of the bits)."""
    ats = structures(2, seed=14)
    torch.save(model, tmp_path / "m.model")
    import ase.io
    ase.io.write(tmp_path / "s.extxyz", ats)
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import torch, ntkal, ase.io\n"
        "torch.set_num_threads(%d)\n"
        "fz = ntkal.MACEFeaturizer(%r, kernel='joint', sketch_dim=16, seed=4, force_probes=2)\n"
        "torch.save(fz(ase.io.read(%r, ':')).rows, %r)\n"
    ) % (str(Path(__file__).parent), torch.get_num_threads(), str(tmp_path / "m.model"), str(tmp_path / "s.extxyz"), str(tmp_path / "r.pt"))
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    mine = ntkal.MACEFeaturizer(str(tmp_path / "m.model"), kernel="joint", sketch_dim=16, seed=4, force_probes=2)
    assert torch.equal(torch.load(tmp_path / "r.pt"), mine(ase.io.read(tmp_path / "s.extxyz", ":")).rows)


def test_probe_rows_are_rademacher_combinations_of_exact_rows(joint):
    a = structures(1, seed=15)[0]
    exact = joint.with_kernel("force")([a]).rows
    probe = joint.with_kernel("force", force_probes=5)
    z = probe.probe_vectors(a, 5)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(probe([a]).rows, z @ exact / np.sqrt(5), rtol=1e-9, atol=1e-12)


def test_probe_seed_draws_other_probes_with_the_same_sketch(model, joint):
    """probe_seed (constructor or with_kernel) changes the probes only; None means the sketch's seed."""
    a = structures(1, seed=15)[0]
    probe = joint.with_kernel("force", force_probes=3)
    other = joint.with_kernel("force", force_probes=3, probe_seed=9)
    built = ntkal.MACEFeaturizer(model, kernel="force", sketch_dim=48, dtype=F64, seed=5, force_probes=3, probe_seed=9)
    assert probe.probe_seed == 5 and other.probe_seed == 9 and built.settings()["probe_seed"] == 9
    assert not torch.equal(probe.probe_vectors(a, 3), other.probe_vectors(a, 3))
    torch.testing.assert_close(built([a]).rows, other([a]).rows, rtol=1e-12, atol=0)
    assert other.with_kernel("force", probe_seed=None).probe_seed == 5


def test_probe_scores_are_unbiased(joint):
    """Mean over probe draws of the probe-mode score equals the exact score (within 4 standard errors)."""
    fz = joint.with_kernel("force")
    post = ntkal.fit(fz, structures(3, seed=16))
    ats = structures(2, seed=17)
    exact = post.score(fz(ats))
    draws = []
    for s in range(30):
        probe = fz.with_kernel("force", force_probes=2, probe_seed=1000 + s)  # new probes, same sketch
        draws.append(post.score(probe(ats)))
    draws = torch.stack(draws)
    mean, se = draws.mean(0), draws.std(0) / np.sqrt(len(draws))
    assert (draws.std(0) > 0).all()
    assert ((mean - exact).abs() <= 4 * se).all(), (mean, exact, se)


def test_unknown_element_is_a_clear_error(joint):
    from ase import Atoms
    with pytest.raises(ntkal.InputError, match="Fe"):
        joint([Atoms("FeH", positions=[[0, 0, 0], [0, 0, 1.5]])])
