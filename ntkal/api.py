"""Structure-level entry points: ntkal.select and ntkal.score (structures or files in, picks and scores out)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch

from .errors import InputError
from .features import MACEFeaturizer
from .io import check_structure, count_structures, iter_chunks, read_structures
from .posterior import Posterior
from .select import METHODS, MODES, SelectionResult, TopM, default_shortlist, pick


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


def featurizer_for(model, kernel="joint", sketch_dim=512, params="all", force_probes=None, seed=0,
                   impl="auto", dtype=torch.float32, device="cpu") -> MACEFeaturizer:
    return MACEFeaturizer(model, kernel=kernel, sketch_dim=sketch_dim, params=params, force_probes=force_probes,
                          seed=seed, impl=impl, dtype=dtype, device=device)


def fit_posterior(fz: MACEFeaturizer, train, sigma_e2=1e-2, sigma_f2=1e-2, force_reduce="mean",
                  chunk_size=64, progress=False) -> Posterior:
    """Validate the training structures and fit the posterior (exact force rows)."""
    src = Source.of(train, "train")
    atoms = list(_validated(src, fz.atomic_numbers))
    if not atoms:
        raise InputError("the training set is empty", path=src.path)
    return Posterior.fit(fz, atoms, sigma_e2, sigma_f2, force_reduce, chunk_size, progress)


def scored_chunks(fz: MACEFeaturizer, post: Posterior, pool, chunk_size=64, progress=False, desc="pool"):
    """Stream the pool: yields (start index, atoms, scores, per-atom variances, rows) per chunk."""
    from tqdm.auto import tqdm
    src = Source.of(pool, "pool")
    bar = tqdm(total=src.total, desc=desc, unit="struct", disable=not progress, smoothing=0.1)
    start = 0
    try:
        for chunk in iter_chunks(_validated(src, fz.atomic_numbers), chunk_size):
            rows = fz(chunk)
            scores, atom_var = post.score_with_atoms(rows)
            yield start, chunk, scores.numpy(), atom_var, rows
            start += len(chunk)
            bar.update(len(chunk))
    finally:
        bar.close()
    if start == 0:
        raise InputError("the pool is empty", path=src.path)


def annotate(atoms, index: int, score: float, atom_var=None, rank: Optional[int] = None):
    """Copy of a structure with ntkal's keys: info ntkal_score / ntkal_pool_index [/ ntkal_rank], arrays ntkal_atom_variance."""
    out = atoms.copy()
    out.calc = None
    out.info["ntkal_score"] = float(score)
    out.info["ntkal_pool_index"] = int(index)
    if rank is not None:
        out.info["ntkal_rank"] = int(rank)
    if atom_var is not None:
        out.arrays["ntkal_atom_variance"] = np.asarray(atom_var, dtype=np.float64)
    return out


def select(model, train, pool, budget: int = 100, kernel: str = "joint", method: str = "lcmd",
           shortlist: Optional[int] = None, seed: int = 0, *, mode: str = "tp", sketch_dim: int = 512,
           params: str = "all", force_probes: Optional[int] = None, sigma_e2: float = 1e-2,
           sigma_f2: float = 1e-2, force_reduce: str = "mean", chunk_size: int = 64, impl: str = "auto",
           dtype=torch.float32, device="cpu", progress: bool = False) -> SelectionResult:
    """Pick `budget` pool structures worth labelling (DESIGN §1): features, posterior, PV shortlist, LCMD.

    model: a MACE nn.Module or .model path; train / pool: paths (extxyz, ASE .db), lists or iterators
    of ase.Atoms. Returns a SelectionResult whose .atoms are the picks annotated with ntkal_* keys.
    """
    if method not in METHODS:
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
    post = fit_posterior(fz, train, sigma_e2, sigma_f2, force_reduce, chunk_size, progress)
    timings["train_features_and_posterior"] = time.perf_counter() - t
    m = max(int(shortlist or default_shortlist(budget)), budget)
    top = TopM(m)
    rnd = TopM(budget) if method == "random" else None
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    n_pool = 0
    for start, chunk, scores, atom_var, rows in scored_chunks(fz, post, pool_src, chunk_size, progress):
        idx = np.arange(start, start + len(chunk))
        psi = rows.psi.detach().cpu().to(torch.float64) * post.psi_scale
        payload = list(zip(scores, psi, chunk, atom_var))
        top.add(scores, idx, payload)
        if rnd is not None:
            rnd.add(rng.random(len(chunk)), idx, payload)
        n_pool = start + len(chunk)
    timings["pool_features_and_scores"] = time.perf_counter() - t
    if budget > n_pool:
        raise InputError(f"budget {budget} is larger than the pool ({n_pool} structures)", path=pool_src.path)
    t = time.perf_counter()
    pos, cands, status = pick(method, budget, top, rnd, post, mode, seed)
    timings["select"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    picks = [cands.payload[i] for i in pos]
    indices = cands.index[pos]
    atoms = [annotate(p[2], i, p[0], p[3], rank) for rank, (i, p) in enumerate(zip(indices, picks))]
    info = {"featurizer": fz.settings(), "posterior": post.summary(), "shortlist_size": len(top),
            "pool_path": None if pool_src.path is None else str(pool_src.path)}
    return SelectionResult(indices=np.asarray(indices, dtype=np.int64), scores=np.array([p[0] for p in picks]),
                           shortlist=top.index.copy(), shortlist_scores=top.keys.copy(), timings=timings,
                           status=status, n_pool=n_pool, method=method, mode=mode, posterior=post, atoms=atoms,
                           atom_variances=[p[3] for p in picks], info=info)


def score(model, train, pool, kernel: str = "joint", seed: int = 0, *, sketch_dim: int = 512, params: str = "all",
          force_probes: Optional[int] = None, sigma_e2: float = 1e-2, sigma_f2: float = 1e-2,
          force_reduce: str = "mean", chunk_size: int = 64, impl: str = "auto", dtype=torch.float32,
          device="cpu", progress: bool = False) -> Iterator:
    """Every pool structure, in pool order, annotated with its score (a generator: streams any pool size)."""
    fz = featurizer_for(model, kernel, sketch_dim, params, force_probes, seed, impl, dtype, device)
    post = fit_posterior(fz, train, sigma_e2, sigma_f2, force_reduce, chunk_size, progress)
    for start, chunk, scores, atom_var, _ in scored_chunks(fz, post, pool, chunk_size, progress):
        for j, atoms in enumerate(chunk):
            yield annotate(atoms, start + j, scores[j], atom_var[j])
