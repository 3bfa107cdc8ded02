"""Scorers: what ranks the pool. Each turns a chunk's feature rows into a key per structure (the
shortlist's order) plus the per-structure and per-atom values written beside every pick."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from ..features.rowblock import RowBlock


@dataclass
class Scored:
    key: np.ndarray                                          # float64 [n]: higher = more worth labelling
    values: Dict[str, np.ndarray] = field(default_factory=dict)                 # per structure
    atom_values: Dict[str, List[Optional[np.ndarray]]] = field(default_factory=dict)  # per structure, per atom


class PVScorer:
    """Posterior variance (novelty relative to the labelled set): the paper's score."""

    name = "pv"

    def __init__(self, post):
        self.post = post

    def __call__(self, rows: RowBlock) -> Scored:
        scores, atom_var = self.post.score_with_atoms(rows)
        s = scores.numpy()
        return Scored(s, {"score": s}, {"atom_variance": atom_var})


class TargetScorer(PVScorer):
    """Expected drop of the total predictive variance over a target sample if a structure were labelled
    (ntkal/target.py); PV is written beside it."""

    name = "target"

    def __init__(self, post, target_scorer):
        super().__init__(post)
        self.target = target_scorer

    def __call__(self, rows: RowBlock) -> Scored:
        out = super().__call__(rows)
        out.key = self.target.reduction(rows).numpy()
        out.values["target_reduction"] = out.key
        return out


class CommitteeScorer:
    """Committee disagreement on precomputed rows: each structure's row is its member-deviation vector
    (ntkal/experiment/committee.py), whose squared norm is the disagreement."""

    name = "committee"

    def __call__(self, rows: RowBlock) -> Scored:
        sq = torch.zeros(len(rows), dtype=torch.float64).index_add_(
            0, rows.seg.cpu(), rows.rows.detach().cpu().to(torch.float64).square().sum(1))
        s = sq.numpy()
        return Scored(s, {"score": s}, {})
