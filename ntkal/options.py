"""Every setting of a selection run, its default, its flag, and its check: defined once.

The CLI builds its parser from ``FIELDS`` and the Python API passes keyword arguments to
``Options``; both are checked by ``Options.validate`` before any model is loaded or any file is
written, and every error names the flag (``--sketch-dim``), so a shell user and a Python user read
the same message (docs/design.md, "Options").
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from .errors import InputError

KERNELS = ("embedding", "energy", "force", "joint")
METHODS = ("lcmd", "top", "random", "greedy")
MODES = ("tp", "p")
SCORES = ("pv", "error")
PARAM_SETS = ("readout", "last", "all")
FORCE_REDUCE = ("mean", "sum")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float64")
IMPLS = ("auto", "fast", "reference")
SKETCH_DIM = 512
SIGMA2 = 1e-2
CHUNK_SIZE = 64


def default_shortlist(budget: int) -> int:
    """M = 3 B. Measured on biased pools (bench/RESULTS.md, acquisition): a shortlist of 2-3 B gave the
    highest error on the picks for the NTK scores; the whole pool (the earlier max(10 B, 2000) on pools
    below 2,000) left the choice to LCMD alone, and M = B (no diversity) was lower on most datasets."""
    return 3 * int(budget)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class Options:
    """The settings of one select / score run (files are separate: see ntkal.acquisition.pipeline)."""

    budget: int = 100
    kernel: str = "joint"
    score: Optional[str] = None         # None: error when the training structures are labelled, else pv
    method: Optional[str] = None        # None: lcmd, or greedy with a target
    mode: str = "tp"
    shortlist: Optional[int] = None     # None: default_shortlist(budget)
    sketch_dim: int = SKETCH_DIM
    params: str = "all"
    force_probes: Optional[int] = None
    train_force_probes: Optional[int] = None  # None: exact 3N force rows for the labelled set
    sigma_e2: float = SIGMA2
    sigma_f2: float = SIGMA2
    force_reduce: str = "mean"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    impl: str = "auto"
    head: Optional[str] = None          # multi-head models: None = the fine-tuned head (not pt_head)
    chunk_size: int = CHUNK_SIZE
    memory_gb: Optional[float] = None
    threads: int = 1
    checkpoint_every: float = 60.0

    def validate(self, target: bool = False) -> "Options":
        """Raise InputError naming the flag of the first bad setting; fill the derived defaults."""
        for name, allowed in CHOICES.items():
            v = getattr(self, name)
            if v not in allowed and not (v is None and name in ("score", "method")):  # None: derived default
                _bad(name, f"must be one of {', '.join(allowed)}, got {v!r}")
        optional = ("force_probes", "train_force_probes", "shortlist")
        for name in ("budget", "sketch_dim", "chunk_size", "threads", "seed") + optional:
            if getattr(self, name) is not None or name not in optional:
                _integer(self, name, None if name == "seed" else 1)
        for name in ("sigma_e2", "sigma_f2", "memory_gb"):
            if getattr(self, name) is not None:
                _positive(self, name)
        if not (_number(self.checkpoint_every) and self.checkpoint_every >= 0):
            _bad("checkpoint_every", f"must be a number of seconds >= 0, got {self.checkpoint_every!r}")
        if self.method is None:
            self.method = "greedy" if target else "lcmd"
        if self.method == "greedy" and not target:
            raise InputError("--method greedy needs --target (structures where the model will be used)")
        if self.shortlist is not None and self.shortlist < self.budget:
            _bad("shortlist", f"({self.shortlist}) must be at least --budget ({self.budget})")
        return self

    @property
    def m(self) -> int:
        """Shortlist size."""
        return self.shortlist if self.shortlist is not None else default_shortlist(self.budget)

    def chunk(self) -> int:
        """Structures per pool chunk: --chunk-size, or sized from --memory-gb (feature rows x k x fp32 x copies)."""
        if self.memory_gb is None:
            return self.chunk_size
        per_structure = 64 * self.sketch_dim * 4 * 8 + 64 * 1024
        return int(min(4096, max(8, self.memory_gb * 2 ** 30 * 0.25 // per_structure)))

    @classmethod
    def from_kwargs(cls, **kwargs) -> "Options":
        """Options from keyword arguments; an unknown name is a TypeError, as for a Python function."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown option {unknown[0]!r} (known: {', '.join(sorted(names))})")
        return cls(**kwargs)

    def key(self) -> dict:
        """The settings a result depends on (for checkpoints): not threads, timing or chunk memory."""
        out = dataclasses.asdict(self)
        for name in ("threads", "checkpoint_every", "memory_gb"):
            out.pop(name)
        out["chunk_size"] = self.chunk()
        return out


