"""Batches sized from a memory budget (MACEFeaturizer(memory_gb=...)).

The budget is the process's peak memory: resident set size on a CPU, torch's allocated memory on a
GPU. The first batch of each kind of call (kernel, probes, path) is one structure. Every batch is
measured: its peak above the memory in use at its start, per unit (a structure's atoms plus its edges
/ avg_num_neighbors, or rows). On a CPU the heap's free pages go back to the OS (glibc malloc_trim)
before each measurement and plan, so RSS is the memory in use: without it a batch that reuses pages
the allocator kept looks up to 4x cheaper than it is (1.5 vs 6.0 MiB a double-backward row measured),
and the next, larger one overshoots. A batch is planned to fit SAFETY x (budget - memory in use now) at
the largest per-unit cost measured so far on batches at least half as large as the largest (small
batches carry the fixed part; the largest, because repeated batches of one size spread: 3.2-6.0 MiB a
row in one run of tests/test_fast_features.py's budget child), and holds at most twice the units of the
largest measured batch. SAFETY is the margin left for a batch costlier than any measured before.
"""
from __future__ import annotations

import contextlib
import resource
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

SAFETY = 0.75


def status_bytes(field: str, pid="self") -> Optional[int]:
    """A memory field of /proc/<pid>/status (VmRSS, VmHWM) in bytes; None where there is none (not Linux,
    or the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


_TRIM = []  # [malloc_trim or None], looked up on first use


def release_free_heap() -> bool:
    """Hand the heap's free pages back to the OS (glibc malloc_trim), so that RSS is the memory in use: a
    batch that reuses pages the allocator kept would otherwise look cheaper than it is. True if pages went
    back; False where there is no malloc_trim (macOS, musl, no ctypes)."""
    if not _TRIM:
        try:
            import ctypes
            _TRIM.append(ctypes.CDLL(None).malloc_trim)
        except (ImportError, OSError, AttributeError):
            _TRIM.append(None)
    return _TRIM[0] is not None and bool(_TRIM[0](0))


def reset_peak_rss() -> bool:
    """VmHWM := VmRSS (Linux); False where that is not possible or did not take effect (some sandboxes
    accept the write and keep the old high-water mark, or report no VmHWM at all)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    hwm, rss = status_bytes("VmHWM"), status_bytes("VmRSS")
    return hwm is not None and rss is not None and hwm <= 1.02 * rss + 2**22


class MemoryPlan:
    """Per-unit memory costs measured per call kind, and batch splits that fit the budget."""

    def __init__(self, memory_gb: Optional[float], device: torch.device):
        self.limit = None if memory_gb is None else float(memory_gb) * 2**30
        self.device = device
        # key -> (units, bytes above the start) of the batches at least half as large as the largest
        self.seen: Dict[str, List[Tuple[float, float]]] = {}
        self._warned = False

    def current(self) -> float:
        if self.device.type == "cuda":
            return float(torch.cuda.memory_allocated(self.device))
        release_free_heap()
        rss = status_bytes("VmRSS")
        return float(rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    def available(self) -> float:
        return SAFETY * (self.limit - self.current())

    def cost(self, key: str) -> Tuple[float, float]:
        """(bytes per unit to plan with, units of the largest measured batch) for `key`."""
        seen = self.seen[key]
        return max(n / u for u, n in seen), max(u for u, _ in seen)

    def batches(self, key: str, order: Sequence[int], units: Sequence[float], cap: int) -> Iterator[List[int]]:
        """Consecutive slices of `order` of at most `cap` structures that fit the budget (one if nothing
        is known yet for `key`); re-planned after every batch, so each uses the latest measurement."""
        i = 0
        while i < len(order):
            size = cap
            if self.limit is not None:
                if key not in self.seen:
                    size = 1
                else:
                    (per_unit, largest), room = self.cost(key), self.available()
                    used, size, grown = 0.0, 0, 0.0
                    while i + size < len(order) and size < cap:
                        u = units[order[i + size]]
                        cost = u * per_unit
                        if size > 0 and (used + cost > room or grown + u > 2 * largest):
                            break
                        used, grown, size = used + cost, grown + u, size + 1
                    if used > room and not self._warned:
                        self._warned = True
                        warnings.warn(f"memory_gb={self.limit / 2**30:g}: one structure needs about "
                                      f"{(self.current() + used) / 2**30:.2f} GB; featurising one structure at a time",
                                      RuntimeWarning, stacklevel=3)
            yield list(order[i:i + size])
            i += size

    @contextlib.contextmanager
    def measure(self, key: str, units: float):
        """Measure the peak memory of the block and record its cost per unit (no-op without a budget)."""
        if self.limit is None:
            yield
            return
        start = self.current()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        reset = cuda or reset_peak_rss()
        yield
        if cuda:
            peak = float(torch.cuda.max_memory_allocated(self.device))
        else:  # VmHWM since the reset; without one the lifetime peak, which over-states this block (safe side)
            hwm = status_bytes("VmHWM") if reset else None
            peak = float(hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        seen = self.seen.get(key, []) + [(max(float(units), 1e-9), max(peak - start, 1.0))]
        largest = max(u for u, _ in seen)
        self.seen[key] = [(u, n) for u, n in seen if u >= 0.5 * largest]
