"""Structure-level entry points: ntkal.select and ntkal.score (structures or files in, picks and scores out).

The pool is streamed in chunks: features -> scores -> a running top-M shortlist, so memory stays flat
in the pool size. Under torchrun each rank takes every world-th chunk (and training chunk) and the
shortlists are merged; with a checkpoint folder the run can be killed and rerun to the same result.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from .errors import InputError
from .features import MACEFeaturizer
from .io import check_structure, count_structures, iter_chunks, read_structures
from .posterior import Posterior
from .runstate import Checkpoint, Dist
from .select import METHODS, MODES, SelectionResult, Shortlist, TopM, default_shortlist, lcmd_rows, pick


@dataclass
class Source:
    """Structures from a path, a list or an iterator, with their count when it is known up front."""

    items: Iterable
    total: Optional[int]
    path: Optional[Path]

    @classmethod
    def of(cls, obj, what: str) -> "Source":
        if isinstance(obj, Source):
            return obj
        if isinstance(obj, (str, os.PathLike)):
            path = Path(obj)
            return cls(read_structures(path), count_structures(path), path)
        from ase import Atoms
        if isinstance(obj, Atoms):
            return cls([obj], 1, None)
        if isinstance(obj, Sequence):
            return cls(list(obj), len(obj), None)
        if hasattr(obj, "__iter__"):
            return cls(obj, None, None)
        raise TypeError(f"{what} must be a path, a list of ase.Atoms or an iterator of them")


def _validated(src: Source, known) -> Iterator:
    for i, atoms in enumerate(src.items):
        check_structure(atoms, i, src.path, known)
        yield atoms


def chunk_size_for(memory_gb: float, sketch_dim: int, rows_per_structure: int = 64) -> int:
    """Structures per chunk so that a chunk's feature rows (with working copies) fit in `memory_gb`."""
    per_structure = rows_per_structure * sketch_dim * 4 * 8 + 64 * 1024  # rows x k x fp32 x copies + Atoms
    return int(min(4096, max(8, memory_gb * 2 ** 30 * 0.25 // per_structure)))


def featurizer_for(model, kernel="joint", sketch_dim=512, params="all", force_probes=None, seed=0,
                   impl="auto", dtype=torch.float32, device="cpu") -> MACEFeaturizer:
    return MACEFeaturizer(model, kernel=kernel, sketch_dim=sketch_dim, params=params, force_probes=force_probes,
                          seed=seed, impl=impl, dtype=dtype, device=device)


def fit_posterior(fz: MACEFeaturizer, train, sigma_e2=1e-2, sigma_f2=1e-2, force_reduce="mean",
                  chunk_size=64, progress=False, checkpoint: Optional[Checkpoint] = None) -> Posterior:
    """Validate the training structures and fit the posterior (exact force rows; sharded over ranks)."""
    d = Dist.current()
    if checkpoint is not None:
        state = checkpoint.load("posterior", shared=True)
        if state is not None:
            return state["posterior"]
    src = Source.of(train, "train")
    atoms = list(_validated(src, fz.atomic_numbers))
    if not atoms:
        raise InputError("the training set is empty", path=src.path)
    post = Posterior.fit(fz, atoms, sigma_e2, sigma_f2, force_reduce, chunk_size, progress, distributed=d.world > 1)
    if checkpoint is not None and d.rank == 0:
        checkpoint.save("posterior", {"posterior": post}, shared=True)
    return post


def target_scorer(fz: MACEFeaturizer, post: Posterior, target, chunk_size: int = 64):
    """TargetScorer for unlabelled target structures (exact force rows, like the training set)."""
    from .target import TargetScorer, target_matrix
    src = Source.of(target, "target")
    exact = fz if fz.force_probes is None else fz.with_kernel(fz.kernel, None)
    blocks = (exact(c) for c in iter_chunks(_validated(src, fz.atomic_numbers), chunk_size))
    return TargetScorer(post, target_matrix(post, blocks)), src


def annotate(atoms, index: int, score: float, atom_var=None, rank: Optional[int] = None, reduction=None):
    """Copy of a structure with ntkal's keys: info ntkal_score / ntkal_pool_index [/ ntkal_rank /
    ntkal_target_reduction], arrays ntkal_atom_variance."""
    out = atoms.copy()
    out.calc = None
    out.info["ntkal_score"] = float(score)
    if reduction is not None:
        out.info["ntkal_target_reduction"] = float(reduction)
    out.info["ntkal_pool_index"] = int(index)
    if rank is not None:
        out.info["ntkal_rank"] = int(rank)
    if atom_var is not None:
        out.arrays["ntkal_atom_variance"] = np.asarray(atom_var, dtype=np.float64)
    return out


def scan_pool(fz: MACEFeaturizer, post: Posterior, pool, m: int, chunk_size: int = 64, random_budget: int = 0,
              seed: int = 0, progress: bool = False, checkpoint: Optional[Checkpoint] = None,
              on_chunk: Optional[Callable] = None, skip_chunks=frozenset(), scorer=None):
    """Stream the pool through features and scores into a running top-m (and a seeded random reservoir).

    This rank handles chunks c with c % world == rank; the top-m lists of all ranks are merged, so
    every rank returns the same (top, reservoir, n_pool). on_chunk(c, start, atoms, scores, atom_var)
    sees each chunk this rank scored. With a checkpoint, finished chunks are skipped on a rerun
    (as are `skip_chunks`, whose results the caller already has). With a target scorer the shortlist
    is ranked by the expected reduction of the target's variance instead of by PV.
    """
    from tqdm.auto import tqdm
    d = Dist.current()
    src = Source.of(pool, "pool")
    state, done = Shortlist(m, random_budget), -1
    if checkpoint is not None:
        saved = checkpoint.load("scan")
        if saved is not None:
            state, done = Shortlist(m, random_budget, saved["top"], saved["rnd"]), saved["done"]
    bar = tqdm(total=src.total, desc="pool", unit="struct", disable=not (progress and d.rank == 0), smoothing=0.05)
    n_pool = 0
    try:
        for c, chunk in enumerate(iter_chunks(_validated(src, fz.atomic_numbers), chunk_size)):
            start = n_pool
            n_pool += len(chunk)
            bar.update(len(chunk))
            if c <= done or c in skip_chunks or not d.owns(c):
                continue
            rows = fz(chunk)
            scores_t, atom_var = post.score_with_atoms(rows)
            scores = scores_t.numpy()
            red = scorer.reduction(rows).numpy() if scorer is not None else [None] * len(chunk)

            def payload_of(pos):  # only for the rows that can still enter the shortlist or the reservoir
                return [(scores[j], psi, chunk[j], atom_var[j], red[j])
                        for j, psi in zip(pos.tolist(), lcmd_rows(rows, pos, post.psi_scale))]
            state.add(scores if scorer is None else red, np.arange(start, start + len(chunk)), payload_of,
                      np.random.default_rng([seed, c]).random(len(chunk)) if random_budget else None)
            if on_chunk is not None:
                on_chunk(c, start, chunk, scores, atom_var, red)
            done = c
            if checkpoint is not None and checkpoint.due():
                checkpoint.save("scan", {"top": state.top, "rnd": state.rnd, "done": done})
    finally:
        bar.close()
    if n_pool == 0:
        raise InputError("the pool is empty", path=src.path)
    top, rnd = state.top, state.rnd
    if d.world > 1:
        tops, rnds = TopM(m), TopM(random_budget)
        for t, r in d.gather((top, rnd)):
            tops.offer(t.keys, t.index, lambda pos, t=t: [t.payload[i] for i in pos])
            rnds.offer(r.keys, r.index, lambda pos, r=r: [r.payload[i] for i in pos])
        top, rnd = tops, rnds
    return top, rnd, n_pool


def select(model, train, pool, budget: int = 100, kernel: str = "joint", method: str = "lcmd",
           shortlist: Optional[int] = None, seed: int = 0, *, mode: str = "tp", sketch_dim: int = 512,
           params: str = "all", force_probes: Optional[int] = None, sigma_e2: float = 1e-2,
           sigma_f2: float = 1e-2, force_reduce: str = "mean", chunk_size: int = 64, impl: str = "auto",
           dtype=torch.float32, device="cpu", progress: bool = False,
           checkpoint: Optional[Checkpoint] = None, target=None) -> SelectionResult:
    """Pick `budget` pool structures worth labelling (DESIGN §1): features, posterior, PV shortlist, LCMD.

    model: a MACE nn.Module or .model path; train / pool: paths (extxyz, ASE .db), lists or iterators
    of ase.Atoms. Returns a SelectionResult whose .atoms are the picks annotated with ntkal_* keys.
    target: unlabelled structures from where the model will be used; the shortlist is then ranked by
    the expected reduction of their total predictive variance and method "greedy" (sequential
    conditioning) is available and the default.
    """
    if method is None:
        method = "greedy" if target is not None else "lcmd"
    if method == "greedy" and target is None:
        raise InputError("method 'greedy' needs --target (structures where the model will be used)")
    if method not in METHODS + ("greedy",):
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    budget = int(budget)
    if budget < 1:
        raise InputError(f"budget must be at least 1, got {budget}")
    timings = {}
    t0 = time.perf_counter()
    fz = featurizer_for(model, kernel, sketch_dim, params, force_probes, seed, impl, dtype, device)
    timings["load_model"] = time.perf_counter() - t0
    pool_src = Source.of(pool, "pool")
    if pool_src.total is not None:
        if pool_src.total == 0:
            raise InputError("the pool is empty", path=pool_src.path)
        if budget > pool_src.total:
            raise InputError(f"budget {budget} is larger than the pool ({pool_src.total} structures)",
                             path=pool_src.path)
    t = time.perf_counter()
    post = fit_posterior(fz, train, sigma_e2, sigma_f2, force_reduce, chunk_size, progress, checkpoint)
    timings["train_features_and_posterior"] = time.perf_counter() - t
    scorer, info = None, {}
    if target is not None:
        t = time.perf_counter()
        scorer, tsrc = target_scorer(fz, post, target, chunk_size)
        info["target"] = {"path": None if tsrc.path is None else str(tsrc.path),
                          "variance_before": scorer.target_variance()}
        timings["target_features"] = time.perf_counter() - t
    m = max(int(shortlist or default_shortlist(budget)), budget)
    t = time.perf_counter()
    top, rnd, n_pool = scan_pool(fz, post, pool_src, m, chunk_size, budget if method == "random" else 0, seed,
                                 progress, checkpoint, scorer=scorer)
    timings["pool_features_and_scores"] = time.perf_counter() - t
    if budget > n_pool:
        raise InputError(f"budget {budget} is larger than the pool ({n_pool} structures)", path=pool_src.path)
    t = time.perf_counter()
    if method == "greedy":
        pos, red_at_pick = _greedy(fz, post, scorer, top, budget, chunk_size)
        cands, status = top, None
        info["target"]["variance_after"] = info["target"]["variance_before"] - float(np.sum(red_at_pick))
    else:
        pos, cands, status = pick(method, budget, top, rnd, post, mode, seed)
    timings["select"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    picks = [cands.payload[i] for i in pos]
    indices = cands.index[pos]
    atom_vars = [p[3] for p in picks]
    if fz.force_probes is not None and fz.kernel in ("force", "joint"):
        # probe rows have no per-atom split: the B picks get exact force rows for their atom variances
        t = time.perf_counter()
        exact = fz.with_kernel(fz.kernel, None)
        atom_vars = [v for c in iter_chunks([p[2] for p in picks], chunk_size) for v in post.atom_variances(exact(c))]
        timings["exact_atom_variances_of_picks"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
    reds = [p[4] for p in picks] if method != "greedy" else list(red_at_pick)  # greedy: reduction at pick time
    atoms = [annotate(p[2], i, p[0], v, rank, r)
             for rank, (i, p, v, r) in enumerate(zip(indices, picks, atom_vars, reds))]
    info.update({"featurizer": fz.settings(), "posterior": post.summary(), "shortlist_size": len(top),
                 "pool_path": None if pool_src.path is None else str(pool_src.path),
                 "world_size": Dist.current().world})
    return SelectionResult(indices=np.asarray(indices, dtype=np.int64), scores=np.array([p[0] for p in picks]),
                           shortlist=top.index.copy(), shortlist_scores=top.keys.copy(), timings=timings,
                           status=status, n_pool=n_pool, method=method, mode=mode, posterior=post, atoms=atoms,
                           atom_variances=atom_vars, info=info)


def _greedy(fz, post, scorer, top: TopM, budget: int, chunk_size: int):
    """Greedy target-aware picks on the shortlist, on exact rows re-featurised for the M candidates."""
    from .features import RowBlock
    from .target import greedy_select
    exact = fz if fz.force_probes is None else fz.with_kernel(fz.kernel, None)
    atoms = [p[2] for p in top.payload]
    cand = RowBlock.cat([exact(c) for c in iter_chunks(atoms, chunk_size)])
    return greedy_select(post, scorer.C_T, cand, budget)


def score(model, train, pool, kernel: str = "joint", seed: int = 0, *, sketch_dim: int = 512, params: str = "all",
          force_probes: Optional[int] = None, sigma_e2: float = 1e-2, sigma_f2: float = 1e-2,
          force_reduce: str = "mean", chunk_size: int = 64, impl: str = "auto", dtype=torch.float32,
          device="cpu", progress: bool = False) -> Iterator:
    """Every pool structure, in pool order, annotated with its score (a generator: streams any pool size)."""
    fz = featurizer_for(model, kernel, sketch_dim, params, force_probes, seed, impl, dtype, device)
    post = fit_posterior(fz, train, sigma_e2, sigma_f2, force_reduce, chunk_size, progress)
    src = Source.of(pool, "pool")
    n = 0
    for chunk in iter_chunks(_validated(src, fz.atomic_numbers), chunk_size):
        scores, atom_var = post.score_with_atoms(fz(chunk))
        for j, atoms in enumerate(chunk):
            yield annotate(atoms, n + j, float(scores[j]), atom_var[j])
        n += len(chunk)
    if n == 0:
        raise InputError("the pool is empty", path=src.path)
