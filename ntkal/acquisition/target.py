"""Target-aware acquisition: expected drop of the predictive variance over a target sample (float64).

Plain posterior variance rewards novelty even where the pretrained model is already fine. Given
unlabelled target structures (the user's MD frames, reaction paths), a candidate x is scored by how
much labelling it would reduce the total predictive variance over the target rows — transductive
variance reduction (Hübotter et al. 2024, "Transductive active learning"):

  C_T          = sum_{target rows t} w_t g~_t g~_t^T                      (k x k)
  reduction(x) = tr( (S_x + G~_x Lam^-1 G~_x^T)^-1  G~_x Lam^-1 C_T Lam^-1 G~_x^T )

with g~ = c_kind g the scaled rows (docs/design.md, Posterior), w_t = 1/sigma^2_kind (x 1/N_t for force rows with
force_reduce='mean'), so that sum_t w_t g~_t^T Lam^-1 g~_t is the sum of the target structures' scores,
and S_x = diag(sigma^2_kind) the candidate rows' noise. By Woodbury, reduction(x) is exactly the drop
of that sum when Lam gains G~_x^T S_x^-1 G~_x. Everything is linear in the pool, train and target
sizes: C_T is accumulated once (k x k) and factored as C_T = B^T B; per candidate only r x r
matrices appear (r = its row count), never a target x pool kernel.

Computation, with G^ = S_x^-1/2 G~_x (noise-normalised rows), A = G^ Linv^T, Z = G^ Lam^-1 B^T:
  reduction(x) = tr( (I + A A^T)^-1 Z Z^T )      (r x r matrices; I + A A^T has eigenvalues >= 1)
and for one-row candidates (energy / embedding kernels) ||B Lam^-1 g^||^2 / (1 + ||Linv g^||^2), two
``ntk_kernels.segment_quadform`` passes. Several-row candidates (force / joint kernels) are padded
into a few size buckets and solved in batches — no Python loop over structures.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch

import ntk_kernels

from ..errors import NtkalError
from ..features.rowblock import RowBlock
from ..posterior import Posterior, cholesky_inverse
from .scorers import PVScorer, Scored

__all__ = ["target_matrix", "TargetScorer", "greedy_select"]

F64 = torch.float64

#: Upper bound on the elements of one padded [structures, rows, k] float64 batch (32M = 256 MB).
_MAX_ELEMS = 1 << 22


def _check_rows(post: Posterior, rows: RowBlock, what: str) -> None:
    if rows.k != post.k:
        raise NtkalError(f"{what} features have width {rows.k}, the posterior {post.k} (different sketch_dim?)")
    post.row_scale(rows.kind)  # an error for a row kind the posterior was fitted without


def target_matrix(post: Posterior, target_rows: Union[RowBlock, Iterable[RowBlock]]) -> torch.Tensor:
    """C_T = sum_t w_t g~_t g~_t^T over the target rows (one RowBlock or an iterable of chunks), float64 [k, k].

    Weighted like the structure score (docs/design.md, Posterior), so tr(C_T Lam^-1) = sum of the target structures'
    scores. Use exact force rows if you can (probe rows give an unbiased estimate of the same matrix).
    """
    C: Optional[torch.Tensor] = None
    n = 0
    for block in ([target_rows] if isinstance(target_rows, RowBlock) else target_rows):
        if len(block) == 0:
            continue
        _check_rows(post, block, "target")
        G = block.rows.detach().to(F64)
        if not torch.isfinite(G).all():
            raise NtkalError("target features contain NaN or inf (check the target structures)")
        w = post.row_weights(block).to(G.device)  # c^2 * w_t: the row's score weight on unscaled rows
        part = (G * w[:, None]).T @ G
        C = part if C is None else C + part.to(C.device)
        n += len(block)
    if C is None or n == 0:
        raise NtkalError("the target set is empty: target-aware selection needs at least one target structure")
    C = C.cpu()
    return 0.5 * (C + C.T)


def _target_factor(C_T: torch.Tensor, k: int) -> torch.Tensor:
    """B [rank, k] with B^T B = C_T (eigendecomposition; eigenvalues at round-off level are dropped)."""
    C_T = torch.as_tensor(C_T).detach().to(F64).cpu()
    if tuple(C_T.shape) != (k, k):
        raise NtkalError(f"the target matrix is {tuple(C_T.shape)}, the posterior needs ({k}, {k})")
    if not torch.isfinite(C_T).all():
        raise NtkalError("the target matrix contains NaN or inf")
    lam, Q = torch.linalg.eigh(0.5 * (C_T + C_T.T))
    top = float(lam.max()) if lam.numel() else 0.0
    keep = lam > max(top, 0.0) * k * torch.finfo(F64).eps
    return (Q[:, keep] * lam[keep].sqrt()).T.contiguous()


def _ladder(rmax: int) -> torch.Tensor:
    """Padded row counts: 0..4, then steps of about 25% (multiples of 4), up to >= rmax."""
    out, b = [0, 1, 2, 3, 4], 4
    while b < rmax:
        b = max(b + 4, int(math.ceil(b * 1.25 / 4)) * 4)
        out.append(b)
    return torch.tensor(out, dtype=torch.int64)


class _Prepared:
    """Candidate rows normalised by their noise (G^ = c/sigma g) and padded into size buckets.

    buckets: list of (structure ids [n_b], padded rows [n_b, p, k]); padding rows are zero, which adds an
    identity block to I + A A^T and nothing to Z, so the trace is unchanged.
    """

    def __init__(self, post: Posterior, rows: RowBlock):
        _check_rows(post, rows, "candidate")
        self.n = len(rows)
        self.device = rows.rows.device
        G = rows.rows.detach()
        fac = (post.row_scale(rows.kind) / post.row_noise(rows.kind).sqrt()).to(device=G.device, dtype=G.dtype)
        self.flat = G * fac[:, None]  # noise-normalised scaled rows, the input dtype (for condition)
        if not torch.isfinite(self.flat).all():
            raise NtkalError("candidate features contain NaN or inf")
        counts = rows.ptr[1:] - rows.ptr[:-1]
        self.buckets: List[Tuple[torch.Tensor, torch.Tensor]] = []
        if self.n == 0:
            return
        ladder = _ladder(int(counts.max()))
        pad = ladder[torch.searchsorted(ladder, counts)]
        for p in torch.unique(pad).tolist():
            ids = torch.nonzero(pad == p).squeeze(1)
            if p == 0:
                continue  # structures without rows: reduction 0
            j = torch.arange(p)
            valid = j[None, :] < counts[ids][:, None]
            ridx = torch.where(valid, rows.ptr[ids][:, None] + j[None, :], torch.zeros((), dtype=torch.int64))
            P = self.flat[ridx.reshape(-1).to(self.device)].reshape(len(ids), p, -1)
            P = P * valid.to(device=self.device, dtype=P.dtype)[:, :, None]
            self.buckets.append((ids, P))


class TargetScorer(PVScorer):
    """Expected reduction of the total target variance per candidate (the scan's key, with PV written beside
    it), with greedy conditioning.

    Built from a Posterior and C_T (``target_matrix``). Uses only post.Linv (Lam^-1 = Linv^T Linv),
    post.scales and the noise levels, so it works for any way the posterior was built. ``condition``
    updates Lam as if candidates had been labelled (for sequential batch selection); the Posterior
    itself is never modified.
    """

    name = "target"

    def __init__(self, post: Posterior, C_T: torch.Tensor):
        super().__init__(post)
        self.k = post.k
        self.C_T = C_T
        self.B = _target_factor(C_T, self.k)  # [rank, k], B^T B = C_T
        self.Linv = post.Linv.detach().to(F64).cpu()
        self._lam: Optional[torch.Tensor] = None  # Lam, formed on the first condition()
        self.n_conditioned = 0
        self._refresh()

    def _refresh(self):
        lam_inv = self.Linv.T @ self.Linv
        self.FM = self.B @ lam_inv  # [rank, k]: B Lam^-1, so g^T M g = ||FM g||^2 with M = Lam^-1 C_T Lam^-1
        self._dev: Dict[torch.device, dict] = {}

    def _on(self, device) -> dict:
        """The state's tensors on `device` (cached until the next condition)."""
        device = torch.device(device)
        if device not in self._dev:
            fm_sq = torch.zeros(self.k, self.k, dtype=F64)  # segment_quadform wants a square factor
            fm_sq[: self.FM.shape[0]] = self.FM  # rank <= k rows, zero rows below
            LF = torch.cat([self.Linv.T, self.FM.T], 1)  # [k, k + rank]
            self._dev[device] = {"Linv": self.Linv.to(device), "LF": LF.to(device), "FM_sq": fm_sq.to(device)}
        return self._dev[device]

    def target_variance(self) -> float:
        """Current total target variance tr(C_T Lam^-1) = sum of the target structures' scores."""
        return float((self.B @ self.Linv.T).square().sum())

    # --- scoring --------------------------------------------------------------------------------
    def __call__(self, rows: RowBlock) -> Scored:
        """The pool scan's Scored: key = target_reduction, PV (and per-atom variances) beside it."""
        out = super().__call__(rows)
        out.key = self.reduction(rows).numpy()
        out.values["target_reduction"] = out.key
        return out

    def reduction(self, rows: RowBlock) -> torch.Tensor:
        """Expected drop of the total target variance if each structure of `rows` were labelled: float64 [n]."""
        return self._reduce(_Prepared(self.post, rows)).cpu()

    def _reduce(self, prep: _Prepared, alive: Optional[torch.Tensor] = None, quadform: bool = True) -> torch.Tensor:
        out = torch.zeros(prep.n, dtype=F64, device=prep.device)
        st = self._on(prep.device)
        LF = st["LF"]
        for ids, P in prep.buckets:
            if alive is not None:
                keep = alive[ids]
                ids, P = ids[keep], P[keep.to(P.device)]
            n_b, p, k = P.shape
            if n_b == 0:
                continue
            if p == 1 and quadform:
                # one row: ||B Lam^-1 g^||^2 / (1 + ||Linv g^||^2), one fused pass each
                G = P[:, 0, :].to(F64)
                seg = torch.arange(n_b, device=G.device)
                ones = torch.ones(n_b, dtype=F64, device=G.device)
                num, _ = ntk_kernels.segment_quadform(G, st["FM_sq"], seg, ones, n_b)
                v, _ = ntk_kernels.segment_quadform(G, st["Linv"], seg, ones, n_b)
                out[ids.to(out.device)] = num / (1.0 + v)
                continue
            step = max(1, _MAX_ELEMS // (p * (k + self.FM.shape[0])))
            for s0 in range(0, n_b, step):
                AZ = P[s0:s0 + step].to(F64) @ LF  # [b, p, k + rank]: whitened rows A | Z = G^ Lam^-1 B^T
                A, Z = AZ[..., :k], AZ[..., k:]
                K = A @ A.transpose(1, 2)  # I + A A^T: noise-normalised predictive covariance of the rows
                K.diagonal(dim1=1, dim2=2).add_(1.0)
                N = Z @ Z.transpose(1, 2)
                # tr(K^-1 N) from p x p matrices only (a batched triangular solve against Z is slow on CPU)
                Kinv = torch.cholesky_inverse(torch.linalg.cholesky(K))
                out[ids[s0:s0 + step].to(out.device)] = (Kinv * N).sum((1, 2)).clamp_(min=0.0)
        return out

    # --- conditioning ---------------------------------------------------------------------------
    def condition(self, rows: RowBlock) -> None:
        """Update the state as if the structures in `rows` were labelled: Lam += G~^T S^-1 G~; refresh Linv and M."""
        self._condition_prepared(_Prepared(self.post, rows))

    def _condition_prepared(self, prep: _Prepared, rows_mask: Optional[torch.Tensor] = None) -> None:
        G = prep.flat if rows_mask is None else prep.flat[rows_mask]
        if G.shape[0] == 0:
            return
        if self._lam is None:
            self._lam = self.post.L @ self.post.L.T
        G = G.to(F64)
        self._lam = self._lam + (G.T @ G).cpu()
        self.Linv, _ = cholesky_inverse(self._lam)
        self.n_conditioned += 1
        self._refresh()


def greedy_select(post: Posterior, C_T: torch.Tensor, cand_rows: RowBlock, budget: int):
    """Sequential target-aware batch: pick the largest reduction, condition on it, rescore the rest, repeat.

    Returns (indices into cand_rows in pick order, int64 [budget]; each pick's reduction at pick time,
    float64 [budget]). Ties go to the lower index. The reductions add up: the total target variance
    after labelling all picks is TargetScorer(post, C_T).target_variance() - reductions.sum().
    Cost per pick: one pass over the remaining candidates' rows (rows x k^2) plus one k x k Cholesky,
    so run it on a shortlist.
    """
    budget = int(budget)
    n = len(cand_rows)
    if budget < 1:
        raise ValueError("budget must be at least 1")
    if budget > n:
        raise ValueError(f"budget {budget} is larger than the number of candidates ({n})")
    scorer = TargetScorer(post, C_T)
    prep = _Prepared(post, cand_rows)
    alive = torch.ones(n, dtype=torch.bool)
    seg = cand_rows.seg.cpu()
    picks, reds = [], []
    for t in range(budget):
        red = scorer._reduce(prep, alive).cpu()
        red = torch.where(alive, red, torch.tensor(float("-inf"), dtype=F64))
        j = int(torch.argmax(red))  # first maximum: ties go to the lower index
        picks.append(j)
        reds.append(float(red[j]))
        alive[j] = False
        if t + 1 < budget:
            scorer._condition_prepared(prep, (seg == j).to(prep.flat.device))
    return np.asarray(picks, dtype=np.int64), np.asarray(reds, dtype=np.float64)
