"""The pool scan's streaming state: named candidate records in a running top-M and a seeded reservoir, with
their plain checkpoint state (docs/design.md, "Pipeline")."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from .atoms_state import optional_atoms_from_state, optional_atoms_to_state


@dataclass
class Candidate:
    """One pool structure kept for the selector: what every selector and writer needs, by name."""

    index: int                       # position in the pool stream
    key: float                       # what the shortlist ranks by (the scorer's key)
    psi: torch.Tensor                # LCMD vector (float64, own storage: a view would keep its chunk alive)
    atoms: Any = None                # the ase.Atoms (None for row-level selection)
    values: Dict[str, float] = field(default_factory=dict)        # written as info["ntkal_<name>"]
    atom_values: Dict[str, Optional[np.ndarray]] = field(default_factory=dict)  # arrays["ntkal_<name>"]

    def to_state(self) -> dict:
        """Plain data (the checkpoint contract of ntkal.runstate); values as [name, value] pairs, in the
        order they are written."""
        return {"index": int(self.index), "key": float(self.key), "psi": self.psi,
                "atoms": optional_atoms_to_state(self.atoms),
                "values": [[n, float(v)] for n, v in self.values.items()],
                "atom_values": [[n, None if v is None else np.asarray(v)] for n, v in self.atom_values.items()]}

    @classmethod
    def from_state(cls, state: dict) -> "Candidate":
        psi = state["psi"]
        return cls(int(state["index"]), float(state["key"]), None if psi is None else psi.to(torch.float64),
                   optional_atoms_from_state(state["atoms"]), {n: float(v) for n, v in state["values"]},
                   {n: v for n, v in state["atom_values"]})


def annotate(c: Candidate, rank: Optional[int] = None):
    """A copy of the candidate's structure with ntkal's keys (never energy/forces keys)."""
    out = c.atoms.copy()
    out.calc = None
    for name, v in c.values.items():
        out.info[f"ntkal_{name}"] = float(v)
    out.info["ntkal_pool_index"] = int(c.index)
    if rank is not None:
        out.info["ntkal_rank"] = int(rank)
    for name, v in c.atom_values.items():
        if v is not None:
            out.arrays[f"ntkal_{name}"] = np.asarray(v, dtype=np.float64)
    return out


class TopM:
    """Running top-M of (key, index) pairs over a stream, with a payload per item.

    Ties in the key go to the lower index, so the result does not depend on how the stream was chunked.
    """

    def __init__(self, m: int):
        self.m = int(m)
        self.keys = np.zeros(0, dtype=np.float64)
        self.index = np.zeros(0, dtype=np.int64)
        self.payload: List[Any] = []

    def add(self, keys, index, payload=None):
        keys = np.asarray(keys, dtype=np.float64)
        index = np.asarray(index, dtype=np.int64)
        payload = [None] * len(keys) if payload is None else list(payload)
        all_keys = np.concatenate([self.keys, keys])
        all_index = np.concatenate([self.index, index])
        all_payload = self.payload + payload
        order = np.lexsort((all_index, -all_keys))[: self.m]
        self.keys, self.index = all_keys[order], all_index[order]
        self.payload = [all_payload[i] for i in order]

    def candidates(self, keys) -> np.ndarray:
        """Positions of `keys` that can still enter: >= both the chunk's m-th largest key and the current
        m-th key. Ties are kept (add() decides them by index), so filtering never changes the result."""
        keys = np.asarray(keys, dtype=np.float64)
        n = len(keys)
        if self.m == 0 or n == 0:
            return np.zeros(0, dtype=np.int64)
        if np.isnan(keys).any():  # NaN sorts last in add(); do not filter around it
            return np.arange(n)
        thr = np.partition(keys, n - self.m)[n - self.m] if n > self.m else -np.inf
        if len(self) >= self.m and self.keys[self.m - 1] > thr:
            thr = self.keys[self.m - 1]
        return np.flatnonzero(keys >= thr)

    def merge(self, others: List["TopM"]) -> "TopM":
        """The top-M of several lists (torchrun ranks' shortlists)."""
        out = TopM(self.m)
        for t in [self, *others]:
            keep = out.candidates(t.keys)
            if len(keep):
                out.add(t.keys[keep], t.index[keep], [t.payload[i] for i in keep])
        return out

    def __len__(self):
        return len(self.keys)

    def to_state(self, payload: Callable[[Any], Any] = lambda p: p) -> dict:
        """Plain data; payload(item) makes each payload plain."""
        return {"m": self.m, "keys": self.keys, "index": self.index, "payload": [payload(p) for p in self.payload]}

    @classmethod
    def from_state(cls, state: dict, payload: Callable[[Any], Any] = lambda p: p) -> "TopM":
        out = cls(state["m"])
        out.keys = np.asarray(state["keys"], dtype=np.float64)
        out.index = np.asarray(state["index"], dtype=np.int64)
        out.payload = [payload(p) for p in state["payload"]]
        return out


def random_keys(seed: int, start: int, n: int) -> np.ndarray:
    """Uniform draws for stream positions start..start+n-1: counter-based (Philox), so the reservoir is the
    same however the stream is chunked or sharded over ranks."""
    bg = np.random.Philox(key=int(seed) % (1 << 64))
    q, r = divmod(int(start), 4)  # Philox yields 4 doubles per counter step
    bg.advance(q)
    return np.random.Generator(bg).random(n + r)[r:]


class Shortlist:
    """Top-m by key and a reservoir of the n_random largest random draws (a seeded uniform sample).

    Each chunk's candidate records are built once, only for the rows that can enter either list,
    so memory is O(m) records whatever the pool size.
    """

    def __init__(self, m: int, n_random: int = 0, seed: int = 0):
        self.top, self.rnd, self.seed = TopM(m), TopM(n_random), int(seed)

    def add(self, keys, start: int, build: Callable[[np.ndarray], List[Any]]):
        """One chunk: keys of stream positions start.. ; build(positions) makes their records."""
        keys = np.asarray(keys, dtype=np.float64)
        index = np.arange(start, start + len(keys))
        keep = self.top.candidates(keys)
        rkeys = random_keys(self.seed, start, len(keys)) if self.rnd.m else None
        keep_r = self.rnd.candidates(rkeys) if rkeys is not None else keep[:0]
        rows = np.union1d(keep, keep_r)
        if len(rows) == 0:
            return
        built = dict(zip(rows.tolist(), build(rows)))
        if len(keep):
            self.top.add(keys[keep], index[keep], [built[i] for i in keep.tolist()])
        if len(keep_r):
            self.rnd.add(rkeys[keep_r], index[keep_r], [built[i] for i in keep_r.tolist()])

    def merge(self, others: List["Shortlist"]) -> "Shortlist":
        out = Shortlist(self.top.m, self.rnd.m, self.seed)
        out.top = self.top.merge([o.top for o in others])
        out.rnd = self.rnd.merge([o.rnd for o in others])
        return out

    def to_state(self) -> dict:
        """Plain data for a checkpoint: each Candidate once (both lists may hold the same record), the lists
        as positions into them."""
        records: Dict[int, int] = {}
        cands: List[dict] = []

        def ref(c: Candidate) -> int:
            if id(c) not in records:
                records[id(c)] = len(cands)
                cands.append(c.to_state())
            return records[id(c)]
        top, rnd = self.top.to_state(ref), self.rnd.to_state(ref)
        return {"seed": self.seed, "candidates": cands, "top": top, "rnd": rnd}

    @classmethod
    def from_state(cls, state: dict) -> "Shortlist":
        cands = [Candidate.from_state(c) for c in state["candidates"]]
        out = cls(0, 0, state["seed"])
        out.top = TopM.from_state(state["top"], cands.__getitem__)
        out.rnd = TopM.from_state(state["rnd"], cands.__getitem__)
        return out
