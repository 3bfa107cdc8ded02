"""Selectors: how B structures are picked from the scan's candidates (a registry, as bmdal_reg's methods).

Each selector takes the candidate list it declares (`shortlist` or `reservoir`) and a SelectContext and
returns (positions into that list in pick order, status or None). LCMD is Holzmüller et al.'s Largest
Cluster Maximum Distance, tested to give bmdal_reg's indices on identical vectors (tests/test_select.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

import ntk_kernels

from ..options import MODES
from .candidates import Candidate
from .centres import Centres

# LCMD distances in float32 (as bmdal_reg): its cost is the n_train x M x k TP-init GEMM; the posterior stays float64
LCMD_DTYPE = torch.float32


@dataclass
class SelectContext:
    """What a selector may use besides the candidates."""

    centres: Optional[Centres] = None   # the labelled structures' ψ (TP mode's initial centres)
    mode: str = "tp"
    seed: int = 0
    greedy: Optional[Callable[[List[Candidate], int], tuple]] = None  # target-aware picks (pipeline builds it)


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

    |c|² − 2c·p comes out of one addmm and |p|² is added after the min over centres (it does not depend
    on the centre), so the cost is the n_train × M × k GEMM and one pass over its output.
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


def _lcmd(cands: List[Candidate], budget: int, ctx: SelectContext):
    psi = torch.stack([c.psi for c in cands])  # P mode: already posterior-transformed (Centres.vectors)
    if ctx.mode == "p":
        return lcmd(psi.to(LCMD_DTYPE), None, budget, mode="p", seed=ctx.seed, return_status=True)
    train = ctx.centres.psi if ctx.centres is not None else torch.zeros(0, psi.shape[1])
    return lcmd(psi.to(LCMD_DTYPE), train.to(LCMD_DTYPE), budget, mode="tp", seed=ctx.seed, return_status=True)


def _first(cands: List[Candidate], budget: int, ctx: SelectContext):
    return np.arange(budget), None


def _greedy(cands: List[Candidate], budget: int, ctx: SelectContext):
    return ctx.greedy(cands, budget)


@dataclass(frozen=True)
class Selector:
    pick: Callable
    uses: str  # "shortlist" (the top-M by key) or "reservoir" (a seeded uniform sample of the pool)


#: name -> selector; "top" and "random" take the first B of their list (keys in descending order)
SELECTORS: Dict[str, Selector] = {
    "lcmd": Selector(_lcmd, "shortlist"),
    "top": Selector(_first, "shortlist"),
    "random": Selector(_first, "reservoir"),
    "greedy": Selector(_greedy, "shortlist"),
}
