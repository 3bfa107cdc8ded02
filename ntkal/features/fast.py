"""Fast batched NTK features: one forward + backward per chunk, with taps on every parametrised layer.

A weight W used linearly on per-row vectors, y_i = α x_i W (e3nn Linear instruction blocks, radial-MLP
layers), has the per-structure energy gradient α Σ_{rows i of s} x_i ⊗ dy_i, dy = ∂E/∂y. A force
projection L = v·F (v a probe or a unit vector) adds the double-backward term:
∂L/∂W = α Σ_i (x_i ⊗ ȳ_i + ā_i ⊗ dy_i), with ȳ = ∂L/∂y and ā = ∂L/∂(∂E/∂x), because W enters L through
the forward y = αxW and through the first backward's ∂E/∂x = α W dy. The taps record x, y and ∂E/∂x;
autograd gives dy, ȳ and ā for all structures of a chunk at once (the graph is block diagonal), and
`ntk_kernels.tensor_sketch` (or a per-structure outer product and the dense block sketch, whichever
costs fewer flops) sketches them with one segment per structure.

Weights used in more entangled ways (tensor-product paths, symmetric contractions) get a zero
per-structure perturbation Δ_s instead: their layers are linear in their weights, so
y(W + Δ_s) = y(W) + y(Δ_s), and ∂E/∂Δ_s is structure s's gradient. The features equal the reference
path's (same sketch, same seed) to rounding.
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

import ntk_kernels

from .rowblock import RowBlock, structure_rows

ROUTES = ("auto", "rows", "dense")
# Structures per batch for force rows on a CPU: the per-projection double backward ran ~1.2x faster on
# batches of 16 than of 64 there (bench/RESULTS.md); exact-row batches are also grouped by size.
FORCE_BATCH_CPU = 16


class UnsupportedModel(ValueError):
    """A parameter of the model has no fast-path rule; the reference path handles it."""


@dataclass
class _LinearUse:
    """One call of a tapped layer: its input rows, output (pre-activation) rows and, later, ∂E/∂x."""

    x: torch.Tensor
    y: torch.Tensor
    dx: Optional[torch.Tensor] = None


@dataclass
class _Tapped:
    """A layer whose weight is used as y = α x W, with the blocks of its weight in the sketch."""

    module: torch.nn.Module
    kind: str  # "linear" (e3nn o3.Linear, rows = atoms x irrep components) or "dense" (rows x features)
    rows: str  # "node" or "edge"
    blocks: List[int]  # indices into Sketch.blocks
    uses: List[_LinearUse] = field(default_factory=list)


@dataclass
class _Perturbed:
    """A layer (tensor product, symmetric contraction) whose weights get a zero per-structure perturbation."""

    module: torch.nn.Module
    locals_: Dict[str, int]  # its selected parameter (local name) -> index in Sketch.names
    others: List[str]  # its unselected parameters (zeroed in the perturbation call)
    deltas: Dict[str, torch.Tensor] = field(default_factory=dict)


def _owner(model: torch.nn.Module, name: str):
    """(module that uses parameter `name`, its local name there); a ParameterList's owner is its parent."""
    prefix, local = name.rsplit(".", 1) if "." in name else ("", name)
    mod = model.get_submodule(prefix)
    if type(mod).__name__ == "ParameterList" and "." in prefix:
        parent, list_name = prefix.rsplit(".", 1)
        return model.get_submodule(parent), f"{list_name}.{local}", parent
    return mod, local, prefix


