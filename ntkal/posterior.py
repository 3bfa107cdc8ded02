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
    with residuals, per-kind Σ g ε, Σ ε², Σ |g|² (the first labelled structures' rows are kept for calibration)."""

    def __init__(self, force_reduce: str = "mean", seed: int = 0):
        self.force_reduce, self.seed = force_reduce, seed
        self.gram: Dict[int, torch.Tensor] = {}
        self.part: Dict[int, float] = {}
        self.n = 0
        self.k: Optional[int] = None
        self.psi: List[tuple] = []  # (first structure index, LCMD vectors of the chunk)
        self.psi_parts: Optional[List[int]] = None  # sizes of ψ's parts (energy, force), each scaled on its own
        self.b: Dict[int, torch.Tensor] = {}  # Σ g ε per kind (unscaled rows)
        self.res: Dict[int, List[float]] = {}  # per kind: Σ ε², Σ |g|², Σ_structures ε²/components (labelled)
        self.kept: List[tuple] = []  # (first structure index, rows, residuals) of labelled chunks, for cross-fitting

    def add(self, block: RowBlock, start: Optional[int] = None, residuals: Optional[torch.Tensor] = None,
            labelled: bool = True):
        """Add a chunk of rows. `start`: its first structure index (orders LCMD centres and the calibration set
        the same whatever the sharding); `residuals`: float64 [R] label − prediction per row (NaN: unknown);
        labelled=False (a pretraining sample): the rows enter the precision and Σ g ε only."""
        if len(block) == 0:
            return
        from .acquisition.distances import lcmd_vectors
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
            self.gram[kind] = self.gram.get(kind, 0) + _gram(g)
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
                acc = self.res.setdefault(kind, [0.0, 0.0, 0.0])
                acc[0] += float(r_k[ok].square().sum())
                acc[1] += float(sq_k[ok].sum())
                acc[2] += float((per_s / comps).sum())
        if not labelled:
            return
        first = self.n if start is None else int(start)
        if r is not None and first < KEEP_FOR_CALIBRATION:
            self.kept.append((first, block.to("cpu"), r.cpu()))
        psi, self.psi_parts = lcmd_vectors(block, self.seed)
        self.psi.append((first, psi))
        self.n += len(block)

    def merge(self, others: Iterable["Accumulator"]) -> "Accumulator":
        """The sum of several accumulators (torchrun ranks' shards); LCMD centres and calibration rows back in
        structure order, so every rank holds the one-process result."""
        out = Accumulator(self.force_reduce, self.seed)
        for acc in [self, *others]:
            if acc.k is None:
                continue
            out.k, out.psi_parts = acc.k, acc.psi_parts
            for mine, theirs in ((out.gram, acc.gram), (out.part, acc.part), (out.b, acc.b)):
                for kind, v in theirs.items():
                    mine[kind] = mine.get(kind, 0) + (v.cpu() if torch.is_tensor(v) else v)
            for kind, r in acc.res.items():
                out.res[kind] = [x + y for x, y in zip(out.res.get(kind, [0.0, 0.0, 0.0]), r)]
            out.n += acc.n
            out.psi += acc.psi
            out.kept += acc.kept
        out.psi.sort(key=lambda t: t[0])
        out.kept.sort(key=lambda t: t[0])
        return out


@dataclass
class Posterior:
    """Λ = I + Σ_κ c_κ² Gram_κ / σ_κ² with its Cholesky factor and inverse, the training LCMD centres and,
    with labelled residuals, the residual model of the error-aware score (docs/design.md)."""

    L: torch.Tensor  # float64 [k, k], lower
    Linv: torch.Tensor  # float64 [k, k]
    scales: Dict[str, float]
    sigma_e2: float
    sigma_f2: float
    force_reduce: str
    jitter: float
    n_train: int
    psi_scale: Union[float, torch.Tensor] = 1.0  # per ψ part (energy, force) when ψ has several
    train_psi: Optional[torch.Tensor] = None  # scaled LCMD vectors of the training structures
    info: dict = field(default_factory=dict)
    # the residual model: posterior mean of ε/ρ, and per kind ρ (residual scale), α² (cross-fitted variance
    # calibration; alpha2_pv for a zero mean, i.e. posterior variance alone) and the labelled set's mean
    # squared residual per structure
    mean: Optional[torch.Tensor] = None
    rho: Dict[str, float] = field(default_factory=dict)
    alpha2: Dict[str, float] = field(default_factory=dict)
    alpha2_pv: Dict[str, float] = field(default_factory=dict)
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
        psi = torch.cat([p for _, p in acc.psi]).to(F64)
        parts = acc.psi_parts or [psi.shape[1]]
        factors = [1.0 / math.sqrt(ms) if ms > 0 else 1.0  # each part's mean squared norm over the labelled set is 1
                   for ms in (float(b.square().sum(1).mean()) for b in psi.split(parts, dim=1))]
        psi_scale = factors[0] if len(parts) == 1 else torch.repeat_interleave(torch.tensor(factors, dtype=F64),
                                                                               torch.tensor(parts))
        post = cls(L=L, Linv=_tril_inverse(L), scales=scales, sigma_e2=float(sigma_e2), sigma_f2=float(sigma_f2),
                   force_reduce=acc.force_reduce, jitter=jitter, n_train=acc.n, psi_scale=psi_scale,
                   train_psi=psi.mul_(psi_scale))
        if acc.res:
            post.fit_residuals(acc)
        return post

    @classmethod
    def fit(cls, featurizer, train_atoms, sigma_e2: float = SIGMA2, sigma_f2: float = SIGMA2,
            force_reduce: str = "mean", chunk_size: int = 64, progress: bool = False) -> "Posterior":
        """Featurise the training structures (exact force rows, also when the featurizer uses probes) and fit."""
        from .acquisition.pipeline import Pipeline
        from .options import Options
        opts = Options(sigma_e2=sigma_e2, sigma_f2=sigma_f2, force_reduce=force_reduce, chunk_size=chunk_size)
        opts.validate()
        return Pipeline(opts, featurizer, progress).fit(train_atoms)

    # --- the residual model -----------------------------------------------------------------------
    def fit_residuals(self, acc: Accumulator, rho: Optional[Dict[str, float]] = None):
        """ρ_κ² = Σε²/Σ|c g|² (the prior matches the labelled residuals' size; or the given ρ),
        m = Λ⁻¹ Σ_κ c_κ b_κ/(ρ_κ σ_κ²), then α² by cross-fitting."""
        b = torch.zeros(self.k, dtype=F64)
        for kind, (ss, gg, per_struct) in acc.res.items():
            name, c = KIND_NAMES[kind], self.scales[KIND_NAMES[kind]]
            self.rho[name] = math.sqrt(ss / (c * c * gg)) if ss > 0 and gg > 0 else 0.0
            self.rho[name] = float((rho or {}).get(name, self.rho[name]))
            self.resid_ms[name] = per_struct / acc.n
            if self.rho[name] > 0:
                b += c / (self.rho[name] * (self.sigma_f2 if kind == FORCE else self.sigma_e2)) * acc.b[kind].cpu()
        self.mean = self.Linv.T @ (self.Linv @ b)
        self.alpha2 = {name: 1.0 for name in self.rho}
        self.alpha2_pv = dict(self.alpha2)
        if acc.kept:
            self.calibrate([(block, r) for _, block, r in acc.kept])

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
        g = rows.rows.detach().to(F64).cpu() * self.per_row(rows.kind, self.scales)[:, None]  # c g
        rho, noise = self.per_row(rows.kind, self.rho, 0.0), self.row_noise(rows.kind)
        ok = torch.isfinite(eps) & (rho > 0)
        target = torch.where(ok, eps / rho.clamp_min(1e-300), torch.zeros_like(eps))  # ε/ρ
        hat = g / noise.sqrt()[:, None]  # noise-normalised rows: Λ = I + Σ ĝĝᵀ, b = Σ ĝ (ε/ρ)/σ
        lam = self.L @ self.L.T
        b = lam @ self.mean
        fold = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % min(folds, n))[rows.seg.cpu()]
        num, num_pv, den = (torch.zeros(len(KIND_NAMES), dtype=F64) for _ in range(3))
        for f in range(min(folds, n)):
            out = fold == f  # every row of the fold leaves Λ; those with a residual are scored
            sel = out & ok
            Linv_f, _ = cholesky_inverse(lam - hat[out].T @ hat[out])
            m_f = Linv_f.T @ (Linv_f @ (b - hat[sel].T @ (target[sel] / noise[sel].sqrt())))
            pv = (g[sel] @ Linv_f.T).square().sum(1)
            kinds = rows.kind[sel].long()
            num.index_add_(0, kinds, (target[sel] - g[sel] @ m_f).square())
            num_pv.index_add_(0, kinds, target[sel].square())
            den.index_add_(0, kinds, pv + noise[sel])
        for kind, name in KIND_NAMES.items():
            if name in self.alpha2 and den[kind] > 0:
                self.alpha2[name] = float(num[kind] / den[kind])
                self.alpha2_pv[name] = float(num_pv[kind] / den[kind])
        self.info["calibration"] = f"{min(folds, n)}-fold cross-fitted over {n} labelled structures"

    def predictive(self, rows: RowBlock, with_mean: bool = True):
        """Per row, in the rows' physical units: μ = ρ c gᵀm (the residual the model predicts; 0 without the
        mean), the calibrated epistemic variance α²ρ²c²‖L⁻¹g‖² and the noise floor α²ρ²σ²; and the variances'
        (score [n], ‖L⁻¹g‖² [R]) of `variances`."""
        seg_out, row_out = self.variances(rows)
        a2 = self.per_row(rows.kind, self.alpha2 if with_mean else self.alpha2_pv, 1.0)
        c, rho = self.per_row(rows.kind, self.scales), self.per_row(rows.kind, self.rho, 0.0)
        G = rows.rows.detach()
        mu = (G @ self.mean.to(device=G.device, dtype=G.dtype)).cpu().to(F64) * c * rho if with_mean else 0 * rho
        return mu, a2 * rho.square() * c.square() * row_out, a2 * rho.square() * self.row_noise(rows.kind), \
            (seg_out, row_out)

    def residual_mean(self, rows: RowBlock) -> torch.Tensor:
        """μ per row (see predictive)."""
        return self.predictive(rows)[0]

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

    def atom_split(self, rows: RowBlock, row_out: torch.Tensor, weight: Optional[float] = None):
        """Per structure, per atom: weight × Σ over the atom's exact force rows of row_out (None without
        them); weight defaults to c_F²/σ_F² (the atom's force variance)."""
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

    def transform(self, psi: torch.Tensor) -> torch.Tensor:
        """Posterior-transformed LCMD vectors L⁻¹ψ (ψ already scaled by psi_scale), for LCMD's P mode."""
        return psi.to(F64) @ self.Linv.T.to(device=psi.device)

    def summary(self) -> dict:
        return {"k": self.k, "n_train": self.n_train, "sigma_e2": self.sigma_e2, "sigma_f2": self.sigma_f2,
                "force_reduce": self.force_reduce, "scales": dict(self.scales), "jitter": self.jitter,
                "kinds": self.kinds, "rho": dict(self.rho), "alpha2": dict(self.alpha2),
                "calibration": self.info.get("calibration")}


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
