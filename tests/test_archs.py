"""Foundation-shaped architectures (bench/archs.py): fast = reference on each miniature, in float64.

A miniature keeps the foundation model's block types, element table (89 for MP-0, 10 for OFF23),
max_ell 3 and correlation 3 with 4 channels per irrep, so the element-group rules (skip_tp, symmetric
contractions) meet the same shapes as on the full model.
"""
import pytest
import torch

import ntkal
from bench import archs

F64 = torch.float64
NAMES = ["mp0-small", "mp0-medium", "mp0-large", "off-small"]


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("name", NAMES)
def test_miniature_fast_equals_reference(name):
    arch = archs.miniature(archs.ARCHS[name])
    model = archs.build(arch, seed=3)
    assert len(model.atomic_numbers) == len(arch.atomic_numbers)
    ats = archs.structures(name, 7, 2, seed=4)
    kw = dict(sketch_dim=24, seed=1, dtype=F64)
    for kernel, probes in (("joint", None), ("joint", 3)):
        fast = ntkal.MACEFeaturizer(model, kernel=kernel, force_probes=probes, impl="fast", **kw)
        ref = ntkal.MACEFeaturizer(model, kernel=kernel, force_probes=probes, impl="reference", **kw)
        assert fast.coverage == 1.0 and fast.fallback_reason is None
        counts = fast._taps.rule_counts()
        assert counts["ElementTPRule"] > 0 and counts["GroupedContraction"] > 0 and "PerStructure" not in counts
        a, b = fast(ats), ref(ats)
        assert torch.equal(a.kind, b.kind) and torch.equal(a.ptr, b.ptr)
        for kind in set(b.kind.tolist()):  # energy and force rows each non-trivial and equal
            m = b.kind == kind
            assert float(b.rows[m].abs().max()) > 0
            assert rel(a.rows[m], b.rows[m]) <= 1e-9, (name, kernel, probes, kind)


def test_mp0_medium_has_the_published_size():
    """MACE-MP-0 medium: 4.69M parameters (built here: 4,688,656), 89 elements, 128x0e+128x1o."""
    model = archs.build(archs.ARCHS["mp0-medium"])
    assert sum(p.numel() for p in model.parameters()) == 4_688_656
    assert len(model.atomic_numbers) == 89 and float(model.r_max) == 6.0


def test_structures_have_the_requested_size_and_elements():
    for name in ("mp0-medium", "off-small"):
        zs = set(archs.ARCHS[name].atomic_numbers)
        for n in (30, 38, 60):
            ats = archs.structures(name, n, 2, seed=0)
            assert all(abs(len(a) - n) <= 4 for a in ats), [len(a) for a in ats]
            assert all(set(a.numbers.tolist()) <= zs for a in ats)
            assert not torch.equal(torch.as_tensor(ats[0].positions[:3]), torch.as_tensor(ats[1].positions[:3]))


def test_model_cache_is_built_once_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.setenv("NTKAL_CACHE", str(tmp_path))
    p = archs.model_path("tiny", mini=True)
    assert p.is_file() and tmp_path in p.parents
    mtime = p.stat().st_mtime_ns
    assert archs.model_path("tiny", mini=True) == p and p.stat().st_mtime_ns == mtime
