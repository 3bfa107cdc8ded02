"""Streaming top-M shortlist and batch selection: LCMD (TP and P modes), top-PV, random (DESIGN §4-5)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import numpy as np
import torch

import ntk_kernels

from .errors import InputError
from .features.rowblock import RowBlock
from .posterior import Posterior

METHODS = ("lcmd", "top", "random")
MODES = ("tp", "p")
# LCMD distances in float32 (as bmdal_reg): its cost is the n_train x M x k TP-init GEMM; the posterior stays float64
LCMD_DTYPE = torch.float32


def default_shortlist(budget: int) -> int:
    return max(10 * int(budget), 2000)


class TopM:
    """Running top-M of (key, index) pairs over a stream, with per-item payloads kept alongside.

    Ties in the key go to the lower index, so the result does not depend on how the stream was chunked.
    """

    def __init__(self, m: int):
        self.m = int(m)
        self.keys = np.zeros(0, dtype=np.float64)
        self.index = np.zeros(0, dtype=np.int64)
        self.payload: List[Any] = []

    def add(self, keys, index, payload=None):
        keys = np.asarray(keys, dtype=np.float64)
        index = np.asarray(index, dtype=np.int64)
        payload = [None] * len(keys) if payload is None else list(payload)
        all_keys = np.concatenate([self.keys, keys])
        all_index = np.concatenate([self.index, index])
        all_payload = self.payload + payload
        order = np.lexsort((all_index, -all_keys))[: self.m]
        self.keys, self.index = all_keys[order], all_index[order]
        self.payload = [all_payload[i] for i in order]

    def candidates(self, keys) -> np.ndarray:
        """Positions of `keys` that can still enter: >= both the chunk's m-th largest key and the current
        m-th key. Ties are kept (add() decides them by index), so filtering never changes the result."""
        keys = np.asarray(keys, dtype=np.float64)
        n = len(keys)
        if self.m == 0 or n == 0:
            return np.zeros(0, dtype=np.int64)
        if np.isnan(keys).any():  # NaN sorts last in add(); do not filter around it
            return np.arange(n)
        thr = np.partition(keys, n - self.m)[n - self.m] if n > self.m else -np.inf
        if len(self) >= self.m and self.keys[self.m - 1] > thr:
            thr = self.keys[self.m - 1]
        return np.flatnonzero(keys >= thr)

    def offer(self, keys, index, payload_of: Callable[[np.ndarray], List[Any]]):
        """add() only the items that can still enter; payload_of(positions) builds just their payloads."""
        keep = self.candidates(keys)
        if len(keep):
            self.add(np.asarray(keys)[keep], np.asarray(index)[keep], payload_of(keep))

    def __len__(self):
        return len(self.keys)


class Shortlist:
    """A pool scan's streaming state: the top-m by key, and a reservoir that keeps the rows with the
    n_random largest random draws (a seeded uniform sample). Each chunk's payloads are built once, only
    for the rows that can still enter either list, so memory is O(m) payloads whatever the pool size."""

    def __init__(self, m: int, n_random: int = 0, top: Optional[TopM] = None, rnd: Optional[TopM] = None):
        self.top = top if top is not None else TopM(m)
        self.rnd = rnd if rnd is not None else TopM(n_random)

    def add(self, keys, index, payload_of: Callable[[np.ndarray], List[Any]], random_keys=None):
        """One chunk: keys and pool indices per row, random_keys (one draw per row) for the reservoir."""
        keys, index = np.asarray(keys, dtype=np.float64), np.asarray(index, dtype=np.int64)
        keep = self.top.candidates(keys)
        keep_r = self.rnd.candidates(random_keys) if random_keys is not None else keep[:0]
        rows = np.union1d(keep, keep_r)
        if len(rows) == 0:
            return
        built = dict(zip(rows.tolist(), payload_of(rows)))
        if len(keep):
            self.top.add(keys[keep], index[keep], [built[i] for i in keep.tolist()])
        if len(keep_r):
            self.rnd.add(np.asarray(random_keys)[keep_r], index[keep_r], [built[i] for i in keep_r.tolist()])


def lcmd_rows(block: RowBlock, positions, psi_scale: float) -> List[torch.Tensor]:
    """Scaled float64 LCMD vectors of the structures at `positions`, one tensor with its own storage each
    (a view would keep its whole chunk alive in the shortlist)."""
    psi = block.lcmd_vectors().detach()
    psi = psi[torch.as_tensor(positions, dtype=torch.int64, device=psi.device)].cpu().to(torch.float64) * psi_scale
    return [row.clone() for row in psi]


def lcmd(psi_pool, psi_train, budget: int, mode: str = "tp", seed: int = 0, return_status: bool = False):
    """Largest Cluster Maximum Distance (Holzmüller et al., as bmdal_reg): indices into psi_pool.

    Each candidate belongs to its nearest centre (TP mode: the training points, then the picks; P mode:
    the picks only — pass posterior-transformed vectors); a cluster's size is the sum of its members'
    squared distances; the next pick is the farthest member of the largest cluster. The first P-mode
    pick is the largest-norm candidate. If no valid pick is left, the rest is filled at random
    (seeded) and the status says so.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    psi = torch.as_tensor(psi_pool)
    n = psi.shape[0]
    budget = int(budget)
    if budget > n:
        raise ValueError(f"budget {budget} is larger than the number of candidates ({n})")
    dmin2 = torch.full((n,), float("inf"), dtype=psi.dtype, device=psi.device)
    owner = torch.zeros(n, dtype=torch.int64, device=psi.device)
    n_added = 0
    if mode == "tp" and psi_train is not None and len(psi_train) > 0:
        n_added = _init_from_centres(psi, torch.as_tensor(psi_train).to(psi), dmin2, owner)
    selected: List[int] = []
    taken = torch.zeros(n, dtype=torch.bool, device=psi.device)
    status = None
    neg_inf = torch.tensor(float("-inf"), dtype=psi.dtype, device=psi.device)
    for _ in range(budget):
        if n_added == 0:
            nxt, valid = int(torch.argmax(psi.square().sum(1))), True
        else:
            size = torch.bincount(owner, weights=dmin2, minlength=n_added + 1)
            scores = torch.where(size[owner] == size.max(), dmin2, neg_inf)
            scores[taken] = float("-inf")
            nxt = int(torch.argmax(scores))
            valid = bool(scores[nxt] > float("-inf"))
        if not valid:
            status = f"filled up with random candidates: LCMD found no valid pick after {len(selected)}"
            gen = torch.Generator().manual_seed(int(seed))
            rest = torch.nonzero(~taken.cpu()).squeeze(-1)
            fill = rest[torch.randperm(len(rest), generator=gen)[: budget - len(selected)]]
            selected.extend(int(i) for i in fill)
            break
        ntk_kernels.lcmd_update(psi, psi[nxt].clone(), dmin2, owner, n_added + 1)
        n_added += 1
        selected.append(nxt)
        taken[nxt] = True
    out = np.asarray(selected, dtype=np.int64)
    return (out, status) if return_status else out


