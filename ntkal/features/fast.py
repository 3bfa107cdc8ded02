"""Fast batched NTK features: one forward + backward per batch, every parametrised layer handled by its
rule (rules.py), the force projections' double backwards batched over structures.

Each sketched parameter is claimed by the first rule of rules.RULES that handles its layer type (tapped
linear maps, element-indexed tensor products and symmetric contractions per (structure, element)
group, a per-structure perturbation as the fallback); a parameter nobody claims makes the featurizer
use the reference path. The rows equal the reference path's (same sketch, same seed) to rounding.
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .rowblock import RowBlock, structure_rows
from .rules import BIG_LAYER_NUMEL, RULES, Chunk, UnsupportedModel

__all__ = ["FastRoute", "FastTaps", "UnsupportedModel", "fast_rows", "rows_and_outputs", "size_groups"]


@dataclass(frozen=True)
class FastRoute:
    """How the fast path computes its rows. Every route gives the same rows to rounding (tests); the
    defaults are the ones measured fastest (bench/RESULTS.md, features)."""

    tap_route: str = "auto"  # tapped blocks: "auto" (fewer flops), "rows" (fused tensor sketch) or "dense"
    big_layer_numel: float = BIG_LAYER_NUMEL  # layers this large take the big-layer rules (rules.py); 0: all
    vmap: Optional[bool] = None  # force double backward: vmapped (True) or a loop (False); None: vmapped on CUDA
    # A batch of one structure of a model whose layers are all smaller than big_layer_numel: differentiated
    # w.r.t. its parameters (the batch's gradient is the structure's), no taps or perturbations (False: off)
    direct_single: bool = True

# Structures per batch for force rows on a CPU: the per-projection double backward ran ~1.2x faster on
# batches of 16 than of 64 there (bench/RESULTS.md); exact-row batches are also grouped by size.
FORCE_BATCH_CPU = 16
# One structure's probe double backwards on a CPU: vmapped up to this many atoms, a loop above (rows_and_outputs)
VMAP_MAX_ATOMS_CPU = 16


def _owner(model: torch.nn.Module, name: str):
    """(module that uses parameter `name`, its local name there, its prefix); a ParameterList's owner is
    its parent."""
    prefix, local = name.rsplit(".", 1) if "." in name else ("", name)
    mod = model.get_submodule(prefix)
    if type(mod).__name__ == "ParameterList" and "." in prefix:
        parent, list_name = prefix.rsplit(".", 1)
        return model.get_submodule(parent), f"{list_name}.{local}", parent
    return mod, local, prefix


def _remove(handles):
    for h in handles:
        h.remove()


class FastTaps:
    """The rules installed on a private model copy; turns one batch into per-structure sketches.

    The hooks hold the taps only weakly: when the last featurizer holding them is dropped (or on
    close()), every hook is removed and rerouted forwards are restored.
    """

    def __init__(self, model: torch.nn.Module, sketch, route: FastRoute = FastRoute()):
        self.model, self.sketch, self.route = model, sketch, route
        self.phase = "off"  # "forward" while recording, "first" during the first backward
        self.guard = False  # a rule is evaluating its own layer (no recording)
        self.direct = frozenset()  # rules of this run differentiated w.r.t. their parameters (not recording)
        self.vec_cap = None  # projections per vmapped double backward after one ran out of GPU memory
        blocks_of: Dict[str, list] = {}
        for i, b in enumerate(sketch.blocks):
            blocks_of.setdefault(b.param, []).append(i)
        self.layers = {}
        for j, name in enumerate(sketch.names):
            mod, local, prefix = _owner(model, name)
            layouts = {sketch.blocks[i].layer for i in blocks_of[name]}
            layer = self.layers.get(prefix)
            if layer is None:
                layer = self.layers[prefix] = self._rule_for(mod, local, layouts, prefix, name)
            elif not layer.takes(mod, local, layouts):
                raise UnsupportedModel(f"no fast-path rule for parameter {name} ({type(mod).__name__})")
            layer.add(local, j, blocks_of[name])
        handles = []
        for layer in self.layers.values():
            handles.extend(layer.install())
        # layers a one-structure batch differentiates directly (FastRoute.direct_single): all of them, when
        # every layer is small (shipped models); a model with big layers keeps its rules (on mp0-medium the
        # mixed route measured slower for force rows)
        small = [layer for layer in self.layers.values()
                 if sum(p.numel() for p in layer.module.parameters()) < route.big_layer_numel]
        self.small = frozenset(small) if len(small) == len(self.layers) else frozenset()
        self._finalizer = weakref.finalize(self, _remove, handles)

    def _rule_for(self, mod, local, layouts, prefix, name):
        big = sum(p.numel() for p in mod.parameters()) >= self.route.big_layer_numel
        for rule in RULES:
            if (big or not rule.big_only) and rule.takes(mod, local, layouts):
                try:
                    return rule(self, mod, prefix)
                except UnsupportedModel:
                    continue
        raise UnsupportedModel(f"no fast-path rule for parameter {name} ({type(mod).__name__})")

    def close(self):
        """Remove every hook and rerouted forward from the model (also done when the taps are dropped)."""
        self._finalizer()

    @property
    def alive(self) -> bool:
        return self._finalizer.alive

    def rule_counts(self) -> Dict[str, int]:
        """Sketched parameters per rule (for reports and tests)."""
        out: Dict[str, int] = {}
        for layer in self.layers.values():
            n = sum(self.sketch.parameters[j].numel() for j in layer.params.values())
            out[type(layer).__name__] = out.get(type(layer).__name__, 0) + n
        return out

    def run(self, data: dict, n_struct: int, want_forces: bool, vectors: Optional[torch.Tensor] = None,
            outputs: bool = False, stress: bool = False, vmap: Optional[bool] = None):
        """Energy-row sketches [n, k] and, with forces, force-row sketches [J, n, k] for the J projections
        `vectors` [J, atoms, 3] of the batch's forces (pushed through the double backward _vec_chunk() at a time).

        outputs=True adds a third item: the model's own predictions from the same forward and first backward,
        {"energy": [n], "forces": [atoms, 3], "stress": [n, 3, 3] or None} (detached), as MACE's
        compute_force / compute_stress give them; stress=True (3-D periodic cells) differentiates the energy
        by MACE's symmetric displacement too. The rows are the same with or without them (tests). vmap: the
        route's vmap setting for this call (None: the route's)."""
        try:
            energy, forces, model_out = self._run(data, n_struct, want_forces, vectors, outputs, stress, vmap)
            rows = energy.detach(), None if forces is None else forces.detach()
            return rows + (model_out,) if outputs else rows
        finally:
            self.direct = frozenset()
            for layer in self.layers.values():
                layer.release()

    def _run(self, data, n, want_forces, vectors, outputs=False, stress=False, vmap=None):
        sk = self.sketch
        node_seg = data["batch"]
        chunk = Chunk(n, data["ptr"].cpu(), node_seg, node_seg[data["edge_index"][0]], self.route.tap_route)
        self.direct = self.small if n == 1 and self.route.direct_single else frozenset()
        direct = [layer for layer in self.layers.values() if layer in self.direct]
        layers = [layer for layer in self.layers.values() if layer not in self.direct]
        for layer in layers:
            layer.begin(chunk)
        # the sketched parameters of the direct layers, (rule, local name, tensor) in one order
        dparams = [(layer, local, sk.parameters[j]) for layer in direct for local, j in layer.params.items()]
        dtensors = [p for _, _, p in dparams]
        pos = data["positions"]  # the leaf: MACE replaces data["positions"] when it adds the displacement
        if want_forces or outputs:
            pos.requires_grad_(True)
        self.phase = "forward"
        try:
            out = self.model(data, training=want_forces, compute_force=False, compute_displacement=stress)
        finally:
            self.phase = "off"
        firsts = [layer.first_inputs() for layer in layers]
        lead = ([pos] if want_forces or outputs else []) + ([out["displacement"]] if stress else [])
        inputs = lead + dtensors + [t for f in firsts for t in f]
        self.phase = "first"
        try:
            grads = torch.autograd.grad(out["energy"].sum(), inputs, create_graph=want_forces, allow_unused=True)
        finally:
            self.phase = "off"
        model_out = None
        if outputs:
            model_out = {"energy": out["energy"].detach(), "forces": _neg(grads[0], pos).detach(),
                         "stress": _stress(grads[1], data["cell"]) if stress else None}
        off = len(lead) + len(dtensors)
        dgrads = grads[len(lead):off]
        for layer, f in zip(layers, firsts):
            layer.set_first(grads[off:off + len(f)], want_forces)
            off += len(f)
        dtype, device = sk.factors[0][0].dtype, sk.factors[0][0].device
        energy = torch.zeros(n, sk.k, dtype=dtype, device=device)
        with torch.no_grad():  # taps and first-backward adjoints carry graphs: the sketches must not
            for layer in layers:
                layer.energy(sk, energy)
            _direct_sketch(sk, dparams, [None if g is None else g.unsqueeze(0) for g in dgrads], energy)
        if not want_forces:
            return energy, None, model_out
        forces = -grads[0]
        seconds = [layer.second_inputs() for layer in layers]
        second_in = dtensors + [t for s in seconds for t in s]
        parts = []
        vmap = self.route.vmap if vmap is None else vmap
        batched = vectors.is_cuda if vmap is None else vmap
        size, start = _vec_chunk(vectors.device, batched and bool(self.direct)), 0
        while start < vectors.shape[0]:
            vc = vectors[start:start + min(size, self.vec_cap or size)]
            J = vc.shape[0]
            try:
                g2 = _double_backward(forces, second_in, vc, batched)
            except torch.OutOfMemoryError:
                if not batched or J == 1:
                    raise
                # one vmapped call holds J second-order graphs at once (13.7x a plain MD step's memory for 8
                # probes on mp0-medium, bench/RESULTS.md, GPU): halve J for this and every later call
                self.vec_cap = max(1, J // 2)
                warnings.warn(f"ntkal: the force rows' vmapped double backward ran out of GPU memory with {J} "
                              f"projections at once; {self.vec_cap} at a time from now on (same rows, slower)",
                              RuntimeWarning, stacklevel=2)
                continue
            start += J
            part = torch.zeros(J, n, sk.k, dtype=dtype, device=device)
            off = len(dtensors)
            with torch.no_grad():
                _direct_sketch(sk, dparams, g2[:off], part.view(J * n, -1))
                for layer, s in zip(layers, seconds):
                    layer.force(sk, g2[off:off + len(s)], J, part)
                    off += len(s)
            parts.append(part)
        return energy, torch.cat(parts), model_out


def _direct_sketch(sk, dparams, grads, out):
    """Add the sketches of parameter gradients [R, *shape] (None: zero) of (rule, local, tensor) `dparams`
    to out [R, k]: every block of the parameter, as the reference path sketches it."""
    for (layer, local, p), g in zip(dparams, grads):
        if g is None:
            continue
        g = g.reshape(out.shape[0], -1)
        for bi in layer.blocks[local]:
            b = sk.blocks[bi]
            out += sk.block_sketch(bi, g[:, b.offset:b.offset + b.numel])


def _neg(grad, like):
    """−grad (zeros where the energy does not depend on `like`)."""
    return torch.zeros_like(like) if grad is None else -grad


def _stress(grad, cell):
    """MACE's stress (mace.modules.utils.compute_forces_virials): ∂E/∂ε over the cell volume [n, 3, 3]."""
    grad = torch.zeros_like(cell.view(-1, 3, 3)) if grad is None else grad.detach()
    volume = torch.linalg.det(cell.detach().view(-1, 3, 3)).abs().view(-1, 1, 1)
    out = grad / volume
    return torch.where(out.abs() < 1e10, out, torch.zeros_like(out))


