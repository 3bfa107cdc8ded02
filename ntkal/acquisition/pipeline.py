"""The one acquisition pipeline every entry point uses (docs/design.md, "Pipeline").

fit: featurise the labelled (and pretraining) structures, or take precomputed RowBlocks, into an Accumulator
and the LCMD centres -> Posterior; scan: score the pool chunk by chunk with a scorer into a running shortlist
of Candidate records; select: a selector picks B. `ntkal.select`, `ntkal.score`, `ntkal.select_rows`, the
CLI, torchrun sharding and checkpoints all run through `Pipeline`. Options are validated before it is built.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from ..errors import InputError
from ..features.rowblock import RowBlock
from ..options import Options
from ..posterior import Accumulator, Posterior
from ..runstate import Checkpoint, Dist
from . import scorers
from .candidates import Candidate, Shortlist, annotate
from .centres import Centres
from .residuals import labels, residual_rows
from .selectors import SELECTORS, SelectContext
from .streams import Stream, chunks
from .target import TargetScorer, greedy_select, target_matrix

log = logging.getLogger("ntkal")


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
    picks: List[Candidate] = field(default_factory=list)
    atoms: Optional[list] = None
    info: dict = field(default_factory=dict)
    centres: Optional[Centres] = None

    @property
    def atom_variances(self):
        return [c.atom_values.get("atom_variance") for c in self.picks]


def featurizer_for(model, opts: Options):
    from ..features import MACEFeaturizer
    return MACEFeaturizer(model, kernel=opts.kernel, sketch_dim=opts.sketch_dim, params=opts.params,
                          force_probes=opts.force_probes, seed=opts.seed, impl=opts.impl,
                          dtype=getattr(torch, opts.dtype), device=opts.device, head=opts.head,
                          memory_gb=opts.memory_gb)


class Pipeline:
    """One run: options, the featurizer (None for precomputed rows), progress, checkpoint, ranks."""

    def __init__(self, opts: Options, featurizer=None, progress: bool = False,
                 checkpoint: Optional[Checkpoint] = None, exact_rows: Optional[Callable] = None):
        self.opts, self.fz, self.progress, self.ckpt = opts, featurizer, progress, checkpoint
        self.dist = Dist.current()
        self.exact_rows = exact_rows  # row-level runs: pool indices -> exact RowBlock (greedy, atom variances)
        self.timings: Dict[str, float] = {}
        self.score = opts.score  # resolved by fit() when opts.score is None
        self.centres: Optional[Centres] = None  # LCMD's training centres, made by fit()

    # --- featurising ------------------------------------------------------------------------------
    def _exact(self, probes=None):
        """The featurizer with exact force rows (or `probes` probe rows)."""
        fz = self.fz
        return fz if fz.force_probes == probes else fz.with_kernel(fz.kernel, probes)

    def _chunks(self, src: Stream, labels: bool = False):
        """streams.chunks with this run's chunk size, structures checked against the model's elements (and
        with `labels`, their labels finite: labelled and pretraining sets)."""
        known = set(self.fz.atomic_numbers) if self.fz is not None else None
        return chunks(src, self.opts.chunk(), known, labels)

    def _bar(self, total, desc):
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit="struct", smoothing=0.05,
                    disable=not (self.progress and self.dist.rank == 0))

    # --- posterior --------------------------------------------------------------------------------
    def fit(self, train, pretrain=None, residuals=None) -> Posterior:
        """Fit the posterior on the labelled structures (exact force rows, or --train-force-probes; sharded over
        ranks) and a pretraining sample (pool featurisation, labels optional). With --score error, the labelled
        residuals (label − model prediction) fit the residual model too: computed with the model's
        predictions, or given per chunk for precomputed rows (residuals = {"train": [...], "pretrain": [...]}).
        The labelled chunks' LCMD vectors make self.centres."""
        saved = self._restore("posterior", lambda s: (s["score"], Centres.from_state(s["centres"]),
                                                      Posterior.from_state(s["posterior"])), shared=True)
        if saved is not None:
            self.score, self.centres, post = saved
            self._say_fallback(post)
            return post
        t = time.perf_counter()
        acc = Accumulator(self.opts.force_reduce)
        centre_parts = []  # Centres.chunk of the labelled chunks this rank featurises
        need = self.opts.score != "pv"
        n_labelled, unlabelled = 0, 0  # labelled structures; those of them without labels
        for what, stream in (("train", train), ("pretrain", pretrain)):
            if stream is None:
                continue
            src = Stream.of(stream, what)
            labelled = what == "train"
            fz = None if src.rows else (self._exact(self.opts.train_force_probes) if labelled else self.fz)
            given = (residuals or {}).get(what)
            given = None if given is None else iter(given)
            bar = self._bar(src.total, f"{what} features")
            for c, start, chunk in self._chunks(src, labels=True):
                res = next(given) if given is not None else None
                if self.dist.owns(c):
                    rows = chunk if fz is None else fz(chunk)
                    if need and fz is not None:
                        e, f = fz.predict(chunk)
                        res = residual_rows(rows, chunk, e, f, lambda a, fz=fz: fz.probe_vectors(a, fz.force_probes),
                                            required=labelled and self.opts.score == "error", path=src.path,
                                            start=start)
                        unlabelled += sum(labels(a) is None for a in chunk) if labelled else 0
                    acc.add(rows, start, res, labelled)
                    if labelled and len(rows):
                        centre_parts.append(Centres.chunk(rows, start, self.opts.seed))
                n_labelled += len(chunk) if labelled else 0
                bar.update(len(chunk))
            bar.close()
            if labelled and n_labelled == 0:
                raise InputError("the training set is empty", path=src.path)
        if self.dist.world > 1:
            shards = self.dist.gather((acc, centre_parts, unlabelled))
            acc = shards[0][0].merge([a for a, _, _ in shards[1:]])
            centre_parts = [part for _, parts, _ in shards for part in parts]
            unlabelled = sum(u for _, _, u in shards)
        fallback = None
        if self.opts.score is None:  # auto: the error-aware score when every training structure is labelled
            self.score = "error" if need and acc.res and not unlabelled else "pv"
            if self.score == "pv":
                fallback = (f"{unlabelled} of {n_labelled} labelled structures have no REF_energy/REF_forces labels"
                            if unlabelled else "no residuals of the labelled rows were given")
                fallback += ": the score is posterior variance (pv), not the model's expected error"
                acc.drop_residuals()
        elif need and not acc.res:
            raise InputError("--score error needs residuals of the labelled structures (labels, or train_residuals)")
        post = Posterior.from_accumulator(acc, self.opts.sigma_e2, self.opts.sigma_f2)
        self.centres = Centres.from_chunks(centre_parts, self.opts.seed)
        if self.fz is not None:
            post.info["featurizer"] = self.fz.settings()
        if fallback is not None:
            post.info["score_fallback"] = fallback
        self._say_fallback(post)
        if self.ckpt is not None and self.dist.rank == 0:
            self.ckpt.save("posterior", {"posterior": post.to_state(), "centres": self.centres.to_state(),
                                         "score": self.score}, shared=True)
        self.timings["train_features_and_posterior"] = time.perf_counter() - t
        return post

    def _restore(self, name: str, build: Callable, shared: bool = False):
        """build(the checkpoint's state `name`), or None when there is none or it is not one this version
        reads (then that work is done again)."""
        state = None if self.ckpt is None else self.ckpt.load(name, shared=shared)
        if state is None:
            return None
        try:
            return build(state)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("checkpoint state %s cannot be read by this version (%s); redoing that work", name, exc)
            return None

    def _say_fallback(self, post: Posterior):
        """The default score fell back to posterior variance: say so (docs/design.md, "Options")."""
        if "score_fallback" in post.info and self.dist.rank == 0:
            log.warning("%s", post.info["score_fallback"])

    def use(self, saved) -> Posterior:
        """Start from a saved posterior (ntkal.saved.SavedPosterior) instead of fit(): its posterior, LCMD centres
        and score (--score pv may be asked of an error-score one). The featurizer, if any, must make the rows it
        was fitted on (same weights, kernel, sketch; saved.check raises InputError otherwise)."""
        if self.fz is not None:
            saved.check(self.fz)
        score = self.opts.score or saved.score
        if score == "error" and saved.posterior.residual is None:
            raise InputError("--score error: the saved posterior was fitted without labelled residuals (score pv)")
        self.score, self.centres = score, saved.centres
        self._say_fallback(saved.posterior)
        return saved.posterior

    # --- scoring ----------------------------------------------------------------------------------
    def scorer(self, post: Posterior, target=None):
        """The scorer of --score, or the target scorer with --target."""
        if target is None:
            return scorers.ErrorScorer(post) if self.score == "error" else scorers.PVScorer(post)
        t = time.perf_counter()
        src = Stream.of(target, "target")
        featurise = None if src.rows else self._exact()
        blocks = (chunk if featurise is None else featurise(chunk) for _, _, chunk in self._chunks(src))
        out = TargetScorer(post, target_matrix(post, blocks))
        self.timings["target_features"] = time.perf_counter() - t
        return out

    def scored_chunks(self, pool, scorer, skip=frozenset(), done: int = -1):
        """(chunk number, first index, atoms or None, rows, Scored) for every chunk this rank owns; the pool
        count is in self.n_pool when the generator ends (every rank counts every chunk)."""
        src = Stream.of(pool, "pool")
        self.n_pool = 0
        bar = self._bar(src.total, "pool")
        try:
            for c, start, chunk in self._chunks(src):
                self.n_pool = start + len(chunk)
                bar.update(len(chunk))
                if c <= done or c in skip or not self.dist.owns(c):
                    continue
                rows = chunk if src.rows else self.fz(chunk)
                yield c, start, None if src.rows else chunk, rows, scorer(rows)
        finally:
            bar.close()
        if self.n_pool == 0:
            raise InputError("the pool is empty", path=src.path)

    def scan(self, pool, post: Posterior, scorer, m: int, n_random: int = 0, on_chunk=None, skip=frozenset(),
             centres: Optional[Centres] = None):
        """Stream the pool into the shortlist (top-m by key) and a seeded reservoir of n_random; merged over ranks.
        Candidates carry their LCMD vectors in the map of `centres` (default: those fit() made)."""
        centres = self.centres if centres is None else centres
        if centres is None:
            raise ValueError("scan needs the LCMD centres: run fit() first or pass centres")
        linv = post.Linv if self.opts.mode == "p" else None  # P mode: vectors of L⁻¹g
        t = time.perf_counter()
        state, done = Shortlist(m, n_random, self.opts.seed), -1
        saved = self._restore("scan", lambda s: (Shortlist.from_state(s["state"]), int(s["done"])))
        if saved is not None:
            state, done = saved
        for c, start, atoms, rows, scored in self.scored_chunks(pool, scorer, skip, done):
            def build(pos):  # LCMD vectors only for the rows entering a list (psi is per structure)
                psi = centres.vectors(rows.select(pos), linv)
                return [Candidate(start + j, float(scored.key[j]), psi[i].clone(), None if atoms is None else atoms[j],
                                  {n: float(v[j]) for n, v in scored.values.items()},
                                  {n: v[j] for n, v in scored.atom_values.items()}) for i, j in enumerate(pos.tolist())]
            state.add(scored.key, start, build)
            if on_chunk is not None:
                on_chunk(c, start, atoms, scored)
            done = c
            if self.ckpt is not None and self.ckpt.due():
                self.ckpt.save("scan", {"state": state.to_state(), "done": done})
        if self.dist.world > 1:
            shards = self.dist.gather(state)
            state = shards[0].merge(shards[1:])
        self.timings["pool_features_and_scores"] = time.perf_counter() - t
        return state, self.n_pool

    # --- selection --------------------------------------------------------------------------------
    def select(self, train, pool, target=None, scorer=None, on_chunk=None, pretrain=None,
               residuals=None, posterior=None) -> SelectionResult:
        """Pick opts.budget pool structures: fit (or use a saved `posterior`), scan, select; picks annotated when
        structures are given."""
        opts, t0 = self.opts, time.perf_counter()
        src = Stream.of(pool, "pool")
        if src.total is not None and opts.budget > src.total:
            raise InputError(f"budget {opts.budget} is larger than the pool ({src.total} structures)"
                             if src.total else "the pool is empty", path=src.path)
        post = self.fit(train, pretrain, residuals) if posterior is None else self.use(posterior)
        if scorer is not None and not hasattr(scorer, "name"):  # a factory: posterior -> scorer
            scorer = scorer(post)
        scorer = scorer or self.scorer(post, target)
        selector = SELECTORS[opts.method]
        state, n_pool = self.scan(src, post, scorer, opts.m, opts.budget if selector.uses == "reservoir" else 0,
                                  on_chunk)
        if opts.budget > n_pool:
            raise InputError(f"budget {opts.budget} is larger than the pool ({n_pool} structures)", path=src.path)
        t = time.perf_counter()
        cands = (state.top if selector.uses == "shortlist" else state.rnd).payload
        ctx = SelectContext(self.centres, opts.mode, opts.seed, greedy=self._greedy(post, scorer))
        pos, status = selector.pick(cands, opts.budget, ctx)
        picks = [cands[i] for i in pos]
        self.timings["select"] = time.perf_counter() - t
        self._exact_atom_values(scorer, picks)
        self.timings["total"] = time.perf_counter() - t0
        atoms = [annotate(c, r) for r, c in enumerate(picks)] if picks and picks[0].atoms is not None else None
        info = {"shortlist_size": len(state.top), "world_size": self.dist.world, "score": scorer.name,
                "pool_path": None if src.path is None else str(src.path)}
        if self.fz is not None:
            info["featurizer"] = self.fz.settings()
        if "score_fallback" in post.info:
            info["score_fallback"] = post.info["score_fallback"]
        if isinstance(scorer, TargetScorer):
            before = scorer.target_variance()
            reds = [c.values["target_reduction"] for c in picks]
            info["target"] = {"variance_before": before, "variance_after": before - float(np.sum(reds))}
        return SelectionResult(
            indices=np.asarray([c.index for c in picks], dtype=np.int64),
            scores=np.asarray([c.values.get("score", c.key) for c in picks], dtype=np.float64),
            shortlist=state.top.index.copy(), shortlist_scores=state.top.keys.copy(), timings=dict(self.timings),
            status=status, n_pool=n_pool, method=opts.method, mode=opts.mode, posterior=post, picks=picks,
            atoms=atoms, info=info, centres=self.centres)

    def _rows_of(self, cands: List[Candidate]) -> Optional[RowBlock]:
        """Exact feature rows of candidates: re-featurised structures, or the caller's exact_rows; rows made
        for the shortlist (greedy) are reused for the picks."""
        done = getattr(self, "_exact_done", {})
        if done and all(c.index in done for c in cands):
            return self._exact_block.select([done[c.index] for c in cands])
        if cands and cands[0].atoms is not None and self.fz is not None:
            from ..io import iter_chunks
            exact = self._exact()
            block = RowBlock.cat([exact(c) for c in iter_chunks([c.atoms for c in cands], self.opts.chunk())])
        elif self.exact_rows is not None:
            block = self.exact_rows([c.index for c in cands])
        else:
            return None
        self._exact_done, self._exact_block = {c.index: j for j, c in enumerate(cands)}, block
        return block

    def _greedy(self, post, scorer):
        """Target-aware sequential picks on the shortlist's exact rows; each pick's reduction at pick time."""
        def pick(cands, budget):
            if not isinstance(scorer, TargetScorer):
                raise InputError("--method greedy needs --target (structures where the model will be used)")
            pos, reds = greedy_select(post, scorer.C_T, self._rows_of(cands), budget)
            for j, r in zip(pos, reds):
                cands[j].values["target_reduction"] = float(r)
            return pos, None
        return pick

    def _exact_atom_values(self, scorer, picks):
        """Probe rows have no per-atom split: the B picks are scored again on exact force rows for their
        per-atom values (force variance, force error)."""
        fz = self.fz
        if fz is None or fz.force_probes is None or fz.kernel not in ("force", "joint") or not picks:
            return
        t = time.perf_counter()
        rows = self._rows_of(picks)
        scored = (scorers.PVScorer(scorer.post) if isinstance(scorer, TargetScorer) else scorer)(rows)
        for j, c in enumerate(picks):
            c.atom_values.update({n: v[j] for n, v in scored.atom_values.items()})
        self.timings["exact_atom_values_of_picks"] = time.perf_counter() - t
