"""The pool scan's streaming state: named candidate records in a running top-M and a seeded reservoir."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch


@dataclass
class Candidate:
    """One pool structure kept for the selector: what every selector and writer needs, by name."""

    index: int                       # position in the pool stream
    key: float                       # what the shortlist ranks by (the scorer's key)
    psi: torch.Tensor                # LCMD vector (float64, own storage: a view would keep its chunk alive)
    atoms: Any = None                # the ase.Atoms (None for row-level selection)
    values: Dict[str, float] = field(default_factory=dict)        # written as info["ntkal_<name>"]
    atom_values: Dict[str, Optional[np.ndarray]] = field(default_factory=dict)  # arrays["ntkal_<name>"]


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