def _vec_chunk(device, single_vmapped: bool = False) -> int:
    """Projections whose adjoints are held and sketched together. On a CPU the double backwards run one
    at a time anyway and 2-4 measured as fast as 16 with half the peak memory (tiny model, 16 exact-row
    structures: 0.85 vs 1.38 GB); on CUDA they are one vmapped call, which wants more, and so does one
    structure's vmapped direct call on a CPU (the calculator's: half the sketch calls, same backward time)."""
    return 16 if torch.device(device).type == "cuda" or single_vmapped else 4


def _double_backward(forces, inputs, vectors, batched: bool):
    """∂(v_j·F)/∂inputs for every row v_j of `vectors`, stacked [J, ...] (None where unused).

    On a GPU one vmapped backward (is_grads_batched); on a CPU a loop, which measured 1.8x faster there.
    """
    if batched:
        return torch.autograd.grad(forces, inputs, grad_outputs=vectors, retain_graph=True, allow_unused=True,
                                   is_grads_batched=True)
    per = [torch.autograd.grad(forces, inputs, grad_outputs=v, retain_graph=True, allow_unused=True) for v in vectors]
    return [None if g[0] is None else torch.stack(g) for g in zip(*per)]


def fast_rows(fz, atoms_list, data_list=None) -> RowBlock:
    """RowBlock of energy / force / joint rows for `atoms_list`, batched (same rows as the reference path).

    Exact force rows cost one double backward per row index up to 3·N_max of the batch, so those
    batches are formed from structures of similar size (rows come back in the input order). On a CPU,
    batches with force rows hold at most FORCE_BATCH_CPU structures; with a memory budget, batches are
    split further to fit it (fz.memory, memory.py).
    """
    data_list = fz.atomic_data(atoms_list) if data_list is None else data_list
    want_forces = fz.kernel in ("force", "joint")
    cap = fz.batch_size
    if want_forces and fz.device.type == "cpu":
        cap = min(cap, FORCE_BATCH_CPU)
    if want_forces and fz.force_probes is None:
        groups = size_groups([len(a) for a in atoms_list], cap)
    else:
        groups = [list(range(len(atoms_list)))]
    units = fz.units(data_list)
    key = f"fast:{fz.kernel}:{fz.force_probes}"
    blocks, order = [], []
    for g in groups:
        for idx in fz.memory.batches(key, g, units, cap):
            with fz.memory.measure(key, sum(units[i] for i in idx)):
                blocks.append(_fast_batch(fz, [atoms_list[i] for i in idx], [data_list[i] for i in idx]))
            order.extend(idx)
    out = blocks[0] if len(blocks) == 1 else RowBlock.cat(blocks)
    if order != list(range(len(atoms_list))):
        inverse = torch.empty(len(order), dtype=torch.int64)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        out = out.select(inverse)
    return out