def _init_from_centres(psi, centres, dmin2, owner, chunk: int = 1024) -> int:
    """Nearest training centre of every candidate (ids 1..n_train; the first one wins ties), in chunks.

    |c|^2 - 2 c.p comes out of one addmm and |p|^2 is added after the min over centres (it does not
    depend on the centre), so the cost is the n_train x M x k GEMM and one pass over its output.
    """
    p2 = psi.square().sum(1)
    for c0 in range(0, centres.shape[0], chunk):
        c = centres[c0:c0 + chunk]
        best, arg = torch.addmm(c.square().sum(1)[:, None], c, psi.T, alpha=-2.0).min(0)
        best = best + p2
        better = best < dmin2
        dmin2[better] = best[better]
        owner[better] = arg[better] + c0 + 1
    return centres.shape[0]


@dataclass
class SelectionResult:
    """What a selection returns: picks (pool indices, in pick order), their scores, the shortlist, timings."""

    indices: np.ndarray
    scores: np.ndarray
    shortlist: np.ndarray
    shortlist_scores: np.ndarray
    timings: Dict[str, float]
    status: Optional[str]
    n_pool: int
    method: str
    mode: str
    posterior: Optional[Posterior] = None
    atoms: Optional[list] = None
    atom_variances: Optional[list] = None
    info: dict = field(default_factory=dict)


