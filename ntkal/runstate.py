"""Run state beyond one process: torch.distributed ranks and resumable checkpoints (issue: scale).

Ranks shard work by chunk (chunk c belongs to rank c % world), so a run over any number of ranks
processes exactly the same chunks as one process; merging running top-M lists is order-independent.
Checkpoints hold a rank's running state after whole chunks, keyed by everything the result depends
on, written atomically; a rerun of the same command continues from them and gives the same result.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional


@dataclass
class Dist:
    """This process's rank and the world size (1 process unless torch.distributed is initialised)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Dist":
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def owns(self, chunk: int) -> bool:
        return chunk % self.world == self.rank

    def gather(self, obj) -> List[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()


def init_distributed() -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl with CUDA, gloo otherwise)."""
    import torch
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return Dist.current()


def file_fingerprint(path) -> dict:
    p = Path(path)
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class Checkpoint:
    """A folder of per-rank state files; valid only for the same inputs, settings and world size."""

    def __init__(self, folder, key: dict, dist: Dist, every_s: float = 60.0):
        self.folder = Path(folder)
        self.dist = dist
        self.every_s = float(every_s)
        blob = json.dumps({"key": key, "world": dist.world}, sort_keys=True, default=str)
        self.key = hashlib.sha256(blob.encode()).hexdigest()
        self._last = time.monotonic()

    def prepare(self):
        """Rank 0 empties a folder left by a run with other inputs or settings; then everyone proceeds."""
        meta = self.folder / "meta.json"
        if self.dist.rank == 0:
            if self.folder.exists():
                try:
                    same = json.loads(meta.read_text()).get("key") == self.key
                except (OSError, ValueError):
                    same = False
                if not same:
                    shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps({"key": self.key, "world": self.dist.world}))
        self.dist.barrier()

    def _file(self, name: str) -> Path:
        return self.folder / f"{name}-rank{self.dist.rank}of{self.dist.world}.pt"

    def load(self, name: str, shared: bool = False) -> Optional[dict]:
        """The saved state `name` if it was written for this key, else None."""
        import torch
        f = self.folder / f"{name}.pt" if shared else self._file(name)
        if not f.exists():
            return None
        try:
            state = torch.load(f, weights_only=False)
        except Exception:  # a torn or foreign file: start that part again
            return None
        return state if state.get("key") == self.key else None

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every_s

    def save(self, name: str, state: dict, shared: bool = False):
        import torch
        self.folder.mkdir(parents=True, exist_ok=True)
        f = self.folder / f"{name}.pt" if shared else self._file(name)
        tmp = f.with_name(f".{f.name}.tmp")
        torch.save({**state, "key": self.key}, tmp)
        os.replace(tmp, f)
        self._last = time.monotonic()

    def part(self, chunk: int) -> Path:
        return self.folder / f"part-{chunk:08d}.extxyz"

    def clear(self):
        if self.dist.rank == 0:
            shutil.rmtree(self.folder, ignore_errors=True)
