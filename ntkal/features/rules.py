"""Per-layer rules of the fast path (fast.py): for each parametrised layer type, how one batched forward
and backward yield every structure's sketched parameter gradient.

A weight used linearly on rows, y_r = α x_r W (e3nn Linear blocks, radial-MLP layers), has the energy
gradient α Σ_{rows r of s} x_r ⊗ dy_r, dy = ∂E/∂y; a force projection L = v·F adds the double-backward
term: ∂L/∂W = α Σ_r (x_r ⊗ ȳ_r + ā_r ⊗ dy_r), ȳ = ∂L/∂y, ā = ∂L/∂(∂E/∂x), because W enters L through the
forward and through the first backward's ∂E/∂x = α W dy. Taps record x, y and ∂E/∂x ("TapRule").

Element-indexed weights (ElementTP: MACE's skip_tp = FullyConnectedTensorProduct(h, one_hot(Z)), a
linear map per element, W[u, Z, w]; the same rule with the element factor of the tensor sketch taken
per (structure, element) group) and symmetric contractions (GroupedContraction: weights [element,
path, channel], per atom only the atom's element block is used) are sketched per (structure, element)
group, so no per-structure dense gradient of their ~90 % of a foundation model's parameters is formed.

DenseRule gives radial-MLP layers a zero per-structure weight Δ_s instead of taps, so a projection's
double backward returns [structures, d_in, d_out] rather than per-edge adjoints. These three (big_only)
serve layers of at least BIG_LAYER_NUMEL weights (fast.FastRoute); smaller ones keep taps (DenseTapRule)
and the per-structure perturbation, which are cheaper to call. BesselRule handles the radial basis
weights that fine-tuning with mace_run_train makes trainable.

RULES maps a layer type to its rule (first match wins). A rule takes a parameter when the sketch laid it
out as the rule's sketching expects (Rule.layouts: sketch._module_blocks is the one classification of
layer types) and the layer's mechanics fit the rule (Rule.claims). PerStructure (a zero per-structure
weight perturbation, exact for any layer that is linear in its weights) is the fallback for other tensor
products and small layers.
"""
from __future__ import annotations

import math
import types
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

import ntk_kernels

from .sketch import CONTRACTION, E3NN_LINEAR, MLP_LAYER, TENSOR_PRODUCT


# Layers whose weights have fewer elements than this keep the cheaper-to-call routes (taps for radial-MLP
# layers, the per-structure perturbation for tensor products and contractions): on the shipped 33k-parameter
# model those measured 15-20 % faster than the element-group and Δ routes, whose point is bounded memory on
# foundation-size layers (bench/RESULTS.md, features). The default of fast.FastRoute.big_layer_numel.
BIG_LAYER_NUMEL = 1 << 15


class UnsupportedModel(ValueError):
    """A parameter of the model has no fast-path rule; the reference path handles it."""


@dataclass
class Chunk:
    """What the rules need of one chunk: structure count, atom and edge segments, settings."""

    n: int
    ptr: torch.Tensor  # [n + 1] on the CPU
    node_seg: torch.Tensor
    edge_seg: torch.Tensor
    route: str = "auto"

    def seg_for(self, n_rows: int) -> torch.Tensor:
        if n_rows == self.node_seg.shape[0]:
            return self.node_seg
        if n_rows == self.edge_seg.shape[0]:
            return self.edge_seg
        raise UnsupportedModel(f"a tapped layer has {n_rows} rows, neither atoms nor edges")


