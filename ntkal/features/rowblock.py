"""RowBlock: the ragged per-structure feature rows that every stage after featurisation consumes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

ENERGY = 0
FORCE = 1
EMBEDDING = 2
KIND_NAMES = {ENERGY: "energy", FORCE: "force", EMBEDDING: "embedding"}


@dataclass
class RowBlock:
    """Feature rows of n structures; structure s owns rows[ptr[s]:ptr[s+1]].

    `kind` says what each row observes (ENERGY, FORCE, EMBEDDING). Optional fields:
    `atom` — the atom index of an exact force row (-1 for other rows), for per-atom variances;
    `psi` — one vector per structure [n, k']: the featurizer's energy rows, or precomputed vectors (a
    committee's member deviations). LCMD uses it for rows of kind EMBEDDING only; other rows get their
    vectors from ntkal/acquisition/distances.py.
    """

    rows: torch.Tensor
    ptr: torch.Tensor
    kind: torch.Tensor
    natoms: torch.Tensor
    atom: Optional[torch.Tensor] = None
    psi: Optional[torch.Tensor] = None

    def __post_init__(self):
        self.ptr = torch.as_tensor(self.ptr, dtype=torch.int64)
        self.kind = torch.as_tensor(self.kind, dtype=torch.int8)
        self.natoms = torch.as_tensor(self.natoms, dtype=torch.int64)
        n = self.natoms.numel()
        if self.rows.dim() != 2:
            raise ValueError(f"RowBlock.rows must be 2-D [rows, k], got shape {tuple(self.rows.shape)}")
        if self.ptr.numel() != n + 1 or int(self.ptr[0]) != 0 or int(self.ptr[-1]) != self.rows.shape[0]:
            raise ValueError("RowBlock.ptr must have n+1 entries from 0 to the number of rows")
        if self.kind.numel() != self.rows.shape[0]:
            raise ValueError("RowBlock.kind must have one entry per row")
        if self.atom is not None and self.atom.numel() != self.rows.shape[0]:
            raise ValueError("RowBlock.atom must have one entry per row")
        if self.psi is not None and self.psi.shape[0] != n:
            raise ValueError("RowBlock.psi must have one row per structure")

    def __len__(self) -> int:
        return self.natoms.numel()

    @property
    def k(self) -> int:
        return self.rows.shape[1]

    @property
    def seg(self) -> torch.Tensor:
        """Structure index of every row (sorted), the segment ids the kernels take."""
        counts = self.ptr[1:] - self.ptr[:-1]
        return torch.repeat_interleave(torch.arange(len(self), device=self.rows.device), counts.to(self.rows.device))

    def only(self, kinds) -> "RowBlock":
        """The same structures with only their rows of the given kinds (e.g. the energy rows of joint rows)."""
        keep = torch.isin(self.kind, torch.tensor(list(kinds), dtype=self.kind.dtype))
        counts = torch.zeros(len(self), dtype=torch.int64).index_add_(
            0, self.seg.cpu()[keep], torch.ones(int(keep.sum()), dtype=torch.int64))
        ptr = torch.zeros(len(self) + 1, dtype=torch.int64)
        ptr[1:] = torch.cumsum(counts, 0)
        return RowBlock(self.rows[keep.to(self.rows.device)], ptr, self.kind[keep], self.natoms,
                        None if self.atom is None else self.atom[keep], self.psi)

    def to(self, *args, **kwargs) -> "RowBlock":
        return RowBlock(self.rows.to(*args, **kwargs), self.ptr, self.kind, self.natoms,
                        self.atom, None if self.psi is None else self.psi.to(*args, **kwargs))

    def select(self, idx) -> "RowBlock":
        """The structures `idx` (a list or 1-D tensor of structure indices), in that order."""
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        starts, ends = self.ptr[idx], self.ptr[idx + 1]
        counts = ends - starts
        row_idx = (torch.repeat_interleave(starts - torch.cumsum(counts, 0) + counts, counts)
                   + torch.arange(int(counts.sum())))
        ptr = torch.zeros(idx.numel() + 1, dtype=torch.int64)
        ptr[1:] = torch.cumsum(counts, 0)
        rows_idx = row_idx.to(self.rows.device)
        return RowBlock(self.rows[rows_idx], ptr, self.kind[row_idx], self.natoms[idx],
                        None if self.atom is None else self.atom[row_idx],
                        None if self.psi is None else self.psi[idx.to(self.psi.device)])

    @staticmethod
    def cat(blocks: Iterable["RowBlock"]) -> "RowBlock":
        """Concatenate row blocks structure-wise."""
        blocks = list(blocks)
        if not blocks:
            raise ValueError("RowBlock.cat needs at least one block")
        ptrs, off = [torch.zeros(1, dtype=torch.int64)], 0
        for b in blocks:
            ptrs.append(b.ptr[1:] + off)
            off += b.rows.shape[0]
        has_atom = all(b.atom is not None for b in blocks)
        has_psi = all(b.psi is not None for b in blocks)
        return RowBlock(torch.cat([b.rows for b in blocks]), torch.cat(ptrs),
                        torch.cat([b.kind for b in blocks]), torch.cat([b.natoms for b in blocks]),
                        torch.cat([b.atom for b in blocks]) if has_atom else None,
                        torch.cat([b.psi for b in blocks]) if has_psi else None)


def structure_rows(psi: torch.Tensor, force_rows: Optional[list], natoms: torch.Tensor, with_energy: bool,
                   exact: bool) -> RowBlock:
    """RowBlock of per-structure rows: the energy row psi[s] (if with_energy), then force_rows[s].

    psi [n, k] are the energy rows (kept as RowBlock.psi); force_rows[s] [r_s, k] (None: no force rows);
    exact force rows are atom-major (row j is atom j // 3), probe rows have no atom.
    """
    rows, kinds, atom_idx = [], [], []
    for s in range(len(natoms)):
        if with_energy:
            rows.append(psi[s:s + 1])
            kinds.append(torch.full((1,), ENERGY, dtype=torch.int8))
            atom_idx.append(torch.full((1,), -1, dtype=torch.int64))
        if force_rows is not None:
            r = force_rows[s].shape[0]
            rows.append(force_rows[s])
            kinds.append(torch.full((r,), FORCE, dtype=torch.int8))
            atom_idx.append(torch.arange(r, dtype=torch.int64) // 3 if exact else torch.full((r,), -1, dtype=torch.int64))
    n_force = [0] * len(natoms) if force_rows is None else [f.shape[0] for f in force_rows]
    counts = torch.tensor([int(with_energy) + r for r in n_force], dtype=torch.int64)
    ptr = torch.zeros(len(natoms) + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(counts, 0)
    return RowBlock(torch.cat(rows), ptr, torch.cat(kinds), natoms, torch.cat(atom_idx), psi)

