"""The fast batched featurizer (taps + tensor sketch) against the per-structure reference, float64."""
import pytest
import torch

import ntk_kernels
import ntkal
from ntkal.features import fast as fastmod
from ntkal.features.fast import FastRoute, size_groups
from ntkal.features.rules import BIG_LAYER_NUMEL
from tiny import structures, tiny_mace

F64 = torch.float64
TENSOR_SKETCH = ntk_kernels.tensor_sketch
ALL_RULES = FastRoute(big_layer_numel=0)  # every layer of the tiny model takes the big-layer rules (element groups, radial Δ)


@pytest.fixture(scope="module")
def model():
    return tiny_mace(seed=21)


@pytest.fixture(scope="module")
def atoms():
    # mixed sizes (Si cells of 2 and 4 atoms, molecules of 3 to 8) so exact-row batches are regrouped
    return structures(7, seed=13)


def pair(model, kernel, probes=None, params="all", k=40, seed=3, batch_size=32, route=FastRoute()):
    kw = dict(kernel=kernel, sketch_dim=k, params=params, force_probes=probes, seed=seed, dtype=F64,
              batch_size=batch_size)
    return (ntkal.MACEFeaturizer(model, impl="fast", route=route, **kw),
            ntkal.MACEFeaturizer(model, impl="reference", **kw))


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("big", [True, False], ids=["big-layer-rules", "small-layer-rules"])
@pytest.mark.parametrize("route", ["dense", "rows"])
@pytest.mark.parametrize("kernel,probes", [("energy", None), ("force", None), ("force", 3), ("joint", None),
                                           ("joint", 5)])