def size_groups(sizes, batch_size: int, slack: float = 1.25):
    """Indices grouped into batches of ≤ batch_size whose largest size is ≤ slack × their smallest."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    groups, cur = [], []
    for i in order:
        if cur and (len(cur) >= batch_size or sizes[i] > slack * sizes[cur[0]]):
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    return groups


def rows_and_outputs(fz, atoms_list, stress: bool = False, data_list=None, vmap: Optional[bool] = None):
    """(RowBlock, model outputs) of one batch from one forward and backward: the rows fast_rows gives and
    the model's {"energy" [n], "forces" [atoms, 3], "stress" [n, 3, 3] or None} on the featurizer's head,
    dtype and device (FastTaps.run). For the calculator (ntkal/calculator.py): one structure per step. On a
    CPU its probe double backwards are vmapped only for a small structure differentiated directly: 8 probes,
    vmapped / loop time 0.83 at 8 atoms, 0.88-0.99 at 13-16, 1.02 at 26, 1.42-1.60 at 32-64 (python -m
    bench.probe_vmap); on mp0-medium (taps, 65 atoms) the loop halved the MD step's cost and cut its peak from
    3.7x to 2.1x a plain step's (bench/RESULTS.md, md). vmap: True / False force it; None decides as above (and
    vmaps on CUDA)."""
    data_list = fz.atomic_data(atoms_list) if data_list is None else data_list
    taps = fz._taps
    if (vmap is None and len(atoms_list) == 1 and len(atoms_list[0]) <= VMAP_MAX_ATOMS_CPU
            and taps.route.direct_single and taps.small):
        vmap = True
    return _fast_batch(fz, list(atoms_list), data_list, outputs=True, stress=stress, vmap=vmap)


def _fast_batch(fz, atoms_list, data_list, outputs: bool = False, stress: bool = False, vmap=None):
    want_forces = fz.kernel in ("force", "joint")
    want_energy = fz.kernel in ("energy", "joint")
    n = len(atoms_list)
    data = fz.collate(data_list)
    natoms = torch.tensor([len(a) for a in atoms_list], dtype=torch.int64)
    vectors = None
    if want_forces:
        n_at = int(natoms.sum())
        if fz.force_probes is None:  # unit vector j of every structure with 3N > j: exact rows, atom-major
            n_vec = 3 * int(natoms.max())
            starts = torch.cumsum(natoms, 0) - natoms
            s_of = torch.repeat_interleave(torch.arange(n), 3 * natoms)
            j_of = torch.cat([torch.arange(3 * int(c)) for c in natoms])
            flat = (starts[s_of] * 3 + j_of)
            vectors = torch.zeros(n_vec, n_at * 3, dtype=fz.dtype)
            vectors[j_of, flat] = 1.0
            vectors = vectors.view(n_vec, n_at, 3).to(fz.device)
        else:
            vectors = torch.cat([fz.probe_vectors(a, fz.force_probes).reshape(fz.force_probes, -1, 3)
                                 for a in atoms_list], dim=1)
    energy, frows, *model_out = fz._taps.run(data, n, want_forces, vectors, outputs, stress, vmap)
    psi = (energy / natoms.to(energy)[:, None]).detach()
    force_rows = None
    if want_forces:
        scale = 1.0 if fz.force_probes is None else 1.0 / math.sqrt(fz.force_probes)
        counts = (3 * natoms).tolist() if fz.force_probes is None else [fz.force_probes] * n
        force_rows = [frows[:r, s] * scale for s, r in enumerate(counts)]
    rows = structure_rows(psi, force_rows, natoms, want_energy, fz.force_probes is None)
    return (rows, model_out[0]) if outputs else rows