@dataclass
class Groups:
    """(structure, element) groups of a chunk's atoms: atom -> group id, group -> element, structure."""

    of_atom: torch.Tensor
    element: torch.Tensor
    struct: torch.Tensor

    @property
    def n(self) -> int:
        return self.element.shape[0]

    @classmethod
    def from_onehot(cls, onehot: torch.Tensor, node_seg: torch.Tensor) -> "Groups":
        n_el = onehot.shape[1]
        elem = onehot.argmax(dim=1)
        if not torch.equal(onehot, torch.nn.functional.one_hot(elem, n_el).to(onehot.dtype)):
            raise UnsupportedModel("an element-indexed layer was not given one-hot element attributes")
        uniq, inverse = torch.unique(node_seg * n_el + elem, return_inverse=True)
        return cls(inverse, uniq % n_el, uniq // n_el)


def _zeros(g, like, J=None):
    if g is not None:
        return g
    return torch.zeros_like(like) if J is None else like.new_zeros((J,) + tuple(like.shape))


def _row_seg(seg: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Segment of every row of a tapped layer (atoms x irrep components for e3nn layers)."""
    reps = n_rows // seg.shape[0]
    return seg if reps == 1 else seg.repeat_interleave(reps)


def _pad(x: torch.Tensor, pos: torch.Tensor, n: int, maxlen: int) -> torch.Tensor:
    """[rows, ...] -> [n, maxlen, ...]: each segment's rows at the front of its slot, zeros after."""
    out = x.new_zeros((n * maxlen,) + tuple(x.shape[1:])).index_copy(0, pos, x)
    return out.view((n, maxlen) + tuple(x.shape[1:]))


def _segment_outer(a, b, seg, counts, maxlen):
    """G[s] = Σ_{rows i with seg_i = s} a_i ⊗ b_i for sorted seg: [n, d_a, d_b].

    On a GPU one padded batched matmul; on a CPU one matmul per segment (no padding to fill).
    """
    n = counts.shape[0]
    if not a.is_cuda:
        return torch.stack([x.T @ y for x, y in zip(a.split(counts.tolist()), b.split(counts.tolist()))])
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(a.shape[0], device=a.device) - starts[seg] + seg * maxlen
    return torch.bmm(_pad(a, pos, n, maxlen).transpose(1, 2), _pad(b, pos, n, maxlen))


def _take(t, perm, J, batched):
    """Rows `perm` of t ([R, d], or [J·R, d] j-major when batched)."""
    if not batched or J == 1:
        return t[perm]
    return t.view(J, -1, t.shape[-1])[:, perm].reshape(-1, t.shape[-1])


def sketch_pairs(A, B, terms, seg, n_seg, J, route="auto"):
    """[J·n_seg, k]: Σ_{rows of segment s} a ⊗ b over `terms`, sketched with factors A [d_a, k], B [d_b, k].

    A term is (a, b, a_batched, b_batched): a batched side has J·R rows (j-major), the other R rows shared
    by every j. Routes: "rows" = the fused tensor sketch over rows (ntk_kernels.tensor_sketch, segments
    j·n_seg + s); "dense" = per-segment outer products and a dense sketch; "auto" the fewer flops.
    Unsorted segments ((structure, element) groups) are sorted first.
    """
    k = A.shape[1]
    R = seg.shape[0]
    d1, d2 = terms[0][0].shape[1], terms[0][1].shape[1]
    if R > 1 and not bool((seg[1:] >= seg[:-1]).all()):  # (structure, element) groups: sort rows by group
        perm = torch.argsort(seg, stable=True)
        seg = seg[perm]
        terms = [(_take(a, perm, J, a_b), _take(b, perm, J, b_b), a_b, b_b) for a, b, a_b, b_b in terms]
    if route == "auto":
        counts = torch.bincount(seg, minlength=n_seg)
        maxlen = int(counts.max()) if counts.numel() else 0
        dense_cost = len(terms) * J * n_seg * maxlen * d1 * d2 + 2 * J * n_seg * d1 * d2 * k
        rows_cost = len(terms) * J * R * (d1 + d2) * k
        big = J > 1 and J * R * max(d1, d2) > (1 << 24)
        route = "dense" if dense_cost < rows_cost or big else "rows"
    if route == "rows":
        full = torch.cat([seg + j * n_seg for j in range(J)]) if J > 1 else seg
        xs, ys = [], []
        for a, b, a_b, b_b in terms:
            xs.append(a if a_b or J == 1 else a.repeat(J, 1))
            ys.append(b if b_b or J == 1 else b.repeat(J, 1))
        x2, y2 = (xs[1], ys[1]) if len(terms) > 1 else (None, None)
        return ntk_kernels.tensor_sketch(xs[0].contiguous(), ys[0].contiguous(), A, B, full, J * n_seg,
                                         None if x2 is None else x2.contiguous(),
                                         None if y2 is None else y2.contiguous()).to(A.dtype)
    if route != "dense":
        raise ValueError(f"route must be auto, rows or dense, got {route!r}")
    counts = torch.bincount(seg, minlength=n_seg)
    maxlen = int(counts.max()) if counts.numel() else 0
    G = None
    for a, b, a_b, b_b in terms:
        if a_b:  # [J·R, d1] -> [R, J·d1]; G[s] = [J·d1, d2] -> [J, n, d1, d2]
            a = a.view(J, R, d1).permute(1, 0, 2).reshape(R, J * d1)
            g = _segment_outer(a, b, seg, counts, maxlen).view(n_seg, J, d1, d2).transpose(0, 1)
        elif b_b:
            b = b.view(J, R, d2).permute(1, 0, 2).reshape(R, J * d2)
            g = _segment_outer(a, b, seg, counts, maxlen).view(n_seg, d1, J, d2).permute(2, 0, 1, 3)
        else:
            g = _segment_outer(a, b, seg, counts, maxlen)
        G = g if G is None else G + g
    G = G.reshape(J * n_seg, d1, d2)
    return (torch.matmul(G, B) * A).sum(-2) / math.sqrt(k)


# --------------------------------------------------------------------------------------------------
# rules
# --------------------------------------------------------------------------------------------------

class Rule:
    """One layer of the model under the fast path: first-backward inputs, double-backward inputs, sketches."""

    big_only = False  # True: only for layers of at least FastRoute.big_layer_numel weights (fast.FastTaps)
    layouts: Optional[tuple] = None  # the sketch layouts (sketch.Block.layer) its sketching relies on; None: any

    @staticmethod
    def claims(module, local) -> bool:
        """Whether the rule's mechanics fit parameter `local` of `module`, already of a layout in `layouts`."""
        raise NotImplementedError

    @classmethod
    def takes(cls, module, local, layouts) -> bool:
        """Whether the rule handles parameter `local` of `module`, whose sketch blocks have layouts `layouts`."""
        return (cls.layouts is None or set(layouts) <= set(cls.layouts)) and cls.claims(module, local)

    def __init__(self, taps, module, prefix: str):
        self._taps = weakref.ref(taps)  # hooks must not keep the taps alive (fast.FastTaps finalizer)
        self.module, self.prefix = module, prefix
        self.params: Dict[str, int] = {}  # local parameter name -> index in Sketch.names
        self.blocks: Dict[str, List[int]] = {}  # local parameter name -> its blocks in Sketch.blocks

    def add(self, local: str, j: int, blocks: List[int]):
        """Take parameter `local` (index j in Sketch.names, sketch blocks `blocks`)."""
        self.params[local] = j
        self.blocks[local] = blocks

    def recording(self) -> bool:
        taps = self._taps()
        return taps is not None and taps.phase == "forward" and not taps.guard and self not in taps.direct

    def install(self) -> list:  # hook handles
        return []

    def begin(self, chunk: Chunk):
        self.chunk = chunk

    def release(self):
        self.chunk = None

    def first_inputs(self) -> list:
        raise NotImplementedError

    def set_first(self, grads, want_forces: bool):
        raise NotImplementedError

    def second_inputs(self) -> list:
        raise NotImplementedError

    def energy(self, sk, out):
        """Add this layer's energy-gradient sketches to out [n, k]."""
        raise NotImplementedError

    def force(self, sk, grads2, J, out):
        """Add the sketches of the force projections' gradients to out [J, n, k]."""
        raise NotImplementedError


@dataclass
class _Use:
    """One call of a tapped layer: input rows, output (pre-activation) rows, ∂E/∂x, element groups."""

    x: torch.Tensor
    y: torch.Tensor
    dx: Optional[torch.Tensor] = None
    groups: Optional[Groups] = None


class TapRule(Rule):
    """A weight used as y = α x W on rows (atoms x components or edges): taps x, y and ∂E/∂x."""

    def __init__(self, taps, module, prefix):
        super().__init__(taps, module, prefix)
        self.uses: List[_Use] = []

    @property
    def weight_blocks(self) -> List[int]:
        return self.blocks["weight"]

    def record(self, x, y, groups=None):
        use = _Use(x, y, groups=groups)
        self.uses.append(use)
        if x.requires_grad:
            me = weakref.ref(self)

            def keep(g, use=use):
                rule = me()
                taps = None if rule is None else rule._taps()
                if taps is not None and taps.phase == "first":
                    use.dx = g
            x.register_hook(keep)

    def begin(self, chunk):
        super().begin(chunk)
        self.uses = []

    def release(self):
        for u in self.uses:
            u.x = u.y = u.dx = None
        self.uses = []
        self.dys = self.with_dx = None
        super().release()

    def first_inputs(self):
        return [u.y for u in self.uses]

    def set_first(self, grads, want_forces):
        self.dys = [_zeros(g, u.y) for g, u in zip(grads, self.uses)]
        self.with_dx = [u for u in self.uses if u.dx is not None] if want_forces else []

    def second_inputs(self):
        return [u.y for u in self.uses] + [u.dx for u in self.with_dx]

    def block_rows(self, x, y):
        """(block index, α, x rows, y rows) for every sketch block of the weight."""
        raise NotImplementedError

    def _emit(self, sk, bi, terms, seg_rows, use, J, out):
        """Sketch `terms` of block bi over the use's rows and add them per structure to out [J·n, k]."""
        fs = sk.factors[bi]
        chunk = self.chunk
        if use.groups is None:
            out += sketch_pairs(fs[0], fs[-1], terms, seg_rows, chunk.n, J, chunk.route)
            return
        g = use.groups  # block (u, element, w): the element factor per (structure, element) group
        s = sketch_pairs(fs[0], fs[2], terms, seg_rows, g.n, J, chunk.route).view(J, g.n, -1)
        s = s * fs[1][g.element]
        out.view(J, chunk.n, -1).index_add_(1, g.struct, s)

    def _seg(self, use):
        return use.groups.of_atom if use.groups is not None else self.chunk.seg_for(use.x.shape[0])

    def energy(self, sk, out):
        for use, dy in zip(self.uses, self.dys):
            seg = self._seg(use)
            for bi, alpha, xs, ys in self.block_rows(use.x, dy):
                self._emit(sk, bi, [(xs * alpha, ys, False, False)], _row_seg(seg, xs.shape[0]), use, 1, out)

    def force(self, sk, grads2, J, out):
        n_use = len(self.uses)
        ybars = [_zeros(g, u.y, J) for g, u in zip(grads2[:n_use], self.uses)]
        abar = {id(u): _zeros(g, u.dx, J) for g, u in zip(grads2[n_use:], self.with_dx)}
        flat = out.view(-1, out.shape[-1])
        for use, dy, ybar in zip(self.uses, self.dys, ybars):
            seg = self._seg(use)
            a = abar.get(id(use))
            first = self.block_rows(use.x, ybar)
            if a is None:
                for bi, alpha, xs, ys in first:
                    self._emit(sk, bi, [(xs * alpha, ys, False, True)], _row_seg(seg, xs.shape[0]), use, J, flat)
                continue
            for (bi, alpha, xs, ys), (_, _, a_rows, dy_rows) in zip(first, self.block_rows(a, dy)):
                terms = [(xs * alpha, ys, False, True), (a_rows * alpha, dy_rows, True, False)]
                self._emit(sk, bi, terms, _row_seg(seg, xs.shape[0]), use, J, flat)


def _irrep_rows(t, sl, mul, d):
    """Rows (row, component m) of an irrep slice of [..., R, dim] features: [.. · R · d, mul]."""
    return t.narrow(-1, sl.start, mul * d).reshape(-1, mul, d).transpose(1, 2).reshape(-1, mul)


class LinearRule(TapRule):
    """e3nn o3.Linear: instruction (i_in -> i_out, α) maps x[z, u, m] to y[z, w, m]; rows (atom z, m)."""

    layouts = (E3NN_LINEAR,)  # one block per instruction

    @staticmethod
    def claims(module, local) -> bool:
        return all(ins.i_in >= 0 for ins in module.instructions)

    def install(self):
        def hook(module, inputs, output):
            if self.recording():
                self.record(inputs[0], output)
        return [self.module.register_forward_hook(hook)]

    def block_rows(self, x, y):
        mod = self.module
        sl_in, sl_out = mod.irreps_in.slices(), mod.irreps_out.slices()
        for bi, ins in zip(self.weight_blocks, mod.instructions):
            mi, mo = mod.irreps_in[ins.i_in], mod.irreps_out[ins.i_out]
            d = mi.ir.dim
            yield (bi, ins.path_weight, _irrep_rows(x, sl_in[ins.i_in], mi.mul, d),
                   _irrep_rows(y, sl_out[ins.i_out], mo.mul, d))


def _dense_alpha(m) -> float:
    """e3nn _Layer: pre = α x W (α from its variances; e3nn/nn/_fc.py)."""
    return 1.0 / math.sqrt(m.h_in * m.var_in if m.act is not None else m.h_in * m.var_in / m.var_out)


class DenseTapRule(TapRule):
    """e3nn FullyConnectedNet layer (_Layer), tapped: pre = α x W through a forward pre-hook on its
    activation module (or the layer's output when it has none). Per projection it holds the adjoints
    [edges, d_out] of every layer (DenseRule, for big layers, holds [structures, d_in, d_out])."""

    layouts = (MLP_LAYER,)  # one block [d_in, d_out]

    @staticmethod
    def claims(module, local) -> bool:
        return module.act is None or isinstance(module.act, torch.nn.Module)

    def install(self):
        mod = self.module
        self._pending = None

        def pre(module, inputs):
            if self.recording():
                self._pending = inputs[0]

        def act_pre(module, inputs):  # the activation module may be shared by the net's layers
            if self._pending is not None and self.recording():
                self.record(self._pending, inputs[0])
            self._pending = None

        def post(module, inputs, output):
            if mod.act is None and self.recording():
                self.record(inputs[0], output)
            self._pending = None
        handles = [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        if mod.act is not None:
            handles.append(mod.act.register_forward_pre_hook(act_pre))
        return handles

    def block_rows(self, x, y):
        yield self.weight_blocks[0], _dense_alpha(self.module), x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])


class DenseRule(Rule):
    """e3nn FullyConnectedNet layer (_Layer, MACE's radial MLP on edges): pre = α x W. Hooks add a zero
    per-structure weight, pre_e += α x_e Δ_{s(e)} (the act module's pre-hook, or the layer's output when
    it has none), so autograd returns ∂E/∂Δ_s = α Σ_{e∈s} x_e ⊗ ∂E/∂pre_e and, in the double backward,
    both force terms, as [structures, d_in, d_out]: far smaller than per-edge adjoints [edges, d_out]."""

    big_only = True
    layouts = DenseTapRule.layouts
    claims = staticmethod(DenseTapRule.claims)

    def install(self):
        mod = self.module
        self._x = None

        def pre(module, inputs):
            self._x = inputs[0] if self.recording() else None

        def act_pre(module, inputs):  # the activation module may be shared by the net's layers
            x, self._x = self._x, None
            if x is not None and self.recording():
                return (inputs[0] + self._extra(x),) + tuple(inputs[1:])
            return None

        def post(module, inputs, output):
            x, self._x = self._x, None
            if mod.act is None and x is not None and self.recording():
                return output + self._extra(x)
            return None
        handles = [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        if mod.act is not None:
            handles.append(mod.act.register_forward_pre_hook(act_pre))
        return handles

    def begin(self, chunk):
        super().begin(chunk)
        w = self.module.weight
        self.delta = torch.zeros((chunk.n,) + tuple(w.shape), dtype=w.dtype, device=w.device, requires_grad=True)

    def release(self):
        self.delta = self.grads = self._x = None
        super().release()

    def _extra(self, x):
        """α x_e Δ_{s(e)} for rows sorted by structure (e3nn/MACE batches: edges in graph order)."""
        seg = self.chunk.seg_for(x.shape[0])
        counts = torch.bincount(seg, minlength=self.chunk.n)
        if x.shape[0] > 1 and not bool((seg[1:] >= seg[:-1]).all()):
            raise UnsupportedModel("radial-MLP rows are not sorted by structure")
        if x.is_cuda:  # one padded batched matmul
            maxlen = int(counts.max())
            starts = torch.cumsum(counts, 0) - counts
            pos = torch.arange(x.shape[0], device=x.device) - starts[seg] + seg * maxlen
            out = torch.bmm(_pad(x, pos, self.chunk.n, maxlen), self.delta).reshape(-1, self.delta.shape[-1])[pos]
        else:
            out = torch.cat([xs @ d for xs, d in zip(x.split(counts.tolist()), self.delta)])
        return _dense_alpha(self.module) * out

    def first_inputs(self):
        return [self.delta]

    def set_first(self, grads, want_forces):
        self.grads = _zeros(grads[0], self.delta)

    def second_inputs(self):
        return [self.delta]

    def energy(self, sk, out):
        out += sk.block_sketch(self.blocks["weight"][0], self.grads.reshape(out.shape[0], -1))

    def force(self, sk, grads2, J, out):
        g = _zeros(grads2[0], self.delta, J)
        flat = out.view(-1, out.shape[-1])
        flat += sk.block_sketch(self.blocks["weight"][0], g.reshape(flat.shape[0], -1))


class ElementTPRule(TapRule):
    """o3.TensorProduct(x, one_hot(Z)) with internal weights W[u, Z, w] (MACE's skip_tp): per atom the
    linear map x -> c x W[:, Z, :] of each path; rows (atom, m) grouped by (structure, element)."""

    big_only = True
    layouts = (TENSOR_PRODUCT,)  # one block [u, Z, w] per weighted path

    @staticmethod
    def claims(module, local) -> bool:
        if not module.internal_weights:
            return False
        in2 = module.irreps_in2
        if len(in2) != 1 or in2[0].ir.l != 0 or in2[0].ir.p != 1:
            return False
        for ins in module.instructions:
            if ins.has_weight and (ins.connection_mode != "uvw"
                                   or module.irreps_in1[ins.i_in1].ir != module.irreps_out[ins.i_out].ir):
                return False
        return True

    def __init__(self, taps, module, prefix):
        super().__init__(taps, module, prefix)
        self.paths = _element_tp_paths(module)

    def install(self):
        def hook(module, inputs, output):
            if self.recording():
                groups = Groups.from_onehot(inputs[1], self.chunk.node_seg)
                self.record(inputs[0], output, groups)
        return [self.module.register_forward_hook(hook)]

    def block_rows(self, x, y):
        mod = self.module
        sl1, slo = mod.irreps_in1.slices(), mod.irreps_out.slices()
        for bi, (ins, c) in zip(self.weight_blocks, self.paths):
            m1, mo = mod.irreps_in1[ins.i_in1], mod.irreps_out[ins.i_out]
            d = m1.ir.dim
            yield bi, c, _irrep_rows(x, sl1[ins.i_in1], m1.mul, d), _irrep_rows(y, slo[ins.i_out], mo.mul, d)


def _element_tp_paths(module):
    """(instruction, c) for each weighted path: out[w, m] = c Σ_u x1[u, m] W[u, v, w] for x2 = e_v,
    measured on unit inputs; UnsupportedModel unless every path is that map (c times identity in m)."""
    out = []
    dtype = module.weight.dtype
    sl1, slo = module.irreps_in1.slices(), module.irreps_out.slices()
    off = 0
    with torch.no_grad():
        for ins in module.instructions:
            if not ins.has_weight:
                continue
            d = module.irreps_in1[ins.i_in1].ir.dim
            mul1, mul2, mulo = ins.path_shape
            w = torch.zeros(module.weight_numel, dtype=dtype)
            w[off + (mul1 - 1) * mul2 * mulo + (mul2 - 1) * mulo + (mulo - 1)] = 1.0  # W[u=last, v=last, w=last]
            x2 = torch.zeros(1, module.irreps_in2.dim, dtype=dtype)
            x2[0, mul2 - 1] = 1.0
            c = None
            for m in range(d):
                x1 = torch.zeros(1, module.irreps_in1.dim, dtype=dtype)
                x1[0, sl1[ins.i_in1].start + (mul1 - 1) * d + m] = 1.0
                y = module(x1.to(module.weight.device), x2.to(module.weight.device), w.to(module.weight.device))[0].cpu()
                at = slo[ins.i_out].start + (mulo - 1) * d + m
                c = float(y[at]) if c is None else c
                expect = torch.zeros_like(y)
                expect[at] = c
                if c == 0.0 or not torch.allclose(y, expect, rtol=1e-6, atol=1e-12 * abs(c)):
                    raise UnsupportedModel(f"tensor product path {ins} is not a per-element linear map")
            out.append((ins, c))
            off += math.prod(ins.path_shape)
    return out


class RerouteRule(Rule):
    """A layer whose forward, while recording, is computed by the rule (call()) through the module itself
    with substituted parameters (torch.func.functional_call); otherwise the class's own forward runs."""

    def install(self):
        mod = self.module
        owners = getattr(mod, "_ntkal_reroute", None)
        if owners is None:
            owners = mod._ntkal_reroute = []
            mod.forward = types.MethodType(_rerouted_forward, mod)
        owners.append(weakref.ref(self))
        return [_Unreroute(mod, owners[-1])]

    def begin(self, chunk):
        super().begin(chunk)
        self.uses = []  # (groups or None, {local: Δ})

    def release(self):
        self.uses = []
        self.grads = None
        super().release()

    def _call(self, module, params, args):
        taps = self._taps()
        taps.guard = True
        try:
            return torch.func.functional_call(module, params, args)
        finally:
            taps.guard = False

    def first_inputs(self):
        return [d for _, deltas in self.uses for d in deltas.values()]

    def set_first(self, grads, want_forces):
        self.grads = [_zeros(g, d) for g, d in zip(grads, self.first_inputs())]

    def second_inputs(self):
        return self.first_inputs()

    def energy(self, sk, out):
        self._add(sk, [g.unsqueeze(0) for g in self.grads], out.unsqueeze(0))

    def force(self, sk, grads2, J, out):
        self._add(sk, [_zeros(g, d, J) for g, d in zip(grads2, self.first_inputs())], out)


def _rerouted_forward(self, *args, **kwargs):
    """A rerouted forward: the recording rule computes it, else the class's own."""
    for ref in getattr(self, "_ntkal_reroute", ()):
        rule = ref()
        if rule is not None and rule.recording():
            return rule.call(self, *args, **kwargs)
    return type(self).forward(self, *args, **kwargs)


class _Unreroute:
    """Handle that undoes RerouteRule.install (like a hook handle's remove())."""

    def __init__(self, module, ref):
        self.module, self.ref = module, ref

    def remove(self):
        owners = getattr(self.module, "_ntkal_reroute", None)
        if owners is None:
            return
        if self.ref in owners:
            owners.remove(self.ref)
        if not owners:
            del self.module._ntkal_reroute
            if "forward" in self.module.__dict__:
                del self.module.forward


class GroupedContraction(RerouteRule):
    """MACE symmetric contraction: out[b] = Σ_ν Σ_k W_ν[Z_b, k, c] B_ν[b, c, k] (linear in W, element
    block Z_b per atom). The forward is rerouted through the same module with one weight block per
    (structure, element) group, W[element(g)] + Δ[g] with Δ = 0, and one-hot group attributes (at most
    num_elements groups per call): ∂E/∂Δ[g] is the group's gradient block [path, channel], sketched with
    the element factor."""

    big_only = True
    layouts = (CONTRACTION,)  # one block [element, path, channel]

    @staticmethod
    def claims(module, local) -> bool:
        return type(module).__name__ == "Contraction"

    def call(self, module, x, y):
        groups = Groups.from_onehot(y, self.chunk.node_seg)
        deltas = {name: torch.zeros((groups.n,) + tuple(p.shape[1:]), dtype=p.dtype, device=p.device,
                                    requires_grad=True)
                  for name, p in module.named_parameters() if name in self.params}
        # At most as many groups per call as the model has elements, so that the element contraction
        # (mace's traced einsum path, planned for num_elements) never grows; each call takes its groups' atoms.
        n_el = y.shape[1]
        outs, rows = [], []
        for g0 in range(0, groups.n, n_el):
            g1 = min(g0 + n_el, groups.n)
            idx = None
            if g0 > 0 or g1 < groups.n:
                idx = torch.nonzero((groups.of_atom >= g0) & (groups.of_atom < g1)).squeeze(1)
            params = {}
            for name, p in module.named_parameters():
                w = p[groups.element[g0:g1]]
                params[name] = w + deltas[name][g0:g1] if name in deltas else w
            gid = groups.of_atom if idx is None else groups.of_atom[idx]
            onehot = torch.nn.functional.one_hot(gid - g0, g1 - g0).to(y.dtype)
            outs.append(self._call(module, params, (x if idx is None else x[idx], onehot)))
            rows.append(idx)
        self.uses.append((groups, deltas))
        if len(outs) == 1:
            return outs[0]
        return torch.cat(outs)[torch.argsort(torch.cat(rows))]

    def _add(self, sk, grads, out):
        it = iter(grads)
        for groups, deltas in self.uses:
            for name in deltas:
                g = next(it)  # [J, n_g, P, C]
                F_e, F_p, F_c = sk.factors[self.blocks[name][0]]
                s = (torch.matmul(g, F_c) * F_p).sum(-2) * F_e[groups.element] / math.sqrt(sk.k)
                out.index_add_(1, groups.struct, s)


class BesselRule(RerouteRule):
    """mace's BesselBasis with trainable bessel_weights w (fine-tuned models: mace_run_train
    --foundation_model makes them a Parameter): out[e, b] = c sin(w_b x_e) / x_e, rerouted with per-edge
    weights w + Δ[structure(e)], Δ = 0, so ∂E/∂Δ[s] is structure s's gradient."""

    @staticmethod
    def claims(module, local) -> bool:
        return type(module).__name__ == "BesselBasis" and local == "bessel_weights"

    def call(self, module, x):
        seg = self.chunk.seg_for(x.shape[0])
        w = module.bessel_weights
        delta = torch.zeros((self.chunk.n,) + tuple(w.shape), dtype=w.dtype, device=w.device, requires_grad=True)
        out = self._call(module, {"bessel_weights": w + delta[seg]}, (x,))
        self.uses.append((None, {"bessel_weights": delta}))
        return out

    def _add(self, sk, grads, out):
        flat = out.view(-1, out.shape[-1])
        for g in grads:  # [J, n, num_basis]
            for bi in self.blocks["bessel_weights"]:
                flat += sk.block_sketch(bi, g.reshape(flat.shape[0], -1))


class PerStructure(Rule):
    """Any layer linear in its weights (tensor products, symmetric contractions): a zero per-structure
    perturbation Δ_s; y(W + Δ_s) = y(W) + y(Δ_s) on structure s's rows, and ∂E/∂Δ_s is its gradient.
    Costs a dense [structures, numel] gradient per projection (small layers; see BIG_LAYER_NUMEL)."""

    @staticmethod
    def claims(module, local) -> bool:
        from e3nn import o3
        return (isinstance(module, o3.TensorProduct) and local == "weight") or type(module).__name__ == "Contraction"

    def install(self):
        self.others = [n for n, _ in self.module.named_parameters() if n not in self.params]

        def hook(module, inputs, output):
            if self.recording():
                return output + self._extra(module, inputs, output)
            return None
        return [self.module.register_forward_hook(hook)]

    def begin(self, chunk):
        super().begin(chunk)
        sk_params = dict(self.module.named_parameters())
        self.deltas = {n: torch.zeros((chunk.n,) + tuple(sk_params[n].shape), dtype=sk_params[n].dtype,
                                      device=sk_params[n].device, requires_grad=True) for n in self.params}

    def release(self):
        self.deltas = {}
        self.grads = None
        super().release()

    def _extra(self, module, inputs, output):
        ptr = self.chunk.ptr
        if any(x.shape[0] != int(ptr[-1]) for x in inputs if torch.is_tensor(x)):
            raise UnsupportedModel(f"{type(module).__name__} is not applied per atom")
        zeros = {n: torch.zeros_like(q) for n, q in module.named_parameters() if n in self.others}
        taps = self._taps()
        taps.guard = True
        try:  # one vmapped call over zero-padded per-structure rows
            sizes = (ptr[1:] - ptr[:-1]).tolist()
            pos = torch.cat([torch.arange(c) + s * max(sizes) for s, c in enumerate(sizes)]).to(output.device)
            padded = [_pad(x, pos, len(sizes), max(sizes)) if torch.is_tensor(x) else x for x in inputs]

            def one(deltas, *args):
                return torch.func.functional_call(module, {**zeros, **deltas}, args)
            extra = torch.func.vmap(one)(self.deltas, *padded)
            return extra.reshape(-1, *extra.shape[2:]).index_select(0, pos)
        finally:
            taps.guard = False

    def first_inputs(self):
        return list(self.deltas.values())

    def set_first(self, grads, want_forces):
        self.grads = [_zeros(g, d) for g, d in zip(grads, self.deltas.values())]

    def second_inputs(self):
        return self.first_inputs()

    def _add(self, sk, grads, flat):
        for name, g in zip(self.deltas, grads):
            g = g.reshape(flat.shape[0], -1)
            for bi in self.blocks[name]:
                b = sk.blocks[bi]
                flat += sk.block_sketch(bi, g[:, b.offset:b.offset + b.numel])

    def energy(self, sk, out):
        self._add(sk, self.grads, out)

    def force(self, sk, grads2, J, out):
        self._add(sk, [_zeros(g, d, J) for g, d in zip(grads2, self.deltas.values())], out.view(-1, out.shape[-1]))


# layer type -> rule; the first rule that claims a parameter handles it (Opacus-style registry)
RULES = (LinearRule, DenseRule, DenseTapRule, ElementTPRule, GroupedContraction, BesselRule, PerStructure)