def _bad(name: str, what: str):
    raise InputError(f"{flag(name)} {what}")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(opts: Options, name: str, lo: Optional[int]):
    v = getattr(opts, name)
    if isinstance(v, bool) or not isinstance(v, int):
        _bad(name, f"must be an integer, got {v!r}")
    if lo is not None and v < lo:
        _bad(name, f"must be at least {lo}, got {v}")


def _positive(opts: Options, name: str):
    v = getattr(opts, name)
    if not (_number(v) and v > 0):
        _bad(name, f"must be a positive number, got {v!r}")


# Help text and CLI type of each option; argparse choices come from the tuples above.
HELP = {
    "budget": "number of structures to pick",
    "kernel": "feature map (default joint: energy + force NTK rows)",
    "score": "what ranks the pool: error = the model's expected error (posterior mean of the labelled "
             "residuals + calibrated variance, in meV/atom and meV/A; default when the training structures have "
             "REF_energy/REF_forces labels); pv = posterior variance (novelty relative to the labelled set, the "
             "paper's score; default otherwise)",
    "method": "lcmd: diverse batch from the shortlist (default without --target); top: highest score; random; "
              "greedy: sequential target-variance reduction (default with --target)",
    "mode": "LCMD centres: training set + picks (tp, default) or picks in posterior space (p)",
    "shortlist": "shortlist size M from which the selector picks (default 3 B)",
    "sketch_dim": f"sketch dimension k (default {SKETCH_DIM})",
    "params": "parameters in the NTK (default all)",
    "force_probes": "Rademacher probes per structure for pool force rows (default: exact 3N rows)",
    "train_force_probes": "Rademacher probes for the labelled set's force rows (default: exact 3N rows): cost linear "
                          "in the atoms instead of quadratic; the precision and residual sums stay unbiased",
    "sigma_e2": "energy noise variance after scaling",
    "sigma_f2": "force noise variance after scaling",
    "force_reduce": "combine a structure's force variances by mean (default) or sum over atoms",
    "seed": "sketch, probe and tie-break seed",
    "device": "where the model runs",
    "dtype": "feature dtype",
    "impl": "featurizer path (auto: the fast batched path where it has a rule for every layer)",
    "head": "head of a multi-head model (default: the fine-tuned head, i.e. not pt_head)",
    "chunk_size": "structures per featurisation chunk",
    "memory_gb": "peak-memory budget in GB: pool chunks and every featurisation batch are sized to fit it",
    "threads": "torch intra-op threads (default 1: the per-structure ops are small; use torchrun for more cores)",
    "checkpoint_every": "seconds between checkpoints of the pool scan (rerun the same command to resume)",
}
CHOICES = {"kernel": KERNELS, "score": SCORES, "method": METHODS, "mode": MODES, "params": PARAM_SETS,
           "force_reduce": FORCE_REDUCE, "device": DEVICES, "dtype": DTYPES, "impl": IMPLS}


def add_arguments(parser, skip=(), defaults=None):
    """One argparse option per Options field (type from the default, choices from CHOICES)."""
    defaults = defaults or {}
    types = {"shortlist": int, "force_probes": int, "train_force_probes": int, "memory_gb": float, "method": str, "score": str, "head": str}
    for f in dataclasses.fields(Options):
        if f.name in skip:
            continue
        default = defaults.get(f.name, f.default)
        kind = types.get(f.name, type(f.default))
        help_text = HELP[f.name] + ("" if default is None or "default" in HELP[f.name] else f" (default {default})")
        parser.add_argument(flag(f.name), dest=f.name, type=kind, default=default, choices=CHOICES.get(f.name),
                            help=help_text)
