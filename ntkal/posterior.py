"""Feature-space posterior of the Bayesian linear model in sketch space (DESIGN §3), in float64.

Prior w ~ N(0, I_k); a training row g observes g.w with noise sigma^2 of its kind. The precision
Lambda = I + sum_g g g^T / sigma^2 is accumulated chunk by chunk (one k x k Gram per kind, so the
per-kind scales fitted on the same pass can be applied at the end), then Cholesky-factorised with
jitter retry. A pool row's predictive variance is v(g) = g^T Lambda^-1 g = ||L^-1 g||^2; scoring
streams rows through ntk_kernels.segment_quadform and never forms a train x pool kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Union

import numpy as np
import torch

import ntk_kernels

from .errors import NtkalError
from .features.rowblock import EMBEDDING, ENERGY, FORCE, KIND_NAMES, RowBlock

FORCE_REDUCE = ("mean", "sum")


class _Accumulator:
    """One streaming pass over training rows: per-kind Grams, per-kind score parts, LCMD vectors."""

    def __init__(self, force_reduce: str):
        self.force_reduce = force_reduce
        self.gram: Dict[int, torch.Tensor] = {}
        self.part: Dict[int, float] = {}
        self.n = 0
        self.psi: List[torch.Tensor] = []
        self.psi_index: List[torch.Tensor] = []
        self.k: Optional[int] = None

    def add(self, block: RowBlock, start: Optional[int] = None):
        """Add a chunk of training rows; `start` is the chunk's first structure index (keeps LCMD centres in order)."""
        if len(block) == 0:
            return
        rows = block.rows.detach()
        if self.k is None:
            self.k = rows.shape[1]
        elif rows.shape[1] != self.k:
            raise ValueError(f"training row blocks disagree in width: {rows.shape[1]} != {self.k}")
        sq = rows.square().sum(1, dtype=torch.float64)
        if not torch.isfinite(sq).all():  # a NaN or inf anywhere in a row makes its squared norm one
            raise NtkalError("training features contain NaN or inf (check the training structures)")
        seg = block.seg.to(rows.device)
        natoms = block.natoms.to(torch.float64).to(rows.device)
        kinds = torch.unique(block.kind).tolist()
        for kind in kinds:
            if len(kinds) == 1:  # no masked copy
                g, sq_k, seg_k = rows, sq, seg
            else:
                m = (block.kind == kind).to(rows.device)
                g, sq_k, seg_k = rows[m], sq[m], seg[m]
            self.gram[kind] = self.gram.get(kind, 0) + _gram(g)
            per_struct = torch.zeros(len(block), dtype=torch.float64, device=rows.device).index_add_(0, seg_k, sq_k)
            if kind == FORCE and self.force_reduce == "mean":
                per_struct = per_struct / natoms
            self.part[kind] = self.part.get(kind, 0.0) + float(per_struct.sum())
        self.psi.append(block.lcmd_vectors().detach().cpu())  # float64 in from_accumulator
        first = self.n if start is None else int(start)
        self.psi_index.append(torch.arange(first, first + len(block)))
        self.n += len(block)

    def all_reduce(self):
        """Sum the accumulators of all torch.distributed ranks (each fed a shard of the training set)."""
        import torch.distributed as dist
        kinds = (ENERGY, FORCE, EMBEDDING)
        ks = [None] * dist.get_world_size()
        dist.all_gather_object(ks, self.k)
        k = next((x for x in ks if x is not None), None)
        if k is None:
            return self
        self.k = k
        present = torch.tensor([float(kd in self.gram) for kd in kinds] + [float(self.n)], dtype=torch.float64)
        parts = torch.tensor([self.part.get(kd, 0.0) for kd in kinds], dtype=torch.float64)
        grams = torch.stack([self.gram[kd].cpu() if kd in self.gram else torch.zeros(k, k, dtype=torch.float64)
                             for kd in kinds])
        for t in (present, parts, grams):
            dist.all_reduce(t)
        self.gram = {kd: grams[i] for i, kd in enumerate(kinds) if present[i] > 0}
        self.part = {kd: float(parts[i]) for i, kd in enumerate(kinds) if present[i] > 0}
        self.n = int(present[-1])
        shards = [None] * dist.get_world_size()
        dist.all_gather_object(shards, (self.psi_index, self.psi))
        idx = [i for ix, _ in shards for i in ix]
        psi = [p for _, ps in shards for p in ps]
        if psi:
            order = torch.argsort(torch.cat(idx))
            self.psi, self.psi_index = [torch.cat(psi)[order]], [torch.cat(idx)[order]]
        return self


_GRAM_BLOCK = 2048  # rows per single-precision Gram product


