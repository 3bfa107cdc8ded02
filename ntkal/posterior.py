"""Feature-space posterior of the Bayesian linear model in sketch space (docs/design.md, "Posterior"), float64.

Prior w ~ N(0, I_k); a training row g of kind κ, scaled by c_κ, observes c_κ g·w with noise σ_κ².
Λ = I + Σ_κ (c_κ²/σ_κ²) Gram_κ comes from per-kind Grams that an Accumulator sums over row chunks
(and over torchrun ranks); Cholesky with jitter retry. A row's predictive variance is
v(g) = c² gᵀΛ⁻¹g = c² ‖L⁻¹g‖², streamed through ntk_kernels.segment_quadform: no train × pool kernel.
This module is algebra only; featurising, sharding and progress live in ntkal.acquisition.pipeline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Union

import numpy as np
import torch

import ntk_kernels

from .errors import NtkalError
from .features.rowblock import FORCE, KIND_NAMES, RowBlock
from .options import FORCE_REDUCE, SIGMA2

F64 = torch.float64
_GRAM_BLOCK = 2048  # rows per single-precision Gram product


def _gram(g: torch.Tensor) -> torch.Tensor:
    """gᵀg in float64: float64 rows directly; others as fp32 products of 2048-row blocks summed in float64
    (the kernels' rule: narrow products, wide accumulation; halves the n_train·k² cost of float32 rows)."""
    if g.dtype == F64:
        return g.T @ g
    out = torch.zeros(g.shape[1], g.shape[1], dtype=F64, device=g.device)
    for r0 in range(0, g.shape[0], _GRAM_BLOCK):
        gb = g[r0:r0 + _GRAM_BLOCK]
        out += (gb.T @ gb).to(F64)
    return out


KEEP_FOR_CALIBRATION = 2000  # labelled structures whose rows are kept for cross-fitting the error scale


class Accumulator:
    """Sums over training rows, chunk by chunk: per-kind Grams, per-kind score parts, LCMD vectors and,
    with residuals, per-kind Σ g ε, Σ ε², Σ |g|² (the labelled structures' rows are kept for calibration)."""

    def __init__(self, force_reduce: str = "mean"):
        self.force_reduce = force_reduce
        self.gram: Dict[int, torch.Tensor] = {}
        self.part: Dict[int, float] = {}
        self.n = 0
        self.k: Optional[int] = None
        self.psi: List[torch.Tensor] = []
        self.psi_index: List[torch.Tensor] = []
        self.psi_parts: Optional[List[int]] = None  # sizes of ψ's parts (energy, force), each scaled on its own
        self.b: Dict[int, torch.Tensor] = {}  # Σ g ε per kind (unscaled rows)
        self.res: Dict[int, List[float]] = {}  # per kind: Σ ε², Σ |g|², Σ_structures ε²/components (labelled)
        self.kept: List[tuple] = []  # (rows, residuals) of labelled structures, for cross-fitting

    def add(self, block: RowBlock, start: Optional[int] = None, psi: Optional[torch.Tensor] = None,
            residuals: Optional[torch.Tensor] = None, labelled: bool = True):
        """Add a chunk of rows. `start`: its first structure index (keeps LCMD centres in order); `residuals`:
        float64 [R] label − prediction per row (NaN: unknown); labelled=False (a pretraining sample): the rows
        enter the precision and Σ g ε only, not the scales, the LCMD centres or the calibration."""
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
        kinds = torch.unique(block.kind).tolist()
        for kind in kinds:
            if len(kinds) == 1:  # no masked copy
                g, sq_k, seg_k = rows, sq, seg
            else:
                m = (block.kind == kind).to(rows.device)
                g, sq_k, seg_k = rows[m], sq[m], seg[m]
            self.gram[kind] = self.gram.get(kind, 0) + _gram(g)
            if residuals is not None:
                r = residuals.to(device=rows.device, dtype=F64)
                r_k = r if len(kinds) == 1 else r[m]
                ok = torch.isfinite(r_k)
                self.b[kind] = self.b.get(kind, 0) + g[ok].to(F64).T @ r_k[ok]
            if not labelled:
                continue
            per_struct = torch.zeros(len(block), dtype=F64, device=rows.device).index_add_(0, seg_k, sq_k)
            if kind == FORCE and self.force_reduce == "mean":
                per_struct = per_struct / block.natoms.to(per_struct)
            self.part[kind] = self.part.get(kind, 0.0) + float(per_struct.sum())
            if residuals is not None:
                comps = 3 * block.natoms.to(F64) if kind == FORCE else torch.ones(len(block), dtype=F64)
                per_s = torch.zeros(len(block), dtype=F64).index_add_(0, seg_k.cpu(), r_k.cpu().nan_to_num().square())
                acc = self.res.setdefault(kind, [0.0, 0.0, 0.0])
                acc[0] += float(r_k[ok].square().sum())
                acc[1] += float(sq_k[ok].sum())
                acc[2] += float((per_s / comps.to(per_s)).sum())
        if not labelled:
            return
        if residuals is not None and self.n < KEEP_FOR_CALIBRATION:
            self.kept.append((block.to("cpu"), residuals.detach().cpu().to(F64)))
        self.psi.append((block.lcmd_vectors() if psi is None else psi).detach().cpu())
        first = self.n if start is None else int(start)
        self.psi_index.append(torch.arange(first, first + len(block)))
        self.n += len(block)

    def merge(self, others: Iterable["Accumulator"]) -> "Accumulator":
        """The sum of several accumulators (torchrun ranks' shards), LCMD vectors back in structure order."""
        out = Accumulator(self.force_reduce)
        out.psi_parts = self.psi_parts
        for acc in [self, *others]:
            if acc.k is None:
                continue
            out.k = acc.k
            for kind, g in acc.gram.items():
                out.gram[kind] = out.gram.get(kind, 0) + g.cpu()
            for kind, p in acc.part.items():
                out.part[kind] = out.part.get(kind, 0.0) + p
            for kind, b in acc.b.items():
                out.b[kind] = out.b.get(kind, 0) + b.cpu()
            for kind, r in acc.res.items():
                out.res[kind] = [x + y for x, y in zip(out.res.get(kind, [0.0, 0.0, 0.0]), r)]
            out.n += acc.n
            out.psi += acc.psi
            out.psi_index += acc.psi_index
            out.kept += acc.kept[: max(0, KEEP_FOR_CALIBRATION - sum(len(b) for b, _ in out.kept))]
        if out.psi:
            order = torch.argsort(torch.cat(out.psi_index))
            out.psi, out.psi_index = [torch.cat(out.psi)[order]], [torch.cat(out.psi_index)[order]]
        return out


@dataclass
class Posterior:
    """Λ = I + Σ_κ c_κ² Gram_κ / σ_κ² with its Cholesky factor and inverse, and the training LCMD centres."""

    L: torch.Tensor  # float64 [k, k], lower
    Linv: torch.Tensor  # float64 [k, k]
    scales: Dict[str, float]
    sigma_e2: float
    sigma_f2: float
    force_reduce: str
    jitter: float
    n_train: int
    kinds: List[str]
    psi_scale: Union[float, torch.Tensor] = 1.0  # per ψ part (energy, force) when ψ has several
    train_psi: Optional[torch.Tensor] = None  # scaled LCMD vectors of the training structures
    info: dict = field(default_factory=dict)
    # the residual model (error-aware score): posterior mean of ε/ρ, and per kind ρ (residual scale),
    # α² (cross-fitted variance calibration) and the labelled set's mean squared residual per structure
    mean: Optional[torch.Tensor] = None
    rho: Dict[str, float] = field(default_factory=dict)
    alpha2: Dict[str, float] = field(default_factory=dict)
    alpha2_pv: Dict[str, float] = field(default_factory=dict)  # the same calibration for a zero mean (PV alone)
    resid_ms: Dict[str, float] = field(default_factory=dict)

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_rows(cls, train_rows: Union[RowBlock, Iterable[RowBlock]], sigma_e2: float = SIGMA2,
                  sigma_f2: float = SIGMA2, force_reduce: str = "mean") -> "Posterior":
        """Fit scales and the precision from training rows (one RowBlock or an iterable of chunks)."""
        acc = Accumulator(force_reduce)
        for block in ([train_rows] if isinstance(train_rows, RowBlock) else train_rows):
            acc.add(block)
        return cls.from_accumulator(acc, sigma_e2, sigma_f2)

    @classmethod
    def from_accumulator(cls, acc: Accumulator, sigma_e2: float = SIGMA2, sigma_f2: float = SIGMA2) -> "Posterior":
        if acc.force_reduce not in FORCE_REDUCE:
            raise ValueError(f"force_reduce must be one of {FORCE_REDUCE}, got {acc.force_reduce!r}")
        if not (sigma_e2 > 0 and sigma_f2 > 0):
            raise ValueError("sigma_e2 and sigma_f2 must be positive")
        if acc.n == 0 or acc.k is None:
            raise NtkalError("the training set is empty: the posterior needs at least one training structure")
        scales, lam = {}, torch.eye(acc.k, dtype=F64)
        for kind, gram in sorted(acc.gram.items()):
            mean_part = acc.part[kind] / acc.n
            c = 1.0 / math.sqrt(mean_part) if mean_part > 0 else 1.0
            scales[KIND_NAMES[kind]] = c
            lam = lam + (c * c / (sigma_f2 if kind == FORCE else sigma_e2)) * gram.cpu()
        L, jitter = robust_cholesky(lam)
        psi, psi_scale = None, 1.0
        if acc.psi:
            psi = torch.cat(acc.psi).to(F64)
            parts = acc.psi_parts or [psi.shape[1]]
            factors = []
            for block in psi.split(parts, dim=1):  # each part's mean squared norm over the labelled set is 1
                ms = float(block.square().sum(1).mean())
                factors.append(1.0 / math.sqrt(ms) if ms > 0 else 1.0)
            psi_scale = factors[0] if len(parts) == 1 else torch.repeat_interleave(
                torch.tensor(factors, dtype=F64), torch.tensor(parts))
            psi = psi.mul_(psi_scale)
        post = cls(L=L, Linv=_tril_inverse(L), scales=scales, sigma_e2=float(sigma_e2), sigma_f2=float(sigma_f2),
                   force_reduce=acc.force_reduce, jitter=jitter, n_train=acc.n, kinds=sorted(scales),
                   psi_scale=psi_scale, train_psi=psi)
        if acc.res:
            post.fit_residuals(acc)
        return post

    def fit_residuals(self, acc: Accumulator, rho: Optional[Dict[str, float]] = None):
        """ρ_κ² = Σε²/Σ|c g|² (the prior matches the labelled residuals' size; or the given ρ),
        m = Λ⁻¹ Σ_κ c_κ b_κ/(ρ_κ σ_κ²), then α² by cross-fitting."""
        b = torch.zeros(self.k, dtype=F64)
        for kind, (ss, gg, per_struct) in acc.res.items():
            name, c = KIND_NAMES[kind], self.scales[KIND_NAMES[kind]]
            self.rho[name] = math.sqrt(ss / (c * c * gg)) if ss > 0 and gg > 0 else 0.0
            if rho is not None and name in rho:
                self.rho[name] = float(rho[name])
            self.resid_ms[name] = per_struct / acc.n
            if self.rho[name] > 0:
                b += c / (self.rho[name] * self.noise(kind)) * acc.b[kind].cpu()
        self.mean = self.Linv.T @ (self.Linv @ b)
        self.alpha2 = {name: 1.0 for name in self.rho}
        self.alpha2_pv = dict(self.alpha2)
        if acc.kept:
            self.calibrate(acc.kept)

    def residual_mean(self, rows: RowBlock) -> torch.Tensor:
        """μ = ρ_κ c_κ gᵀm per row: the residual (label − prediction) the residual model predicts, in the
        rows' physical units (eV/atom for energy rows, eV/Å for force components)."""
        G = rows.rows.detach()
        rho = torch.tensor([self.rho.get(KIND_NAMES[int(k)], 0.0) for k in rows.kind.tolist()], dtype=F64)
        return (G @ self.mean.to(device=G.device, dtype=G.dtype)).cpu().to(F64) * self.row_scale(rows.kind) * rho

    def noise(self, kind: int) -> float:
        return self.sigma_f2 if kind == FORCE else self.sigma_e2

    def calibrate(self, kept, folds: int = 5, seed: int = 0):
        """α_κ² by K-fold cross-fitting over the kept labelled structures: with each fold's rows removed from Λ
        and from Σ g ε, the held-out rows' squared normalised residuals (ε/ρ − μ̂)² against their predictive
        variance c²gᵀΛ_f⁻¹g + σ²; α² = Σ (ε/ρ − μ̂)² / Σ (PV + σ²) per kind (moment matching). alpha2_pv is
        the same for predictions of zero error (what posterior variance alone would claim)."""
        rows = RowBlock.cat([b for b, _ in kept])
        eps = torch.cat([r for _, r in kept])
        n = len(rows)
        if n < 2:
            self.info["calibration"] = "uncalibrated: fewer than 2 labelled structures with labels"
            return
        g = rows.rows.detach().to(F64).cpu() * self.row_scale(rows.kind)[:, None]  # c g
        rho = torch.tensor([self.rho.get(KIND_NAMES[int(k)], 0.0) for k in rows.kind.tolist()], dtype=F64)
        noise = self.row_noise(rows.kind)
        ok = torch.isfinite(eps) & (rho > 0)
        target = torch.where(ok, eps / rho.clamp_min(1e-300), torch.zeros_like(eps))  # ε/ρ
        hat = g / noise.sqrt()[:, None]  # noise-normalised rows: Λ = I + Σ ĝĝᵀ, b = Σ ĝ (ε/ρ)/σ
        lam = self.L @ self.L.T
        b = lam @ self.mean
        fold_of = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % min(folds, n)
        fold = fold_of[rows.seg.cpu()]
        num = torch.zeros(len(KIND_NAMES), dtype=F64)
        num_pv = torch.zeros(len(KIND_NAMES), dtype=F64)
        den = torch.zeros(len(KIND_NAMES), dtype=F64)
        for f in range(min(folds, n)):
            sel = (fold == f) & ok
            h = hat[sel]
            Linv_f, _ = cholesky_inverse(lam - h.T @ h)
            m_f = Linv_f.T @ (Linv_f @ (b - h.T @ (target[sel] / noise[sel].sqrt())))
            mu = g[sel] @ m_f
            pv = (g[sel] @ Linv_f.T).square().sum(1)
            kinds = rows.kind[sel].long()
            num.index_add_(0, kinds, (target[sel] - mu).square())
            num_pv.index_add_(0, kinds, target[sel].square())
            den.index_add_(0, kinds, pv + noise[sel])
        for kind, name in KIND_NAMES.items():
            if name in self.alpha2 and den[kind] > 0:
                self.alpha2[name] = float(num[kind] / den[kind])
                self.alpha2_pv[name] = float(num_pv[kind] / den[kind])
        self.info["calibration"] = f"{min(folds, n)}-fold cross-fitted over {n} labelled structures"

    @classmethod
    def fit(cls, featurizer, train_atoms, sigma_e2: float = SIGMA2, sigma_f2: float = SIGMA2,
            force_reduce: str = "mean", chunk_size: int = 64, progress: bool = False) -> "Posterior":
        """Featurise the training structures (exact force rows, also when the featurizer uses probes) and fit."""
        from .acquisition.pipeline import fit_posterior
        return fit_posterior(featurizer, train_atoms, sigma_e2, sigma_f2, force_reduce, chunk_size, progress)

    # --- per-row factors --------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self.L.shape[0]

    def row_scale(self, kind: torch.Tensor) -> torch.Tensor:
        """c_κ of each row; an error for a kind the training rows did not have."""
        c = torch.ones(kind.numel(), dtype=F64)
        for k_id in torch.unique(kind).tolist():
            name = KIND_NAMES.get(int(k_id))
            if name not in self.scales:
                raise NtkalError(f"rows contain {name} rows but the training rows had none (it knows "
                                 f"{', '.join(self.kinds) or 'nothing'}; use the same kernel)")
            c[kind == k_id] = self.scales[name]
        return c

    def row_noise(self, kind: torch.Tensor) -> torch.Tensor:
        """σ² of each row: σ_F² for force rows, σ_E² for energy and embedding rows."""
        return torch.where(kind == FORCE, torch.tensor(self.sigma_f2, dtype=F64), torch.tensor(self.sigma_e2, dtype=F64))

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
        """One score per structure (see variances)."""
        return self.variances(rows)[0] if len(rows) else torch.zeros(0, dtype=F64)

    def score_with_atoms(self, rows: RowBlock):
        """(scores [n], per-structure per-atom force variances or None) in one pass over the rows."""
        if len(rows) == 0:
            return torch.zeros(0, dtype=F64), []
        seg_out, row_out = self.variances(rows)
        return seg_out, self.atom_split(rows, row_out)

    def row_variances(self, rows: RowBlock) -> torch.Tensor:
        """v(c g) = c² ‖L⁻¹g‖² for every row (scaled feature units, not divided by σ²)."""
        return self.variances(rows)[1] * self.row_scale(rows.kind) ** 2

    def atom_variances(self, rows: RowBlock) -> List[Optional[np.ndarray]]:
        """Per structure, per atom: Σ over x, y, z of v(force row)/σ_F² (None without exact force rows);
        with force_reduce='mean' their mean over atoms is the force part of the score."""
        return self.score_with_atoms(rows)[1]

    def atom_split(self, rows: RowBlock, row_out: torch.Tensor) -> List[Optional[np.ndarray]]:
        if rows.atom is None or "force" not in self.scales:
            return [None] * len(rows)
        c2 = self.scales["force"] ** 2 / self.sigma_f2
        out: List[Optional[np.ndarray]] = []
        for s in range(len(rows)):
            a, b = int(rows.ptr[s]), int(rows.ptr[s + 1])
            atom = rows.atom[a:b]
            m = atom >= 0
            if not bool(m.any()):
                out.append(None)
                continue
            v = torch.zeros(int(rows.natoms[s]), dtype=F64).index_add_(0, atom[m], row_out[a:b][m] * c2)
            out.append(v.numpy())
        return out

    def transform(self, psi: torch.Tensor) -> torch.Tensor:
        """Posterior-transformed LCMD vectors L⁻¹ψ (ψ already scaled by psi_scale), for LCMD's P mode."""
        return psi.to(F64) @ self.Linv.T.to(device=psi.device)

    def summary(self) -> dict:
        return {"k": self.k, "n_train": self.n_train, "sigma_e2": self.sigma_e2, "sigma_f2": self.sigma_f2,
                "force_reduce": self.force_reduce, "scales": dict(self.scales), "jitter": self.jitter,
                "kinds": list(self.kinds)}


def _tril_inverse(L: torch.Tensor) -> torch.Tensor:
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
    return _tril_inverse(L), jitter
