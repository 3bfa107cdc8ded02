"""The precision of the Bayesian linear model in sketch space (docs/design.md, "Posterior"), float64.

Prior w ~ N(0, I_k); a labelled row g of kind κ, scaled by c_κ, observes c_κ g·w with noise σ_κ².
Λ = I + Σ_κ (c_κ²/σ_κ²) Gram_κ comes from per-kind Grams that an Accumulator sums over row chunks
(and over torchrun ranks); Cholesky with jitter retry. A row's predictive variance is
v(g) = c² gᵀΛ⁻¹g = c² ‖L⁻¹g‖², streamed through ntk_kernels.segment_quadform: no train × pool kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch

import ntk_kernels

from ..errors import NtkalError
from ..features.rowblock import FORCE, KIND_NAMES, RowBlock
from ..options import FORCE_REDUCE, SIGMA2

F64 = torch.float64
_GRAM_BLOCK = 2048  # rows per single-precision Gram product
KEEP_FOR_CALIBRATION = 2000  # labelled structures whose rows are kept for cross-fitting the error scale
KEEP_PRETRAIN_FOR_CALIBRATION = 500  # and labelled pretraining structures (where the model is right)


def gram(g: torch.Tensor) -> torch.Tensor:
    """gᵀg in float64: float64 rows directly; others as fp32 products of 2048-row blocks summed in float64
    (the kernels' rule: narrow products, wide accumulation; halves the n_train·k² cost of float32 rows)."""
    if g.dtype == F64:
        return g.T @ g
    out = torch.zeros(g.shape[1], g.shape[1], dtype=F64, device=g.device)
    for r0 in range(0, g.shape[0], _GRAM_BLOCK):
        gb = g[r0:r0 + _GRAM_BLOCK]
        out += (gb.T @ gb).to(F64)
    return out


@dataclass
class ResidualSums:
    """One kind's sums over the labelled rows with a residual: what fixes ρ and the labelled set's error size."""

    sq_residual: float = 0.0     # Σ ε²
    sq_rows: float = 0.0         # Σ |g|² (unscaled rows)
    per_structure: float = 0.0   # Σ over structures of (Σ ε²) / components

    def __add__(self, other: "ResidualSums") -> "ResidualSums":
        return ResidualSums(self.sq_residual + other.sq_residual, self.sq_rows + other.sq_rows,
                            self.per_structure + other.per_structure)


class Accumulator:
    """Sums over labelled rows, chunk by chunk: per-kind Grams and score parts and, with residuals, per-kind
    Σ g ε and ResidualSums (the first labelled structures' rows are kept for the calibration)."""

    def __init__(self, force_reduce: str = "mean"):
        self.force_reduce = force_reduce
        self.gram: Dict[int, torch.Tensor] = {}
        self.part: Dict[int, float] = {}
        self.n = 0
        self.k: Optional[int] = None
        self.b: Dict[int, torch.Tensor] = {}  # Σ g ε per kind (unscaled rows)
        self.res: Dict[int, ResidualSums] = {}
        self.kept: List[tuple] = []  # (first structure index, rows, residuals) of labelled chunks, for cross-fitting
        self.kept_pretrain: List[tuple] = []  # the same for pretraining chunks with labels
        self.n_pretrain = 0

    def add(self, block: RowBlock, start: Optional[int] = None, residuals: Optional[torch.Tensor] = None,
            labelled: bool = True):
        """Add a chunk of rows. `start`: its first structure index (orders the calibration set the same whatever
        the sharding); `residuals`: float64 [R] label − prediction per row (NaN: unknown); labelled=False (a
        pretraining sample): the rows enter the precision and Σ g ε only."""
        if len(block) == 0:
            return
        rows = block.rows.detach()
        if self.k is None:
            self.k = rows.shape[1]
        elif rows.shape[1] != self.k:
            raise NtkalError(f"training row blocks disagree in width: {rows.shape[1]} != {self.k}")
        sq = rows.square().sum(1, dtype=F64)
        if not torch.isfinite(sq).all():  # a NaN or inf anywhere in a row makes its squared norm one
            raise NtkalError("training features contain NaN or inf (check the training structures)")
        seg = block.seg.to(rows.device)
        r = None if residuals is None else residuals.to(device=rows.device, dtype=F64)
        kinds = torch.unique(block.kind).tolist()
        for kind in kinds:
            m = slice(None) if len(kinds) == 1 else (block.kind == kind).to(rows.device)  # no copy for one kind
            g, sq_k, seg_k = rows[m], sq[m], seg[m]
            self.gram[kind] = self.gram.get(kind, 0) + gram(g)
            if r is not None:
                r_k = r[m]
                ok = torch.isfinite(r_k)
                self.b[kind] = self.b.get(kind, 0) + g[ok].to(F64).T @ r_k[ok]
            if not labelled:
                continue
            per_struct = torch.zeros(len(block), dtype=F64, device=rows.device).index_add_(0, seg_k, sq_k)
            if kind == FORCE and self.force_reduce == "mean":
                per_struct = per_struct / block.natoms.to(per_struct)
            self.part[kind] = self.part.get(kind, 0.0) + float(per_struct.sum())
            if r is not None:
                comps = 3 * block.natoms.to(F64) if kind == FORCE else torch.ones(len(block), dtype=F64)
                per_s = torch.zeros(len(block), dtype=F64).index_add_(0, seg_k.cpu(), r_k.cpu().nan_to_num().square())
                self.res[kind] = self.res.get(kind, ResidualSums()) + ResidualSums(
                    float(r_k[ok].square().sum()), float(sq_k[ok].sum()), float((per_s / comps).sum()))
        if not labelled:
            first = self.n_pretrain if start is None else int(start)
            if r is not None and first < KEEP_PRETRAIN_FOR_CALIBRATION and bool(torch.isfinite(r).any()):
                self.kept_pretrain.append((first, block.to("cpu"), r.cpu()))
            self.n_pretrain += len(block)
            return
        first = self.n if start is None else int(start)
        if r is not None and first < KEEP_FOR_CALIBRATION:
            self.kept.append((first, block.to("cpu"), r.cpu()))
        self.n += len(block)

    def merge(self, others: Iterable["Accumulator"]) -> "Accumulator":
        """The sum of several accumulators (torchrun ranks' shards); calibration rows back in structure order,
        so every rank holds the one-process result."""
        out = Accumulator(self.force_reduce)
        for acc in [self, *others]:
            if acc.k is None:
                continue
            out.k = acc.k
            for mine, theirs in ((out.gram, acc.gram), (out.part, acc.part), (out.b, acc.b)):
                for kind, v in theirs.items():
                    mine[kind] = mine.get(kind, 0) + (v.cpu() if torch.is_tensor(v) else v)
            for kind, r in acc.res.items():
                out.res[kind] = out.res.get(kind, ResidualSums()) + r
            out.n += acc.n
            out.n_pretrain += acc.n_pretrain
            out.kept += acc.kept
            out.kept_pretrain += acc.kept_pretrain
        out.kept.sort(key=lambda t: t[0])
        out.kept_pretrain.sort(key=lambda t: t[0])
        return out

    def drop_residuals(self):
        """Forget the residual sums (the score fell back to posterior variance)."""
        self.res, self.b, self.kept, self.kept_pretrain = {}, {}, [], []


@dataclass
class Precision:
    """Λ = I + Σ_κ c_κ² Gram_κ / σ_κ² as its Cholesky factor L and L⁻¹, with the scales c_κ and noise levels."""

    L: torch.Tensor  # float64 [k, k], lower
    Linv: torch.Tensor  # float64 [k, k]
    scales: Dict[str, float]
    sigma_e2: float
    sigma_f2: float
    force_reduce: str
    jitter: float
    n_train: int

    @classmethod
    def from_accumulator(cls, acc: Accumulator, sigma_e2: float = SIGMA2, sigma_f2: float = SIGMA2):
        """Scales (each kind's score part averages 1 on the labelled set) and the factored precision."""
        if acc.force_reduce not in FORCE_REDUCE:
            raise ValueError(f"force_reduce must be one of {FORCE_REDUCE}, got {acc.force_reduce!r}")
        if not (sigma_e2 > 0 and sigma_f2 > 0):
            raise ValueError("sigma_e2 and sigma_f2 must be positive")
        if acc.n == 0 or acc.k is None:
            raise NtkalError("the training set is empty: the posterior needs at least one training structure")
        scales, lam = {}, torch.eye(acc.k, dtype=F64)
        for kind, g in sorted(acc.gram.items()):
            mean_part = acc.part[kind] / acc.n
            c = 1.0 / math.sqrt(mean_part) if mean_part > 0 else 1.0
            scales[KIND_NAMES[kind]] = c
            lam = lam + (c * c / (sigma_f2 if kind == FORCE else sigma_e2)) * g.cpu()
        L, jitter = robust_cholesky(lam)
        return cls(L=L, Linv=tril_inverse(L), scales=scales, sigma_e2=float(sigma_e2), sigma_f2=float(sigma_f2),
                   force_reduce=acc.force_reduce, jitter=jitter, n_train=acc.n)

    # --- per-row factors --------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self.L.shape[0]

    @property
    def kinds(self) -> List[str]:
        return sorted(self.scales)

    def per_row(self, kind: torch.Tensor, table: Dict[str, float], default: Optional[float] = None) -> torch.Tensor:
        """table[name of the row's kind] for every row (float64); default None: a kind missing from the table
        (one the training rows did not have) is an error."""
        lut = torch.full((len(KIND_NAMES),), float("nan") if default is None else default, dtype=F64)
        for k_id, name in KIND_NAMES.items():
            if name in table:
                lut[k_id] = table[name]
        out = lut[kind.long().cpu()]
        if default is None and bool(torch.isnan(out).any()):
            missing = sorted({KIND_NAMES[int(k)] for k in kind[torch.isnan(out)].tolist()})
            raise NtkalError(f"rows contain {', '.join(missing)} rows but the training rows had none (it knows "
                             f"{', '.join(self.kinds) or 'nothing'}; use the same kernel)")
        return out

    def row_scale(self, kind: torch.Tensor) -> torch.Tensor:
        """c_κ of each row."""
        return self.per_row(kind, self.scales)

    def row_noise(self, kind: torch.Tensor) -> torch.Tensor:
        """σ² of each row: σ_F² for force rows, σ_E² for energy and embedding rows."""
        return self.per_row(kind, {n: self.sigma_f2 if n == "force" else self.sigma_e2 for n in KIND_NAMES.values()})

    def row_weights(self, rows: RowBlock) -> torch.Tensor:
        """A row's weight in the structure score: c_κ²/σ_κ² (× 1/N for force rows with force_reduce='mean')."""
        w = self.row_scale(rows.kind) ** 2 / self.row_noise(rows.kind)
        if self.force_reduce == "mean":
            natoms_row = torch.repeat_interleave(rows.natoms.to(F64), rows.ptr[1:] - rows.ptr[:-1])
            w = torch.where(rows.kind == FORCE, w / natoms_row, w)
        return w

    # --- variances --------------------------------------------------------------------------------
    def variances(self, rows: RowBlock):
        """(per-structure score [n], per-row ‖L⁻¹g‖² [R]): one fused pass over the rows.

        score(x) = Σ_rows weight · ‖L⁻¹g‖² = v(energy row)/σ_E² + (1/N) Σ_force v(g)/σ_F² on scaled rows.
        """
        if rows.k != self.k:
            raise NtkalError(f"features have width {rows.k}, the posterior {self.k} (different sketch_dim?)")
        G = rows.rows.detach()
        w = self.row_weights(rows).to(device=G.device, dtype=G.dtype)
        seg_out, row_out = ntk_kernels.segment_quadform(G, self.Linv.to(device=G.device, dtype=G.dtype), None, w,
                                                        len(rows), ptr=rows.ptr)
        return seg_out.detach().cpu().to(F64), row_out.detach().cpu().to(F64)

    def score(self, rows: RowBlock) -> torch.Tensor:
        """One posterior-variance score per structure (see variances)."""
        return self.variances(rows)[0] if len(rows) else torch.zeros(0, dtype=F64)

    def atom_split(self, rows: RowBlock, row_out: torch.Tensor, weight: Optional[float] = None):
        """Per structure, per atom: weight × Σ over the atom's exact force rows of row_out (None without
        them); weight defaults to c_F²/σ_F², which makes it the atom's force variance (with
        force_reduce='mean' their mean over atoms is the force part of the score)."""
        if rows.atom is None or "force" not in self.scales:
            return [None] * len(rows)
        w = self.scales["force"] ** 2 / self.sigma_f2 if weight is None else weight
        out: List[Optional[np.ndarray]] = []
        for s in range(len(rows)):
            a, b = int(rows.ptr[s]), int(rows.ptr[s + 1])
            atom = rows.atom[a:b]
            m = atom >= 0
            out.append(torch.zeros(int(rows.natoms[s]), dtype=F64).index_add_(0, atom[m], row_out[a:b][m] * w).numpy()
                       if bool(m.any()) else None)
        return out

    # --- plain state ------------------------------------------------------------------------------
    def to_state(self) -> dict:
        """The fields as plain data (float64 tensors, str, numbers): the checkpoint contract of ntkal.runstate.
        The factors' memory layout is kept too: BLAS rounds a product differently for another layout, and a
        restored posterior must score to the same bits."""
        return {"L": self.L, "Linv": self.Linv, "layout": {"L": _layout(self.L), "Linv": _layout(self.Linv)},
                "scales": dict(self.scales), "sigma_e2": self.sigma_e2, "sigma_f2": self.sigma_f2,
                "force_reduce": self.force_reduce, "jitter": self.jitter, "n_train": self.n_train}

    @classmethod
    def from_state(cls, state: dict):
        """The inverse of to_state."""
        layout = state.get("layout", {})
        return cls(L=_with_layout(state["L"], layout.get("L")), Linv=_with_layout(state["Linv"], layout.get("Linv")),
                   scales={str(k): float(v) for k, v in state["scales"].items()},
                   sigma_e2=float(state["sigma_e2"]), sigma_f2=float(state["sigma_f2"]),
                   force_reduce=str(state["force_reduce"]), jitter=float(state["jitter"]),
                   n_train=int(state["n_train"]))


def _layout(t: torch.Tensor) -> str:
    """"F" for a column-major matrix (what LAPACK's factorisations return), else "C"."""
    return "F" if t.dim() == 2 and not t.is_contiguous() and t.T.is_contiguous() else "C"


def _with_layout(t: torch.Tensor, layout: Optional[str]) -> torch.Tensor:
    t = t.to(F64)
    return t.T.contiguous().T if layout == "F" else t.contiguous()


def tril_inverse(L: torch.Tensor) -> torch.Tensor:
    """L⁻¹ of a lower-triangular factor."""
    return torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=L.dtype), upper=False)


def robust_cholesky(A: torch.Tensor, max_tries: int = 12):
    """(L, jitter): Cholesky of a symmetric positive-definite float64 matrix, adding growing jitter if it fails."""
    A = 0.5 * (A + A.T)
    if not torch.isfinite(A).all():
        raise NtkalError("the precision matrix contains NaN or inf")
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return L, 0.0
    base = 1e-12 * float(A.diagonal().abs().mean())
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    for t in range(max_tries):
        jitter = base * 10.0 ** t
        L, info = torch.linalg.cholesky_ex(A + jitter * eye)
        if int(info) == 0:
            return L, jitter
    raise NtkalError("Cholesky of the precision failed even with jitter; the training features are degenerate")


def cholesky_inverse(A: torch.Tensor):
    """(L⁻¹, jitter) of a float64 precision: the factor every scorer applies to rows."""
    L, jitter = robust_cholesky(A)
    return tril_inverse(L), jitter
