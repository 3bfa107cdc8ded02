"""LCMD's training centres (docs/design.md, "Distances that see forces"): the labelled structures' ψ vectors,
each part (energy, force) scaled so that its mean squared norm over the labelled set is 1, and the same
map for pool rows. Built by the pipeline from the labelled chunks it featurises."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple, Union

import torch

from ..features.rowblock import RowBlock
from .distances import lcmd_vectors

F64 = torch.float64


@dataclass
class Centres:
    """Scaled ψ of the labelled structures (float64 [n_train, d], structure order), the scale (a number, or
    one per column when ψ has several parts) and the seed of the force-kernel sketch."""

    psi: torch.Tensor
    scale: Union[float, torch.Tensor]
    seed: int = 0

    @staticmethod
    def chunk(rows: RowBlock, start: int, seed: int = 0) -> Tuple[int, torch.Tensor, List[int]]:
        """One labelled chunk's part of the centres: (first structure index, unscaled ψ, part sizes)."""
        psi, parts = lcmd_vectors(rows, seed)
        return start, psi, parts

    @classmethod
    def from_chunks(cls, parts: Iterable[Tuple[int, torch.Tensor, List[int]]], seed: int = 0) -> "Centres":
        """From Centres.chunk of every labelled chunk, in any order (torchrun ranks' shards)."""
        parts = sorted(parts, key=lambda t: t[0])
        psi = torch.cat([p for _, p, _ in parts]).to(F64)
        sizes = parts[-1][2] or [psi.shape[1]]
        factors = [1.0 / math.sqrt(ms) if ms > 0 else 1.0  # each part's mean squared norm over the labelled set is 1
                   for ms in (float(b.square().sum(1).mean()) for b in psi.split(sizes, dim=1))]
        scale = factors[0] if len(sizes) == 1 else torch.repeat_interleave(torch.tensor(factors, dtype=F64),
                                                                           torch.tensor(sizes))
        return cls(psi.mul_(scale), scale, int(seed))

    @classmethod
    def from_rows(cls, train_rows: Union[RowBlock, Iterable[RowBlock]], seed: int = 0) -> "Centres":
        """From labelled rows (one RowBlock or an iterable of chunks)."""
        blocks = [train_rows] if isinstance(train_rows, RowBlock) else list(train_rows)
        starts = [0]
        for b in blocks:
            starts.append(starts[-1] + len(b))
        return cls.from_chunks([cls.chunk(b, s, seed) for b, s in zip(blocks, starts) if len(b)], seed)

    def vectors(self, rows: RowBlock, linv: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scaled ψ of pool rows, float64 [n, d]; linv: of L⁻¹g (LCMD's P mode)."""
        return lcmd_vectors(rows, self.seed, linv)[0] * self.scale

    def to_state(self) -> dict:
        """Plain data (the checkpoint contract of ntkal.runstate)."""
        return {"psi": self.psi, "scale": self.scale, "seed": self.seed}

    @classmethod
    def from_state(cls, state: dict) -> "Centres":
        scale = state["scale"]
        return cls(state["psi"].to(F64), scale.to(F64) if torch.is_tensor(scale) else float(scale), int(state["seed"]))