def shortlist_scores(post: Posterior, pool_rows: Union[RowBlock, Iterable[RowBlock]], m: int,
                     random_keys: Optional[np.random.Generator] = None):
    """Stream pool chunks through the posterior and keep the top-m by score (payload: score, scaled LCMD vector)."""
    state = Shortlist(m, m if random_keys is not None else 0)
    offset = 0
    for block in ([pool_rows] if isinstance(pool_rows, RowBlock) else pool_rows):
        if len(block) == 0:
            continue
        scores = post.score(block).numpy()
        rnd_keys = random_keys.random(len(block)) if random_keys is not None else None
        state.add(scores, np.arange(offset, offset + len(block)),
                  lambda pos: list(zip(scores[pos], lcmd_rows(block, pos, post.psi_scale))), rnd_keys)
        offset += len(block)
    return state.top, (state.rnd if random_keys is not None else None), offset


def pick(method: str, budget: int, top: TopM, rnd: Optional[TopM], post: Posterior, mode: str = "tp", seed: int = 0):
    """(positions into the candidate list, candidate list, status) for the chosen method."""
    if method == "random":
        return np.arange(budget), rnd, None
    if method == "top":
        return np.arange(budget), top, None
    psi = torch.stack([p[1] for p in top.payload])
    if mode == "p":
        idx, status = lcmd(post.transform(psi).to(LCMD_DTYPE), None, budget, mode="p", seed=seed, return_status=True)
    else:
        train = post.train_psi if post.train_psi is not None else torch.zeros(0, psi.shape[1])
        idx, status = lcmd(psi.to(LCMD_DTYPE), train.to(LCMD_DTYPE), budget, mode="tp", seed=seed,
                           return_status=True)
    return idx, top, status


def select_rows(train_rows, pool_rows, budget: int, method: str = "lcmd", shortlist: Optional[int] = None,
                sigma_e2: float = 1e-2, sigma_f2: float = 1e-2, force_reduce: str = "mean",
                mode: str = "tp", seed: int = 0) -> SelectionResult:
    """Row-level selection (any MLIP, precomputed features): posterior from train rows, streamed PV, top-M, pick B."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    budget = int(budget)
    if budget < 1:
        raise ValueError("budget must be at least 1")
    m = max(int(shortlist or default_shortlist(budget)), budget)
    t0 = time.perf_counter()
    post = Posterior.from_rows(train_rows, sigma_e2, sigma_f2, force_reduce)
    t1 = time.perf_counter()
    rng = np.random.default_rng(seed) if method == "random" else None
    top, rnd, n_pool = shortlist_scores(post, pool_rows, m, rng)
    t2 = time.perf_counter()
    if n_pool == 0:
        raise InputError("the pool is empty")
    if budget > n_pool:
        raise InputError(f"budget {budget} is larger than the pool ({n_pool} structures)")
    pos, cands, status = pick(method, budget, top, rnd, post, mode, seed)
    t3 = time.perf_counter()
    return SelectionResult(
        indices=cands.index[pos], scores=np.array([cands.payload[i][0] for i in pos]),
        shortlist=top.index.copy(), shortlist_scores=top.keys.copy(),
        timings={"posterior": t1 - t0, "score": t2 - t1, "select": t3 - t2, "total": t3 - t0},
        status=status, n_pool=n_pool, method=method, mode=mode, posterior=post)
