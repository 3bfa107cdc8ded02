"""The Posterior: the precision, its residual model (when the labelled rows had residuals) and the run's
notes, built from an Accumulator and kept as plain state (checkpoints; a saved posterior)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

from ..errors import NtkalError
from ..features.rowblock import RowBlock
from ..options import SIGMA2
from .precision import Accumulator, Precision
from .residual import Predictive, ResidualModel

STATE_FORMAT = "ntkal.Posterior/1"


@dataclass
class Posterior(Precision):
    """Λ with its factor, scales and noise levels (Precision) and, with labelled residuals, the residual model
    of the error-aware score (docs/design.md, "Posterior", "Error-aware score")."""

    residual: Optional[ResidualModel] = None
    info: dict = field(default_factory=dict)  # plain notes for the report (featurizer settings, score_fallback)

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
        """The precision and, when the accumulator holds residual sums, the residual model."""
        post = super().from_accumulator(acc, sigma_e2, sigma_f2)
        if acc.res:
            post.residual = ResidualModel.fit(post, acc)
        return post

    def predictive(self, rows: RowBlock, with_mean: bool = True) -> Predictive:
        """The residual model's predictive per row (see ResidualModel.predictive)."""
        if self.residual is None:
            raise NtkalError("the error-aware score needs labelled training structures (REF_energy, REF_forces)")
        return self.residual.predictive(self, rows, with_mean)

    def summary(self) -> dict:
        """What the JSON reports show of the posterior."""
        res = self.residual
        out = {"k": self.k, "n_train": self.n_train, "sigma_e2": self.sigma_e2, "sigma_f2": self.sigma_f2,
               "force_reduce": self.force_reduce, "scales": dict(self.scales), "jitter": self.jitter,
               "kinds": self.kinds, "rho": dict(res.rho) if res else {}, "alpha2": dict(res.alpha2) if res else {},
               "calibration": res.calibration if res else None}
        if "score_fallback" in self.info:
            out["score_fallback"] = self.info["score_fallback"]
        return out

    # --- plain state ------------------------------------------------------------------------------
    def to_state(self) -> dict:
        """Everything a scorer needs, as plain data (float64 tensors, str, numbers, dicts): the checkpoint
        contract of ntkal.runstate; from_state(to_state()) scores exactly as this posterior."""
        return {"format": STATE_FORMAT, **super().to_state(),
                "residual": None if self.residual is None else self.residual.to_state(), "info": self.info}

    @classmethod
    def from_state(cls, state: dict) -> "Posterior":
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a posterior state of format {STATE_FORMAT}: {state.get('format')!r}")
        post = super().from_state(state)
        post.residual = None if state["residual"] is None else ResidualModel.from_state(state["residual"])
        post.info = dict(state["info"])
        return post