class FastTaps:
    """Installs the taps on a private model copy and turns one chunk into per-structure sketches."""

    def __init__(self, model: torch.nn.Module, sketch):
        from e3nn import o3
        from e3nn.nn._fc import _Layer

        self.model, self.sketch = model, sketch
        self.route = "auto"  # sketch route per block: "auto" (fewer flops), "rows" (tensor_sketch) or "dense"
        self.vmap_perturbation = True  # perturbed layers: one vmapped call (True) or a loop over structures
        self.vmap = None  # double backward over projections: vmapped (True), a loop (False), None: vmapped on CUDA
        self.vec_chunk = 16  # projections sketched together (bounds the [J, rows, features] adjoints held at once)
        self.tapped: Dict[str, _Tapped] = {}
        self.perturbed: Dict[str, _Perturbed] = {}
        blocks_of: Dict[str, List[int]] = {}
        for i, b in enumerate(sketch.blocks):
            blocks_of.setdefault(b.param, []).append(i)
        for j, name in enumerate(sketch.names):
            mod, local, prefix = _owner(model, name)
            if local == "weight" and isinstance(mod, o3.Linear) and all(
                    ins.i_in >= 0 for ins in mod.instructions):
                self.tapped[prefix] = _Tapped(mod, "linear", "node", blocks_of[name])
            elif local == "weight" and isinstance(mod, _Layer):
                self.tapped[prefix] = _Tapped(mod, "dense", "edge", blocks_of[name])
            elif (isinstance(mod, o3.TensorProduct) and local == "weight") or type(mod).__name__ == "Contraction":
                p = self.perturbed.setdefault(prefix, _Perturbed(mod, {}, []))
                p.locals_[local] = j
            else:
                raise UnsupportedModel(f"no fast-path rule for parameter {name} ({type(mod).__name__})")
        for p in self.perturbed.values():
            p.others = [n for n, _ in p.module.named_parameters() if n not in p.locals_]
        self._guard = False
        self._phase = "off"
        self._ptr = None
        self._handles = []
        for t in self.tapped.values():
            if t.kind == "linear":
                self._handles.append(t.module.register_forward_hook(self._linear_hook(t)))
            else:
                if not hasattr(t.module, "_ntkal_taps"):
                    t.module._ntkal_taps = []
                    t.module.forward = types.MethodType(_tapped_layer_forward, t.module)
                t.module._ntkal_taps.append((self, t))
        for p in self.perturbed.values():
            self._handles.append(p.module.register_forward_hook(self._perturb_hook(p)))

    # --- taps ----------------------------------------------------------------------------------
    def _record(self, t: _Tapped, x: torch.Tensor, y: torch.Tensor):
        if self._phase != "forward":
            return
        use = _LinearUse(x, y)
        t.uses.append(use)
        if x.requires_grad:
            def keep(g, use=use):
                if self._phase == "first":
                    use.dx = g
            x.register_hook(keep)

    def _linear_hook(self, t: _Tapped):
        def hook(module, inputs, output):
            self._record(t, inputs[0], output)
        return hook

    def _perturb_hook(self, p: _Perturbed):
        def hook(module, inputs, output):
            if self._phase != "forward" or self._guard:
                return None
            ptr = self._ptr
            if any(x.shape[0] != int(ptr[-1]) for x in inputs if torch.is_tensor(x)):
                raise UnsupportedModel(f"{type(module).__name__} is not applied per atom")
            zeros = {n: torch.zeros_like(q) for n, q in module.named_parameters() if n in p.others}
            self._guard = True
            try:
                if self.vmap_perturbation:  # one vmapped call over zero-padded per-structure rows
                    sizes = (ptr[1:] - ptr[:-1]).tolist()
                    pos = torch.cat([torch.arange(c) + s * max(sizes) for s, c in enumerate(sizes)]).to(output.device)
                    padded = [_pad(x, pos, len(sizes), max(sizes)) if torch.is_tensor(x) else x for x in inputs]

                    def one(deltas, *args):
                        return torch.func.functional_call(module, {**zeros, **deltas}, args)
                    extra = torch.func.vmap(one)(p.deltas, *padded)
                    extra = [extra.reshape(-1, *extra.shape[2:]).index_select(0, pos)]
                else:
                    extra = []
                    for s in range(len(ptr) - 1):
                        a, b = int(ptr[s]), int(ptr[s + 1])
                        params = dict(zeros)
                        params.update({n: d[s] for n, d in p.deltas.items()})
                        args = tuple(x[a:b] if torch.is_tensor(x) else x for x in inputs)
                        extra.append(torch.func.functional_call(module, params, args))
            finally:
                self._guard = False
            return output + torch.cat(extra)
        return hook

    # --- one chunk -----------------------------------------------------------------------------
    def run(self, data: dict, n_struct: int, want_forces: bool, vectors: Optional[torch.Tensor] = None):
        """Energy-row sketches [n, k] and, with forces, force-row sketches [J, n, k] (see _run)."""
        try:
            energy, forces = self._run(data, n_struct, want_forces, vectors)
            return energy.detach(), None if forces is None else forces.detach()
        finally:
            self._release()

    def _release(self):
        """Drop the chunk's taps. A tap's gradient hook refers back to its input tensor (a reference
        cycle), so without this each chunk's autograd graph would live until Python's cyclic GC ran:
        measured +3 GB RSS over one 1,000-structure pool."""
        for t in self.tapped.values():
            for use in t.uses:
                use.x = use.y = use.dx = None
            t.uses.clear()
        for p in self.perturbed.values():
            p.deltas = {}

    def _run(self, data: dict, n_struct: int, want_forces: bool, vectors: Optional[torch.Tensor] = None):
        """Energy-row sketches [n, k] and, with forces, force-row sketches [J, n, k] for J projections.

        vectors [J, atoms, 3]: projection v_j of the chunk's forces (each structure's part of one
        probe, or one unit vector per structure); they are pushed through the double backward and
        sketched `vec_chunk` at a time.
        """
        sk = self.sketch
        ptr = data["ptr"].cpu()
        self._ptr = ptr
        node_seg = data["batch"]
        segs = {"node": node_seg, "edge": node_seg[data["edge_index"][0]]}
        for t in self.tapped.values():
            t.uses.clear()
        for p in self.perturbed.values():
            p.deltas = {n: torch.zeros((n_struct,) + tuple(sk.parameters[j].shape), dtype=sk.parameters[j].dtype,
                                       device=sk.parameters[j].device, requires_grad=True)
                        for n, j in p.locals_.items()}
        pos = data["positions"]
        if want_forces:
            pos.requires_grad_(True)
        self._phase = "forward"
        try:
            out = self.model(data, training=want_forces, compute_force=False)
        finally:
            self._phase = "off"
        uses = [(t, u) for t in self.tapped.values() for u in t.uses]
        deltas = [(p, n, d) for p in self.perturbed.values() for n, d in p.deltas.items()]
        inputs = ([pos] if want_forces else []) + [u.y for _, u in uses] + [d for _, _, d in deltas]
        self._phase = "first"
        try:
            grads = torch.autograd.grad(out["energy"].sum(), inputs, create_graph=want_forces, allow_unused=True)
        finally:
            self._phase = "off"
        off = 1 if want_forces else 0
        dys = [_or_zeros(g, u.y) for g, (_, u) in zip(grads[off:off + len(uses)], uses)]
        dds = [_or_zeros(g, d) for g, (_, _, d) in zip(grads[off + len(uses):], deltas)]
        energy = self._sketch_all(uses, dys, None, None, dds, deltas, segs, n_struct)
        if not want_forces:
            return energy, None
        forces = -grads[0]
        dxs = [u.dx for _, u in uses]
        with_dx = [d for d in dxs if d is not None]
        second_in = [u.y for _, u in uses] + with_dx + [d for _, _, d in deltas]
        parts = []
        for vc in vectors.split(self.vec_chunk):
            J = vc.shape[0]
            g2 = _double_backward(forces, second_in, vc, batched=vc.is_cuda if self.vmap is None else self.vmap)
            ybar = [_or_zeros(g, u.y, J) for g, (_, u) in zip(g2[:len(uses)], uses)]
            it = iter(g2[len(uses):len(uses) + len(with_dx)])
            abar = [None if d is None else _or_zeros(next(it), d, J) for d in dxs]
            dd2 = [_or_zeros(g, d, J) for g, (_, _, d) in zip(g2[len(uses) + len(with_dx):], deltas)]
            parts.append(self._sketch_all(uses, dys, ybar, abar, dd2, deltas, segs, n_struct, J))
        return energy, torch.cat(parts)

    def _sketch_all(self, uses, dys, ybars, abars, dds, deltas, segs, n, J=None):
        """Σ over blocks of the per-structure sketches: [n, k] for the energy (ybars None), else [J, n, k].

        Energy: Σ_rows α x ⊗ dy. Force projection j: Σ_rows α (x ⊗ ȳ_j + ā_j ⊗ dy); ā_j is absent when x
        does not depend on the positions.
        """
        sk = self.sketch
        lead = () if J is None else (J,)
        out = torch.zeros(lead + (n, sk.k), dtype=sk.factors[0][0].dtype, device=sk.factors[0][0].device)
        flat = out.view(-1, sk.k)
        for u_i, (t, u) in enumerate(uses):
            seg = segs[t.rows]
            if ybars is None:
                for bi, alpha, xs, ys in _block_rows(t, u.x, dys[u_i]):
                    flat += self._block(bi, [(xs * alpha, ys, False, False)], _row_seg(seg, xs.shape[0]), n, 1)
                continue
            first = _block_rows(t, u.x, ybars[u_i])
            if abars[u_i] is None:
                for bi, alpha, xs, ys in first:
                    flat += self._block(bi, [(xs * alpha, ys, False, True)], _row_seg(seg, xs.shape[0]), n, J)
                continue
            for (bi, alpha, xs, ys), (_, _, a_rows, dy_rows) in zip(first, _block_rows(t, abars[u_i], dys[u_i])):
                terms = [(xs * alpha, ys, False, True), (a_rows * alpha, dy_rows, True, False)]
                flat += self._block(bi, terms, _row_seg(seg, xs.shape[0]), n, J)
        for (p, name, _), g in zip(deltas, dds):
            j = p.locals_[name]
            g = g.reshape(-1, g[0].numel() if J is None else g[0, 0].numel())
            for bi, b in enumerate(sk.blocks):
                if sk.block_param[bi] == j:
                    flat += sk.block_sketch(bi, g[:, b.offset:b.offset + b.numel])
        return out

    def _block(self, bi, terms, seg, n, J):
        """Sketch [J·n, k] of Σ_{rows of s} a ⊗ b summed over `terms` for every (projection j, structure s).

        A term is (a, b, a_batched, b_batched): a batched side has J·R rows (j-major), the other R rows
        shared by every j. Routes: "rows" = the fused tensor sketch over rows (segments j·n + s);
        "dense" = per-structure outer products (matmuls per structure on CPU, a padded bmm on GPU) and
        the block's dense sketch.
        """
        sk = self.sketch
        A, B = sk.factors[bi]
        R = seg.shape[0]
        d1, d2, k = terms[0][0].shape[1], terms[0][1].shape[1], sk.k
        counts = torch.bincount(seg, minlength=n)
        maxlen = int(counts.max()) if counts.numel() else 0
        route = self.route
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        if route == "auto":
            dense_cost = len(terms) * J * n * maxlen * d1 * d2 + 2 * J * n * d1 * d2 * k
            rows_cost = len(terms) * J * R * (d1 + d2) * k
            big = J > 1 and J * R * max(d1, d2) > (1 << 24)
            route = "dense" if dense_cost < rows_cost or big else "rows"
        if route == "rows":
            full = torch.cat([seg + j * n for j in range(J)]) if J > 1 else seg
            xs, ys = [], []
            for a, b, a_b, b_b in terms:
                xs.append(a if a_b or J == 1 else a.repeat(J, 1))
                ys.append(b if b_b or J == 1 else b.repeat(J, 1))
            x2, y2 = (xs[1], ys[1]) if len(terms) > 1 else (None, None)
            return ntk_kernels.tensor_sketch(xs[0].contiguous(), ys[0].contiguous(), A, B, full, J * n,
                                             None if x2 is None else x2.contiguous(),
                                             None if y2 is None else y2.contiguous()).to(A.dtype)
        G = None
        for a, b, a_b, b_b in terms:
            if a_b:  # [J·R, d1] -> [R, J·d1]; G[s] = [J·d1, d2] -> [J, n, d1, d2]
                a = a.view(J, R, d1).permute(1, 0, 2).reshape(R, J * d1)
                g = _segment_outer(a, b, seg, counts, maxlen).view(n, J, d1, d2).transpose(0, 1)
            elif b_b:
                b = b.view(J, R, d2).permute(1, 0, 2).reshape(R, J * d2)
                g = _segment_outer(a, b, seg, counts, maxlen).view(n, d1, J, d2).permute(2, 0, 1, 3)
            else:
                g = _segment_outer(a, b, seg, counts, maxlen)
            G = g if G is None else G + g
        return sk.block_sketch(bi, G.reshape(J * n, d1 * d2))


