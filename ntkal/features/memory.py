"""Batches sized from a memory budget (MACEFeaturizer(memory_gb=...)).

The budget is the process's peak memory: resident set size on a CPU, torch's allocated memory on a
GPU. The first batch of each kind of call (kernel, probes, path) is one structure; its peak above the
memory at the start of the first measured call is "what one unit costs". A structure's size in units
is its atoms plus its edges / avg_num_neighbors; later batches take as many structures as fit in
SAFETY x (budget - that base memory), and every batch is measured again: the per-unit cost of the
largest batch so far is used (it includes the fixed part spread over more units, so estimates shrink
as batches grow and never undershoot a measured one).
"""
from __future__ import annotations

import contextlib
import resource
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch

SAFETY = 0.85


def _status_bytes(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """VmHWM := VmRSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class MemoryPlan:
    """Per-unit memory costs measured per call kind, and batch splits that fit the budget."""

    def __init__(self, memory_gb: Optional[float], device: torch.device):
        self.limit = None if memory_gb is None else float(memory_gb) * 2**30
        self.device = device
        self.base: Optional[float] = None
        self.per_unit: Dict[str, float] = {}
        self.largest: Dict[str, float] = {}
        self._warned = False

    def current(self) -> float:
        if self.device.type == "cuda":
            return float(torch.cuda.memory_allocated(self.device))
        rss = _status_bytes("VmRSS")
        return float(rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    def available(self) -> float:
        return SAFETY * (self.limit - (self.base if self.base is not None else self.current()))

    def batches(self, key: str, order: Sequence[int], units: Sequence[float], cap: int) -> Iterator[List[int]]:
        """Consecutive slices of `order` of at most `cap` structures that fit the budget (one if nothing
        is known yet for `key`); re-planned after every batch, so each uses the latest measurement."""
        i = 0
        while i < len(order):
            size = cap
            if self.limit is not None:
                if key not in self.per_unit:
                    size = 1
                else:
                    room, used, size = self.available(), 0.0, 0
                    while i + size < len(order) and size < cap:
                        cost = units[order[i + size]] * self.per_unit[key]
                        if size > 0 and used + cost > room:
                            break
                        used, size = used + cost, size + 1
                    if used > room and not self._warned:
                        self._warned = True
                        warnings.warn(f"memory_gb={self.limit / 2**30:g}: one structure needs about "
                                      f"{(self.base + used) / 2**30:.2f} GB; featurising one structure at a time",
                                      RuntimeWarning, stacklevel=3)
            yield list(order[i:i + size])
            i += size

    @contextlib.contextmanager
    def measure(self, key: str, units: float):
        """Measure the peak memory of the block and record its cost per unit (no-op without a budget)."""
        if self.limit is None:
            yield
            return
        if self.base is None:
            self.base = self.current()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        reset = cuda or reset_peak_rss()
        yield
        if cuda:
            peak = float(torch.cuda.max_memory_allocated(self.device))
        elif reset:
            peak = float(_status_bytes("VmHWM") or 0)
        else:  # no reset: the lifetime peak, which over-states this block (safe side)
            peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        need = max(peak - self.base, 1.0)
        if units >= self.largest.get(key, 0.0):
            self.largest[key] = units
            self.per_unit[key] = need / max(units, 1e-9)
