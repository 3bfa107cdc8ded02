"""Foundation-shaped architectures (bench/archs.py): fast = reference on each miniature, in float64.

A miniature keeps the foundation model's block types, element table (89 for MP-0, 10 for OFF23),
max_ell 3 and correlation 3 with 4 channels per irrep, so the element-group rules (skip_tp, symmetric
contractions) meet the same shapes as on the full model.
"""
import pytest
import torch

import ntkal
from bench import archs
from ntkal.features.fast import FastRoute

F64 = torch.float64
NAMES = ["mp0-small", "mp0-medium", "mp0-large", "off-small"]


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("name", NAMES)
def test_miniature_fast_equals_reference(name):
    """Both rule sets: the full model's (big_layer_numel=0 gives the miniature's small layers the element-group
    and Δ rules) and the default's (small layers: taps and the per-structure perturbation)."""
    arch = archs.miniature(archs.ARCHS[name])
    model = archs.build(arch, seed=3)
    assert len(model.atomic_numbers) == len(arch.atomic_numbers)
    ats = archs.structures(name, 7, 2, seed=4)
    kw = dict(sketch_dim=24, seed=1, dtype=F64)
    for kernel, probes in (("joint", None), ("joint", 3)):
        ref = ntkal.MACEFeaturizer(model, kernel=kernel, force_probes=probes, impl="reference", **kw)
        b = ref(ats)
        for route in (FastRoute(big_layer_numel=0), FastRoute()):
            fast = ntkal.MACEFeaturizer(model, kernel=kernel, force_probes=probes, impl="fast", route=route, **kw)
            assert fast.coverage == 1.0 and fast.fallback_reason is None
            counts = fast._taps.rule_counts()
            if route.big_layer_numel == 0:
                assert counts["ElementTPRule"] > 0 and counts["GroupedContraction"] > 0 and "PerStructure" not in counts
            else:
                assert counts["PerStructure"] > 0 and "ElementTPRule" not in counts
            a = fast(ats)
            assert torch.equal(a.kind, b.kind) and torch.equal(a.ptr, b.ptr)
            for kind in set(b.kind.tolist()):  # energy and force rows each non-trivial and equal
                m = b.kind == kind
                assert float(b.rows[m].abs().max()) > 0
                assert rel(a.rows[m], b.rows[m]) <= 1e-9, (name, kernel, probes, kind, route)


def test_mp0_medium_has_the_published_size_and_takes_the_element_rules():
    """MACE-MP-0 medium: 4.69M parameters (built here: 4,688,656), 89 elements, 128x0e+128x1o; skip_tp and
    the contractions (~90 % of them) take the element-group rules, the big radial layers the Δ rule."""
    model = archs.build(archs.ARCHS["mp0-medium"])
    assert sum(p.numel() for p in model.parameters()) == 4_688_656
    assert len(model.atomic_numbers) == 89 and float(model.r_max) == 6.0
    counts = ntkal.MACEFeaturizer(model, kernel="energy", sketch_dim=8)._taps.rule_counts()
    assert "PerStructure" not in counts and counts["DenseRule"] > 0
    assert counts["ElementTPRule"] + counts["GroupedContraction"] >= 0.85 * 4_688_656


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


# --------------------------------------------------------------------------------------------------
# multi-head models, as mace_run_train --multiheads_finetuning True writes them
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def multihead(tmp_path_factory):
    from tiny import tiny_mace
    return archs.multihead_model(tiny_mace(seed=5), tmp_path_factory.mktemp("mh"), head="surface")


@pytest.fixture(scope="module")
def mh_atoms():
    from tiny import structures
    return structures(3, seed=6)


def test_multihead_model_loads_on_its_fine_tuned_head(multihead, mh_atoms):
    assert multihead.heads == ["pt_head", "surface"]
    fz = ntkal.MACEFeaturizer(str(multihead.path), kernel="energy", sketch_dim=16, dtype=F64)
    assert fz.head == "surface" and fz.heads == ["pt_head", "surface"] and fz.settings()["head"] == "surface"
    assert ntkal.MACEFeaturizer(str(multihead.path), kernel="energy", sketch_dim=16, head="pt_head").head == "pt_head"
    with pytest.raises(ntkal.InputError, match="pt_head, surface"):
        ntkal.MACEFeaturizer(str(multihead.path), kernel="energy", sketch_dim=16, head="Default")