def _double_backward(forces, inputs, vectors, batched: bool):
    """∂(v_j·F)/∂inputs for every row v_j of `vectors`, stacked [J, ...] (None where unused).

    On a GPU one vmapped backward (is_grads_batched); on a CPU a loop, which measured 1.8x faster there.
    """
    if batched:
        return torch.autograd.grad(forces, inputs, grad_outputs=vectors, retain_graph=True, allow_unused=True,
                                   is_grads_batched=True)
    per = [torch.autograd.grad(forces, inputs, grad_outputs=v, retain_graph=True, allow_unused=True) for v in vectors]
    return [None if g[0] is None else torch.stack(g) for g in zip(*per)]


def _pad(x: torch.Tensor, pos: torch.Tensor, n: int, maxlen: int) -> torch.Tensor:
    """[rows, ...] -> [n, maxlen, ...]: each structure's rows at the front of its slot, zeros after."""
    out = x.new_zeros((n * maxlen,) + tuple(x.shape[1:])).index_copy(0, pos, x)
    return out.view((n, maxlen) + tuple(x.shape[1:]))


def _or_zeros(g, like, J=None):
    if g is not None:
        return g
    return torch.zeros_like(like) if J is None else like.new_zeros((J,) + tuple(like.shape))


def _row_seg(seg: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Structure id of every row of a tapped layer (atoms x irrep components for e3nn Linear)."""
    reps = n_rows // seg.shape[0]
    return seg if reps == 1 else seg.repeat_interleave(reps)


def _block_rows(t: _Tapped, x: torch.Tensor, y: torch.Tensor):
    """(block index, α, x rows, y rows) for every sketch block of the layer's weight.

    e3nn Linear: instruction (i_in -> i_out, [mul_in, mul_out], α) maps x[z, u, m] to y[z, w, m], so its
    rows are (atom z, component m) with x[z, :, m] and y[z, :, m]. _Layer: rows are the edges.
    """
    if t.kind == "dense":
        m = t.module
        alpha = 1.0 / math.sqrt(m.h_in * m.var_in) if m.act is not None else 1.0 / math.sqrt(m.h_in * m.var_in / m.var_out)
        yield t.blocks[0], alpha, x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        return
    mod = t.module
    sl_in, sl_out = mod.irreps_in.slices(), mod.irreps_out.slices()
    for bi, ins in zip(t.blocks, mod.instructions):
        mi, mo = mod.irreps_in[ins.i_in], mod.irreps_out[ins.i_out]
        d = mi.ir.dim
        xs = x.narrow(-1, sl_in[ins.i_in].start, mi.dim).reshape(-1, mi.mul, d).transpose(1, 2).reshape(-1, mi.mul)
        ys = y.narrow(-1, sl_out[ins.i_out].start, mo.dim).reshape(-1, mo.mul, d).transpose(1, 2).reshape(-1, mo.mul)
        yield bi, ins.path_weight, xs, ys


def _segment_outer(a: torch.Tensor, b: torch.Tensor, seg: torch.Tensor, counts: torch.Tensor,
                   maxlen: int) -> torch.Tensor:
    """G[s] = Σ_{rows i with seg_i = s} a_i ⊗ b_i for sorted seg with `counts` rows per segment: [n, d_a, d_b].

    On a GPU one padded batched matmul; on a CPU one matmul per structure (no padding to fill).
    """
    n = counts.shape[0]
    if not a.is_cuda:
        sizes = counts.tolist()
        return torch.stack([x.T @ y for x, y in zip(a.split(sizes), b.split(sizes))])
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(a.shape[0], device=a.device) - starts[seg] + seg * maxlen
    return torch.bmm(_pad(a, pos, n, maxlen).transpose(1, 2), _pad(b, pos, n, maxlen))


def _tapped_layer_forward(self, x):
    """e3nn's _Layer.forward, arithmetic unchanged, with its pre-activation x @ w tapped."""
    if self.act is not None:
        w = self.weight / (self.h_in * self.var_in) ** 0.5
        pre = x @ w
        out = self.act(pre) * self.var_out ** 0.5
    else:
        w = self.weight / (self.h_in * self.var_in / self.var_out) ** 0.5
        pre = out = x @ w
    for taps, t in self._ntkal_taps:
        taps._record(t, x, pre)
    return out


def fast_rows(fz, atoms_list) -> RowBlock:
    """RowBlock of energy / force / joint rows for `atoms_list`, batched (same rows as the reference path).

    Exact force rows cost one double backward per row index up to 3·N_max of the batch, so those
    batches are formed from structures of similar size (rows come back in the input order).
    On a CPU, batches with force rows hold at most FORCE_BATCH_CPU structures.
    """
    batch = fz.batch_size
    if fz.kernel in ("force", "joint") and fz.device.type == "cpu":
        batch = min(batch, FORCE_BATCH_CPU)
    if fz.kernel in ("force", "joint") and fz.force_probes is None:
        groups = size_groups([len(a) for a in atoms_list], batch)
    else:
        groups = [list(range(s, min(s + batch, len(atoms_list)))) for s in range(0, len(atoms_list), batch)]
    blocks = [_fast_batch(fz, [atoms_list[i] for i in g]) for g in groups]
    out = blocks[0] if len(blocks) == 1 else RowBlock.cat(blocks)
    order = [i for g in groups for i in g]
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


def _fast_batch(fz, atoms_list) -> RowBlock:
    want_forces = fz.kernel in ("force", "joint")
    want_energy = fz.kernel in ("energy", "joint")
    n = len(atoms_list)
    data = fz.batch(atoms_list)
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
    energy, frows = fz._taps.run(data, n, want_forces, vectors)
    psi = (energy / natoms.to(energy)[:, None]).detach()
    force_rows = None
    if want_forces:
        scale = 1.0 if fz.force_probes is None else 1.0 / math.sqrt(fz.force_probes)
        counts = (3 * natoms).tolist() if fz.force_probes is None else [fz.force_probes] * n
        force_rows = [frows[:r, s] * scale for s, r in enumerate(counts)]
    return structure_rows(psi, force_rows, natoms, want_energy, fz.force_probes is None)