def test_fast_equals_reference(model, atoms, kernel, probes, route, big, monkeypatch):
    """On both rule sets (the tiny model's layers are all small: the default takes the small-layer rules)."""
    fast, ref = pair(model, kernel, probes, route=FastRoute(tap_route=route, big_layer_numel=0 if big else BIG_LAYER_NUMEL))
    assert fast.impl == "fast" and ref.impl == "reference"
    assert ("PerStructure" in fast._taps.rule_counts()) != big
    fused = []  # the "rows" route calls the fused tensor sketch, the "dense" route never does
    monkeypatch.setattr(ntk_kernels, "tensor_sketch", lambda *a: fused.append(1) or TENSOR_SKETCH(*a))
    a, b = fast(atoms), ref(atoms)
    assert bool(fused) == (route == "rows")
    for name in ("ptr", "kind", "natoms", "atom"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert rel(a.rows, b.rows) <= 1e-9
    assert rel(a.psi, b.psi) <= 1e-9
    # every row kind is non-trivial, so the comparison covers energy and force rows alike
    for kind in set(b.kind.tolist()):
        m = b.kind == kind
        assert rel(a.rows[m], b.rows[m]) <= 1e-9 and float(b.rows[m].abs().max()) > 0


@pytest.mark.parametrize("params", ["readout", "last"])
def test_fast_equals_reference_for_parameter_subsets(model, atoms, params):
    fast, ref = pair(model, "joint", 4, params=params)
    assert fast.impl == "fast"
    assert rel(fast(atoms).rows, ref(atoms).rows) <= 1e-9


def test_fast_path_covers_every_parameter(model):
    small, _ = pair(model, "joint")  # the tiny model's layers are all below rules.BIG_LAYER_NUMEL
    assert set(small._taps.rule_counts()) == {"LinearRule", "DenseTapRule", "PerStructure"}
    fast, _ = pair(model, "joint", route=ALL_RULES)
    assert fast.impl == "fast" and fast.fallback_reason is None
    assert fast.coverage >= 0.95
    sketched = sum(b.numel for b in fast.sketch.blocks)
    assert sketched == sum(p.numel() for p in model.parameters() if p.requires_grad)
    taps = fast._taps
    ruled = {i for layer in taps.layers.values() for blocks in layer.blocks.values() for i in blocks}
    assert ruled == set(range(len(fast.sketch.blocks)))
    # skip_tp and the symmetric contractions go through the element-group rules, not the per-structure one
    counts = taps.rule_counts()
    assert counts.get("ElementTPRule", 0) > 0 and counts.get("GroupedContraction", 0) > 0
    assert counts.get("DenseRule", 0) > 0 and "PerStructure" not in counts


def test_rules_take_only_the_layouts_they_expect(model, atoms, monkeypatch):
    """A rule takes a parameter only as the sketch laid it out (rules.Rule.layouts): symmetric-contraction
    weights laid out dense go to the per-structure perturbation, not the element-group rule, and the rows
    stay right."""
    from ntkal.features import sketch
    module_blocks = sketch._module_blocks

    def dense_contractions(module, local, prefix, p):
        return [sketch.Block(b.param, 0, (p.numel(),), sketch.DENSE) if b.layer == sketch.CONTRACTION else b
                for b in module_blocks(module, local, prefix, p)]
    monkeypatch.setattr(sketch, "_module_blocks", dense_contractions)
    fast, ref = pair(model, "joint", 2, route=ALL_RULES)
    counts = fast._taps.rule_counts()
    assert "GroupedContraction" not in counts and counts["PerStructure"] > 0 and counts["ElementTPRule"] > 0
    assert rel(fast(atoms[:3]).rows, ref(atoms[:3]).rows) <= 1e-9


def test_double_backward_loop_equals_vmapped(model, atoms, monkeypatch):
    """The force double backward as a loop (the CPU default) and vmapped (the CUDA default)."""
    seen = []
    double_backward = fastmod._double_backward
    monkeypatch.setattr(fastmod, "_double_backward", lambda *a: seen.append(a[-1]) or double_backward(*a))
    a = pair(model, "force", 3, route=FastRoute(vmap=False))[0](atoms).rows
    assert seen and not any(seen)
    seen.clear()
    b = pair(model, "force", 3, route=FastRoute(vmap=True))[0](atoms).rows
    assert seen and all(seen)
    assert rel(a, b) <= 1e-12 and float(a.abs().max()) > 0


def test_vmapped_double_backward_out_of_gpu_memory_halves_its_projections(model, atoms, monkeypatch):
    """A vmapped double backward that runs out of GPU memory (simulated: more than 2 projections at once) is
    retried with half as many, says so, keeps the smaller size for later calls, and gives the same rows."""
    exact = pair(model, "joint", None, route=FastRoute(vmap=True))[0]
    want = exact(atoms[:3]).rows
    sizes = []
    double_backward = fastmod._double_backward

    def tight(forces, inputs, vectors, batched):
        sizes.append(vectors.shape[0])
        if batched and vectors.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return double_backward(forces, inputs, vectors, batched)
    monkeypatch.setattr(fastmod, "_double_backward", tight)
    with pytest.warns(RuntimeWarning, match="ran out of GPU memory"):
        got = exact(atoms[:3]).rows
    assert rel(got, want) <= 1e-12 and exact._taps.vec_cap == 2
    assert max(sizes[sizes.index(2):]) == 2  # once halved down to 2, never more again
    sizes.clear()
    exact(atoms[:3])  # a later call starts at the remembered size: no failed attempt
    assert sizes and max(sizes) == 2
    # a loop (one projection at a time) has nothing to halve: its error is the user's
    monkeypatch.setattr(fastmod, "_double_backward", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(torch.OutOfMemoryError):
        pair(model, "joint", 2, route=FastRoute(vmap=False))[0](atoms[:1])


def test_rows_do_not_depend_on_batching(model, atoms):
    one, _ = pair(model, "joint", None, batch_size=1, route=ALL_RULES)
    many, _ = pair(model, "joint", None, batch_size=5, route=ALL_RULES)
    a = one(atoms)
    b = many(atoms)
    assert torch.equal(a.ptr, b.ptr) and rel(a.rows, b.rows) <= 1e-12


@pytest.mark.parametrize("kernel,probes", [("energy", None), ("force", 3), ("joint", None), ("joint", 5)])
def test_one_structure_batches_differentiate_small_layers_directly(model, atoms, kernel, probes, monkeypatch):
    """Batches of one structure (the calculator's): small layers' parameter gradients straight from the
    backward (FastRoute.direct_single), the same rows as their taps / perturbations and as the reference."""
    seen = []
    direct_sketch = fastmod._direct_sketch
    monkeypatch.setattr(fastmod, "_direct_sketch", lambda sk, dp, *a: seen.append(len(dp)) or direct_sketch(sk, dp, *a))
    direct, ref = pair(model, kernel, probes, batch_size=1)
    taps, _ = pair(model, kernel, probes, batch_size=1, route=FastRoute(direct_single=False))
    a = direct(atoms[:4])
    assert seen and all(seen)
    seen.clear()
    b, c = taps(atoms[:4]), ref(atoms[:4])
    assert not any(seen)
    assert rel(a.rows, c.rows) <= 1e-9 and rel(b.rows, c.rows) <= 1e-9 and float(c.rows.abs().max()) > 0


def test_size_groups_bound_the_spread_and_keep_every_index():
    sizes = [3, 17, 4, 16, 5, 30, 8, 9, 3, 40]
    groups = size_groups(sizes, batch_size=3, slack=1.25)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    for g in groups:
        assert len(g) <= 3 and max(sizes[i] for i in g) <= 1.25 * min(sizes[i] for i in g)


def test_unsupported_parameter_falls_back_or_raises(model, caplog):
    """impl="auto" falls back to the reference path and says so: one warning and the report's settings."""
    odd = tiny_mace(seed=22)
    odd.register_parameter("extra_scale", torch.nn.Parameter(torch.ones(3, dtype=F64)))
    with caplog.at_level("WARNING", logger="ntkal"):
        auto = ntkal.MACEFeaturizer(odd, kernel="energy", sketch_dim=16, dtype=F64)
    assert auto.impl == "reference" and "extra_scale" in auto.fallback_reason
    warned = [r for r in caplog.records if r.name == "ntkal" and "reference path (slower)" in r.getMessage()]
    assert len(warned) == 1 and "extra_scale" in warned[0].getMessage()
    assert auto.settings()["fallback_reason"] == auto.fallback_reason
    assert ntkal.MACEFeaturizer(model, kernel="energy", sketch_dim=16, dtype=F64).settings()["fallback_reason"] is None
    with pytest.raises(ValueError, match="extra_scale"):
        ntkal.MACEFeaturizer(odd, kernel="energy", sketch_dim=16, dtype=F64, impl="fast")


@pytest.mark.interpreter
def test_rows_route_through_triton_interpreter(model, monkeypatch):
    """The fused Triton tensor_sketch (interpreted on CPU) inside the featurizer, on two small structures."""
    pytest.importorskip("triton")
    monkeypatch.setenv("NTK_KERNELS_IMPL", "triton")
    fast, ref = pair(model, "force", 2, k=16, params="readout", route=FastRoute(tap_route="rows"))
    ats = structures(2, seed=5)
    assert rel(fast(ats).rows, ref(ats).rows) <= 1e-9


def test_auto_takes_the_fast_path_for_every_force_kernel(model):
    """Exact rows included: with the element-group rules the fast path is not slower than the reference
    on CPU (bench/RESULTS.md, features), so "auto" no longer sends exact rows to the reference."""
    kw = dict(sketch_dim=16, dtype=F64)
    assert ntkal.MACEFeaturizer(model, kernel="energy", **kw).impl == "fast"
    assert ntkal.MACEFeaturizer(model, kernel="joint", force_probes=4, **kw).impl == "fast"
    exact = ntkal.MACEFeaturizer(model, kernel="joint", **kw)
    assert exact.impl == "fast" and exact.with_kernel("energy").impl == "fast"
    assert ntkal.MACEFeaturizer(model, kernel="joint", impl="reference", **kw).impl == "reference"


def test_a_call_leaves_no_graph_behind(model, atoms, monkeypatch):
    """Tap hooks refer back to their inputs; the taps are released so each chunk's graph is freed at once
    (without it RSS grew by ~3 GB over a 1,000-structure pool until Python's cyclic GC ran)."""
    import gc
    import weakref
    from ntkal.features.rules import TapRule
    fast, _ = pair(model, "joint", 2)
    seen = []
    record = TapRule.record

    def spy(self, x, y, groups=None):
        seen.append(weakref.ref(x))
        return record(self, x, y, groups)
    monkeypatch.setattr(TapRule, "record", spy)
    gc.disable()
    try:
        fast(atoms)
        assert seen and all(r() is None for r in seen)
    finally:
        gc.enable()


def _hooked(module):
    """Forward hooks, pre-hooks and rerouted forwards (rules.RerouteRule) on the model."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + hasattr(m, "_ntkal_reroute")
               for m in module.modules())


def test_hooks_go_with_the_featurizer(model, atoms):
    """close() (or the with-block) removes every hook and rerouted forward; so does dropping the last
    featurizer that shares the taps; a copy whose taps were closed takes the reference path."""
    import gc
    fz = ntkal.MACEFeaturizer(model, kernel="joint", sketch_dim=8, dtype=F64, force_probes=2, route=ALL_RULES)
    m = fz.model
    assert _hooked(m) > 0
    copy = fz.with_kernel("energy")
    with fz:
        fz(atoms[:2])
    assert _hooked(m) == 0 and copy.impl == "reference" and fz.impl == "reference"
    fz2 = ntkal.MACEFeaturizer(model, kernel="energy", sketch_dim=8, dtype=F64, route=ALL_RULES)
    m2, copy2 = fz2.model, fz2.with_kernel("joint", 2)
    del fz2
    gc.collect()
    assert _hooked(m2) > 0  # the copy still holds the taps
    del copy2
    gc.collect()
    assert _hooked(m2) == 0


_BUDGET_CHILD = """
import sys, json
import numpy as np, torch
torch.set_num_threads(1)
import ntkal
from ase.build import bulk
model, out, mem, impl = sys.argv[1], sys.argv[2], (None if sys.argv[3] == "none" else float(sys.argv[3])), sys.argv[4]
rng = np.random.default_rng(0)
ats = []
for i in range(16):
    a = bulk("Si", "diamond", a=5.43).repeat((3, 2, 2))
    a.positions += rng.normal(scale=0.05, size=a.positions.shape)
    ats.append(a)
fz = ntkal.MACEFeaturizer(model, kernel="joint", sketch_dim=32, batch_size=64, memory_gb=mem, impl=impl)
from bench import utils
base = utils.rss_mib()
rows = fz(ats).rows
e, f = fz.predict(ats)
torch.save(rows, out)
from ntkal.features.memory import reset_peak_rss
print(json.dumps({"base_mib": base, "peak_reset_works": reset_peak_rss()}))
"""


def test_free_heap_release_is_glibc_s_or_nothing(monkeypatch):
    """malloc_trim is found on this glibc machine; without it (macOS, musl) the plan still measures (RSS as is)."""
    from ntkal.features import memory
    monkeypatch.setattr(memory, "_TRIM", [])
    assert isinstance(memory.release_free_heap(), bool) and memory._TRIM[0] is not None
    monkeypatch.setattr(memory, "_TRIM", [None])
    assert memory.release_free_heap() is False
    plan = memory.MemoryPlan(1.0, torch.device("cpu"))
    with plan.measure("k", 4.0):
        block = torch.randn(2**20)
    assert plan.current() > 0 and plan.cost("k")[1] == 4.0 and block.numel() == 2**20


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_memory_budget_bounds_the_peak_rss(tmp_path, impl):
    """Peak RSS of a child process featurising 16 structures of 24 atoms (exact joint rows: one batch, or
    64 rows per double backward, unbudgeted) stays under a memory_gb that the unbudgeted call exceeds;
    the rows do not change."""
    from bench import utils
    model_file = tmp_path / "m.model"
    torch.save(tiny_mace(seed=23, dtype=torch.float32), model_file)
    script = tmp_path / "child.py"
    script.write_text(_BUDGET_CHILD)
    env = {"OMP_NUM_THREADS": "1"}
    free = utils.run_child([utils.PY, str(script), str(model_file), str(tmp_path / "a.pt"), "none", impl], env=env,
                           cwd=str(utils.REPO))
    assert free["rc"] == 0, free["stderr"][-2000:]
    base = utils.last_json_line(free["stdout"])["base_mib"]
    grew = free["child_peak_rss_mib"] - base
    assert grew > 150, grew  # the featurisation itself needs memory worth bounding
    budget_mib = base + 0.5 * grew
    bound = utils.run_child([utils.PY, str(script), str(model_file), str(tmp_path / "b.pt"), str(budget_mib / 1024), impl],
                            env=env, cwd=str(utils.REPO))
    assert bound["rc"] == 0, bound["stderr"][-2000:]
    assert bound["child_peak_rss_mib"] <= budget_mib, (bound["child_peak_rss_mib"], budget_mib, free["child_peak_rss_mib"],
                                                       utils.last_json_line(bound["stdout"]))
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert rel(b, a) <= 1e-5