def test_multihead_rows_follow_the_head_and_fast_equals_reference(multihead, mh_atoms):
    kw = dict(sketch_dim=24, seed=2, dtype=F64)
    rows = {}
    for head in ("surface", "pt_head"):
        for probes in (None, 2):
            fast = ntkal.MACEFeaturizer(str(multihead.path), kernel="joint", force_probes=probes, head=head,
                                        impl="fast", **kw)
            ref = ntkal.MACEFeaturizer(str(multihead.path), kernel="joint", force_probes=probes, head=head,
                                       impl="reference", **kw)
            a, b = fast(mh_atoms), ref(mh_atoms)
            assert rel(a.rows, b.rows) <= 1e-9, (head, probes)
            rows[head, probes] = a.rows
    assert rel(rows["surface", None], rows["pt_head", None]) > 1e-3  # the heads' readouts differ


def test_other_heads_readout_columns_add_nothing(multihead, mh_atoms):
    """Perturbing the pretraining head's readout columns changes neither the fine-tuned head's rows nor
    its coverage (coverage counts the parameters one head uses)."""
    model = torch.load(multihead.path, weights_only=False)
    kw = dict(kernel="joint", sketch_dim=24, seed=2, dtype=F64, force_probes=2)
    before = ntkal.MACEFeaturizer(model, **kw)
    readout_cov = ntkal.MACEFeaturizer(model, **{**kw, "kernel": "energy"}, params="readout").coverage
    H = len(model.heads)
    with torch.no_grad():  # weights [in, out] row-major; pt_head is head 0 (mace's remove_pt_head slicing)
        for name, p in model.named_parameters():
            if name.startswith("readouts.") and (name.endswith("linear.weight") or name.endswith("linear_2.weight")):
                p.view(-1, H)[:, 0] += torch.randn_like(p.view(-1, H)[:, 0])  # its output column
            elif name.startswith("readouts.") and name.endswith("linear_1.weight"):
                hidden = model.get_submodule(name[:-len(".weight")]).irreps_out.dim // H
                p.view(-1, H, hidden)[:, 0] += 1.0  # its hidden block
    after = ntkal.MACEFeaturizer(model, **kw)
    a, b = before(mh_atoms), after(mh_atoms)
    assert torch.equal(a.rows, b.rows)
    # a head uses, of each parameter, what mace's remove_pt_head keeps of it in the single-head model
    from mace.tools.scripts_utils import remove_pt_head
    single = dict(remove_pt_head(torch.load(multihead.path, weights_only=False), "surface").named_parameters())
    used = {n: single[n].numel() if n in single else p.numel() for n, p in model.named_parameters()}
    n_read = sum(v for n, v in used.items() if n.startswith("readouts."))
    assert readout_cov == pytest.approx(n_read / sum(used.values()), rel=1e-12)


def test_predict_matches_mace_calculator_on_the_chosen_head(multihead, mh_atoms):
    from mace.calculators import MACECalculator
    for head in ("surface", "pt_head"):
        fz = ntkal.MACEFeaturizer(str(multihead.path), kernel="embedding", head=head, dtype=F64, batch_size=2)
        e, f = fz.predict(mh_atoms)
        assert e.dtype == torch.float64.__repr__() or str(e.dtype) == "float64"
        calc = MACECalculator(model_paths=str(multihead.path), device="cpu", default_dtype="float64", head=head)
        for i, a in enumerate(mh_atoms):
            b = a.copy()
            b.calc = calc
            assert e[i] == pytest.approx(b.get_potential_energy(), rel=1e-10, abs=1e-10)
            assert f[i].shape == (len(a), 3)
            assert abs(f[i] - b.get_forces()).max() <= 1e-9
