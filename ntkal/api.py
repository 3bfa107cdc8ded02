"""Python entry points: ntkal.select, ntkal.score, ntkal.fit (out=: a saved posterior), ntkal.load_posterior,
ntkal.select_rows — thin calls into the one pipeline.

Keyword options are those of `ntkal.options.Options` (the CLI's flags with underscores) and are
checked before any model is loaded; a bad value is an InputError naming the flag.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

from .acquisition.candidates import Candidate, annotate
from .acquisition.pipeline import Pipeline, SelectionResult, featurizer_for
from .acquisition.streams import Stream
from .options import Options


def select(model, train=None, pool=None, budget: int = 100, *, target=None, pretrain=None, posterior=None,
           progress: bool = False, checkpoint=None, **options) -> SelectionResult:
    """Pick `budget` pool structures worth labelling: features, posterior, scored shortlist, selector.

    model: a MACE nn.Module or .model path; train / pool / target: paths (extxyz, ASE .db), lists or
    iterators of ase.Atoms. Returns a SelectionResult whose .atoms are the picks annotated with ntkal_* keys.
    target: unlabelled structures from where the model will be used; the shortlist is then ranked by the
    expected reduction of their total predictive variance and the default method is "greedy".
    pretrain: a sample of the structures the model was trained on (labels optional): it enters the
    posterior so that what the model already knows is not novel.
    posterior: a saved posterior (a .ntkal path from ntkal.fit(..., out=...) / `ntkal fit`, or a SavedPosterior)
    used instead of fitting on train/pretrain; the feature options are then its own.
    """
    opts, saved = _options(options, train, pretrain, posterior, target, budget=budget)
    return Pipeline(opts, featurizer_for(model, opts), progress, checkpoint).select(train, pool, target,
                                                                                    pretrain=pretrain, posterior=saved)


def score(model, train=None, pool=None, *, target=None, pretrain=None, posterior=None, progress: bool = False,
          **options) -> Iterator:
    """Every pool structure, in pool order, annotated with its score (a generator: streams any pool size).
    posterior: a saved posterior instead of train/pretrain, as for select."""
    opts, saved = _options(options, train, pretrain, posterior, target)
    pipe = Pipeline(opts, featurizer_for(model, opts), progress)
    post = pipe.fit(train, pretrain) if saved is None else pipe.use(saved)
    for _, start, atoms, _, scored in pipe.scored_chunks(pool, pipe.scorer(post, target)):
        yield from scored_atoms(start, atoms, scored)


def fit(model, train, *, pretrain=None, progress: bool = False, out=None, **options):
    """The posterior (ntkal.Posterior) of the labelled structures `train`, as select and score fit it.

    model: a MACE nn.Module or .model path, or a MACEFeaturizer, used as it is (its kernel, sketch and probes;
    the feature options are then not taken from `options`). Score its rows with post.score(fz(structures)).
    out: also save it there (a name ending in .ntkal; ntkal.saved): `posterior=out` of select and score, and
    ntkal.load_posterior(out, model), then use it without fitting again."""
    from .features import MACEFeaturizer
    opts = Options.from_kwargs(**options).validate()
    inputs = [x for x in (model, train, pretrain) if isinstance(x, (str, os.PathLike))]
    if out is not None:
        from .saved import check_out
        check_out(out, inputs)
    fz = model if isinstance(model, MACEFeaturizer) else featurizer_for(model, opts)
    pipe = Pipeline(opts, fz, progress)
    post = pipe.fit(train, pretrain)
    if out is not None:
        from .saved import build, save
        save(out, build(pipe, post, {"model": model, "train": train, "pretrain": pretrain}), inputs)
    return post


def load_posterior(path, model=None):
    """The SavedPosterior in `path` (ntkal.saved.load: format and digest checked, nothing unpickled), checked
    against `model` (a .model path, nn.Module or MACEFeaturizer) when given. InputError (one line) otherwise."""
    from .saved import load
    return load(path, model=model)


def _options(kwargs: dict, train, pretrain, posterior, target, **fixed):
    """(Options, SavedPosterior or None): keyword options checked; with a saved posterior, the options its fit
    fixed come from it (one given with another value is an InputError naming the flag)."""
    from .saved import resolve
    kwargs, saved = resolve(posterior, kwargs, train, pretrain)
    if saved is None and train is None:
        raise TypeError("train (labelled structures) or posterior (a saved posterior) is required")
    return Options.from_kwargs(**{**kwargs, **fixed}).validate(target=target is not None), saved


def scored_atoms(start: int, atoms, scored):
    """The chunk's structures annotated with the scorer's values."""
    for j, a in enumerate(atoms):
        yield annotate(Candidate(start + j, float(scored.key[j]), None, a,
                                 {n: float(v[j]) for n, v in scored.values.items()},
                                 {n: v[j] for n, v in scored.atom_values.items()}))


def select_rows(train_rows, pool_rows, budget: int, method: str = "lcmd", shortlist: Optional[int] = None,
                sigma_e2: float = 1e-2, sigma_f2: float = 1e-2, force_reduce: str = "mean", mode: str = "tp",
                seed: int = 0, target_rows=None, scorer=None, exact_rows=None, on_chunk=None, score: str = "pv",
                train_residuals=None, pretrain_rows=None, pretrain_residuals=None) -> SelectionResult:
    """Row-level selection (any MLIP, precomputed features): posterior from train rows, scored pool chunks, pick B.

    pool_rows: a RowBlock or an iterable of RowBlock chunks. target_rows: rows of a target sample (ranks by
    expected target-variance reduction); scorer: a scorer object, or a function posterior -> scorer (default:
    the `score` option's, or target reduction);
    exact_rows(indices) -> RowBlock gives exact rows of pool structures (greedy picks, atom variances);
    on_chunk(c, start, atoms, scored) sees every scored chunk. score="error" needs train_residuals (float64
    per train row, label − prediction; a tensor for one RowBlock or one per chunk); pretrain_rows (and
    pretrain_residuals) enter the posterior as a pretraining sample.
    """
    opts = Options(budget=budget, method=method, shortlist=shortlist, sigma_e2=sigma_e2, sigma_f2=sigma_f2,
                   force_reduce=force_reduce, mode=mode, seed=seed, score=score).validate(target=target_rows is not None)
    target = None if target_rows is None else Stream.of(target_rows, "target")
    pretrain = None if pretrain_rows is None else Stream.of(pretrain_rows, "pretrain")
    residuals = {k: [v] if hasattr(v, "shape") else list(v)  # one tensor for one RowBlock, or one per chunk
                 for k, v in (("train", train_residuals), ("pretrain", pretrain_residuals)) if v is not None}
    return Pipeline(opts, exact_rows=exact_rows).select(Stream.of(train_rows, "train"), Stream.of(pool_rows, "pool"),
                                                        target, scorer, on_chunk, pretrain, residuals)