def _gram(g: torch.Tensor) -> torch.Tensor:
    """gᵀg in float64: float64 rows directly; others as products of 2048-row blocks, each summed in float64.

    Matches the kernels' rule (fp32 products, wider accumulation) and halves the n_train·k² cost of
    the default float32 features; the precision and its Cholesky stay float64.
    """
    if g.dtype == torch.float64:
        return g.T @ g
    out = torch.zeros(g.shape[1], g.shape[1], dtype=torch.float64, device=g.device)
    for r0 in range(0, g.shape[0], _GRAM_BLOCK):
        gb = g[r0:r0 + _GRAM_BLOCK]
        out += (gb.T @ gb).to(torch.float64)
    return out


@dataclass
class Posterior:
    """Lambda = I + sum_kind c_kind^2 Gram_kind / sigma_kind^2 with its Cholesky factor and inverse."""

    L: torch.Tensor  # float64 [k, k], lower
    Linv: torch.Tensor  # float64 [k, k]
    scales: Dict[str, float]
    sigma_e2: float
    sigma_f2: float
    force_reduce: str
    jitter: float
    n_train: int
    kinds: List[str]
    psi_scale: float = 1.0
    train_psi: Optional[torch.Tensor] = None  # scaled LCMD vectors of the training structures
    info: dict = field(default_factory=dict)

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_rows(cls, train_rows: Union[RowBlock, Iterable[RowBlock]], sigma_e2: float = 1e-2,
                  sigma_f2: float = 1e-2, force_reduce: str = "mean") -> "Posterior":
        """Fit scales and the precision from training rows (one RowBlock or an iterable of chunks)."""
        if force_reduce not in FORCE_REDUCE:
            raise ValueError(f"force_reduce must be one of {FORCE_REDUCE}, got {force_reduce!r}")
        if not (sigma_e2 > 0 and sigma_f2 > 0):
            raise ValueError("sigma_e2 and sigma_f2 must be positive")
        acc = _Accumulator(force_reduce)
        for block in ([train_rows] if isinstance(train_rows, RowBlock) else train_rows):
            acc.add(block)
        return cls.from_accumulator(acc, sigma_e2, sigma_f2)

    @classmethod
    def from_accumulator(cls, acc: "_Accumulator", sigma_e2: float = 1e-2, sigma_f2: float = 1e-2) -> "Posterior":
        force_reduce = acc.force_reduce
        if not (sigma_e2 > 0 and sigma_f2 > 0):
            raise ValueError("sigma_e2 and sigma_f2 must be positive")
        if acc.n == 0 or acc.k is None:
            raise NtkalError("the training set is empty: the posterior needs at least one training structure")
        k = acc.k
        scales, lam = {}, torch.eye(k, dtype=torch.float64)
        for kind, gram in sorted(acc.gram.items()):
            mean_part = acc.part[kind] / acc.n
            c = 1.0 / math.sqrt(mean_part) if mean_part > 0 else 1.0
            scales[KIND_NAMES[kind]] = c
            sigma2 = sigma_f2 if kind == FORCE else sigma_e2
            lam = lam + (c * c / sigma2) * gram.cpu()
        L, jitter = robust_cholesky(lam)
        Linv = torch.linalg.solve_triangular(L, torch.eye(k, dtype=torch.float64), upper=False)
        psi, psi_scale = None, 1.0
        if acc.psi:
            psi = torch.cat(acc.psi)
            ms = float(psi.square().sum(1, dtype=torch.float64).mean())
            psi_scale = 1.0 / math.sqrt(ms) if ms > 0 else 1.0
            psi = psi.to(torch.float64).mul_(psi_scale)
        return cls(L=L, Linv=Linv, scales=scales, sigma_e2=float(sigma_e2), sigma_f2=float(sigma_f2),
                   force_reduce=force_reduce, jitter=jitter, n_train=acc.n, kinds=sorted(scales),
                   psi_scale=psi_scale, train_psi=psi)

    @classmethod
    def fit(cls, featurizer, train_atoms, sigma_e2: float = 1e-2, sigma_f2: float = 1e-2,
            force_reduce: str = "mean", chunk_size: int = 64, progress: bool = False,
            distributed: bool = False) -> "Posterior":
        """Featurise the training structures (exact force rows, also when the featurizer uses probes) and fit.

        Probes only change how the POOL is scored: the precision and the scales come from exact rows,
        so exact and probe mode share one posterior (and one set of scales). With distributed=True
        (torch.distributed initialised) each rank featurises every world-th chunk and the sums are all-reduced.
        """
        from .io import iter_chunks
        if force_reduce not in FORCE_REDUCE:
            raise ValueError(f"force_reduce must be one of {FORCE_REDUCE}, got {force_reduce!r}")
        rank, world = 0, 1
        if distributed:
            import torch.distributed as dist
            rank, world = dist.get_rank(), dist.get_world_size()
        exact = featurizer if featurizer.force_probes is None else featurizer.with_kernel(featurizer.kernel, None)
        atoms = list(train_atoms)
        acc = _Accumulator(force_reduce)
        bar = _bar(len(atoms), "train features", progress and rank == 0)
        for c, chunk in enumerate(iter_chunks(atoms, chunk_size)):
            if c % world == rank:
                acc.add(exact(chunk), start=c * chunk_size)
            bar.update(len(chunk))
        bar.close()
        if world > 1:
            acc.all_reduce()
        post = cls.from_accumulator(acc, sigma_e2, sigma_f2)
        post.info["featurizer"] = featurizer.settings()
        return post

    # --- scoring --------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self.L.shape[0]

    def row_weights(self, rows: RowBlock) -> torch.Tensor:
        """Per-row factor c_kind^2 / sigma_kind^2 (x 1/N for force rows with force_reduce='mean')."""
        w = torch.zeros(rows.rows.shape[0], dtype=torch.float64)
        kind = rows.kind
        for k_id, name in KIND_NAMES.items():
            m = kind == k_id
            if not bool(m.any()):
                continue
            if name not in self.scales:
                raise NtkalError(f"pool rows contain {name} rows but the training rows had none")
            sigma2 = self.sigma_f2 if k_id == FORCE else self.sigma_e2
            w[m] = self.scales[name] ** 2 / sigma2
        if self.force_reduce == "mean":
            natoms_row = torch.repeat_interleave(rows.natoms.to(torch.float64), rows.ptr[1:] - rows.ptr[:-1])
            w = torch.where(kind == FORCE, w / natoms_row, w)
        return w

    def _quadform(self, rows: RowBlock):
        if rows.k != self.k:
            raise NtkalError(f"pool features have width {rows.k}, the posterior {self.k} (different sketch_dim?)")
        G = rows.rows.detach()
        w = self.row_weights(rows).to(device=G.device, dtype=G.dtype)
        return ntk_kernels.segment_quadform(G, self.Linv.to(device=G.device, dtype=G.dtype),
                                            rows.seg.to(G.device), w, len(rows))

    def score(self, rows: RowBlock) -> torch.Tensor:
        """score(x) = v(energy row)/sigma_E^2 + (1/N) sum_force v(g)/sigma_F^2 on scaled rows; one per structure."""
        if len(rows) == 0:
            return torch.zeros(0, dtype=torch.float64)
        seg_out, _ = self._quadform(rows)
        return seg_out.detach().cpu().to(torch.float64)

    def score_with_atoms(self, rows: RowBlock):
        """(scores [n], per-structure arrays of per-atom force variances or None) in one pass over the rows."""
        if len(rows) == 0:
            return torch.zeros(0, dtype=torch.float64), []
        seg_out, row_out = self._quadform(rows)
        return seg_out.detach().cpu().to(torch.float64), self._atom_split(rows, row_out.detach().cpu())

    def row_variances(self, rows: RowBlock) -> torch.Tensor:
        """v(c g) = c^2 ||L^-1 g||^2 for every row (scaled feature units, not divided by sigma^2)."""
        _, row_out = self._quadform(rows)
        c2 = torch.zeros(rows.rows.shape[0], dtype=torch.float64)
        for k_id, name in KIND_NAMES.items():
            if name in self.scales:
                c2[rows.kind == k_id] = self.scales[name] ** 2
        return row_out.detach().cpu().to(torch.float64) * c2

    def atom_variances(self, rows: RowBlock) -> List[Optional[np.ndarray]]:
        """Per structure, per atom: sum over x, y, z of v(force row)/sigma_F^2 (None without exact force rows).

        With force_reduce='mean' their mean over atoms is the force part of the score.
        """
        _, row_out = self._quadform(rows)
        return self._atom_split(rows, row_out.detach().cpu())

    def _atom_split(self, rows: RowBlock, row_out: torch.Tensor) -> List[Optional[np.ndarray]]:
        out: List[Optional[np.ndarray]] = []
        if rows.atom is None or "force" not in self.scales:
            return [None] * len(rows)
        c2 = self.scales["force"] ** 2 / self.sigma_f2
        for s in range(len(rows)):
            a, b = int(rows.ptr[s]), int(rows.ptr[s + 1])
            atom = rows.atom[a:b]
            m = atom >= 0
            if not bool(m.any()):
                out.append(None)
                continue
            v = torch.zeros(int(rows.natoms[s]), dtype=torch.float64).index_add_(
                0, atom[m], row_out[a:b][m].to(torch.float64) * c2)
            out.append(v.numpy())
        return out

    def transform(self, psi: torch.Tensor) -> torch.Tensor:
        """Posterior-transformed LCMD vectors L^-1 psi (psi already scaled by psi_scale, as in the shortlist), for P mode."""
        return psi.to(torch.float64) @ self.Linv.T.to(device=psi.device)

    def summary(self) -> dict:
        return {"k": self.k, "n_train": self.n_train, "sigma_e2": self.sigma_e2, "sigma_f2": self.sigma_f2,
                "force_reduce": self.force_reduce, "scales": dict(self.scales), "jitter": self.jitter,
                "kinds": list(self.kinds)}


def robust_cholesky(A: torch.Tensor, max_tries: int = 12):
    """Cholesky of a symmetric positive-definite float64 matrix, adding growing jitter if it fails."""
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


def _bar(total, desc, enabled):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="struct", disable=not enabled, leave=False)
