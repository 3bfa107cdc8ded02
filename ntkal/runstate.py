"""Run state beyond one process: torchrun ranks, a run's own checkpoint folder, and output ownership.

Ranks shard work by chunk (chunk c belongs to rank c % world), so a run over any number of ranks
processes exactly the same chunks as one process. A checkpoint folder belongs to one run: rank 0
holds an exclusive lock on it for the run's whole life (a second run on the same --out stops with a
clear message), every state file carries the run key (inputs + settings), and state of another key
is discarded. ntkal replaces a file only if it can tell that ntkal wrote it (docs/design.md, "Safe on disk").
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

from .errors import InputError

log = logging.getLogger("ntkal")


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
    """What identifies an input for a checkpoint: its resolved path and a SHA-256 of its content (streamed;
    a file edited in place with size and mtime kept is another input)."""
    p = Path(path)
    return {"path": str(p.resolve()), "sha256": sha256_file(p)}


def sha256_file(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def run_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# output ownership

def written_by_ntkal(path: Path) -> bool:
    """Whether an existing file carries ntkal's mark: a report's "written_by", an extxyz whose first frame
    has ntkal_pool_index, a PNG whose metadata names ntkal, a checkpoint folder with ntkal's meta.json."""
    path = Path(path)
    try:
        if path.is_dir():
            return written_by_ntkal(path / "meta.json")
        name = path.name.lower()
        if name.endswith(".json"):
            return str(json.loads(path.read_text()).get("written_by", "")).startswith("ntkal")
        if name.endswith(".png"):
            with open(path, "rb") as fh:
                return b"ntkal" in fh.read(4096)
        if name.endswith(".ntkal"):  # a saved posterior (ntkal.saved): its safetensors header names the format
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                return b"ntkal.saved-posterior/" in fh.read(min(n, 1 << 20))
        import logging
        from .io import read_structures
        log = logging.getLogger("ntkal")
        disabled, log.disabled = log.disabled, True  # no label warnings for a file we only look at
        try:
            first = next(iter(read_structures(path)), None)
        finally:
            log.disabled = disabled
        return first is not None and "ntkal_pool_index" in first.info
    except Exception:  # unreadable, not JSON, not a structure file: not ours
        return False


def claim(path: Path, what: str) -> Path:
    """Refuse (InputError naming `what`) to replace anything at `path` that ntkal did not write."""
    path = Path(path)
    if path.exists() and not written_by_ntkal(path):
        kind = "folder" if path.is_dir() else "file"
        raise InputError(f"{what}: {path} is a {kind} ntkal did not write; ntkal never replaces it "
                         f"(move it away or choose another output name)")
    return path


# --------------------------------------------------------------------------------------------
# checkpoints

class Checkpoint:
    """`<out>.ntkal-ckpt/`: lock, meta.json, and state files that each carry the run key."""

    def __init__(self, folder, key: dict, dist: Dist, every_s: float = 60.0):
        self.folder = Path(folder)
        self.dist = dist
        self.every_s = float(every_s)
        self.key = run_key({"key": key, "world": dist.world})
        self._last = time.monotonic()
        self._lock = None
        self.saved = False  # resumable work exists (a state file was written by this run or an earlier one)

    def open(self):
        """Rank 0 takes the folder's lock (InputError if another run holds it) and drops state of other keys."""
        error = None
        if self.dist.rank == 0:
            try:
                self._take()
            except InputError as exc:
                error = str(exc)
        errors = [e for e in self.dist.gather(error) if e]
        if errors:
            raise InputError(errors[0])
        # what _take left beside lock and meta.json is this key's resumable state
        self.saved = bool(self.dist.gather(self.dist.rank == 0 and any(
            p.name not in ("lock", "meta.json") for p in self.folder.iterdir()))[0])
        return self

    def _take(self):
        claim(self.folder, "checkpoint folder")
        lock = self.folder / "lock"
        for _ in range(5):  # a run that just finished may remove the folder (and its lock) under us: retry
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise InputError(f"another ntkal run (pid {holder}) is writing this output ({self.folder}); "
                                 "wait for it to finish or choose another --out") from None
            try:
                if os.fstat(fd).st_ino == os.stat(lock).st_ino:  # the lock we hold is still the folder's
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise InputError(f"could not take the lock of {self.folder}: other runs keep replacing it")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock = fd
        meta = self.folder / "meta.json"
        try:
            same = json.loads(meta.read_text()).get("key") == self.key
        except (OSError, ValueError):
            same = False
        if not same:
            for p in self.folder.iterdir():
                if p.name not in ("lock", "meta.json"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            tmp = meta.with_name(".meta.json.tmp")
            tmp.write_text(json.dumps({"written_by": "ntkal checkpoint", "key": self.key}))
            os.replace(tmp, meta)

    def __enter__(self):
        return self.open()

    def __exit__(self, kind, exc, tb):
        """Success, or an error in the inputs or settings (a rerun has another key): remove the folder.
        A crash or an interrupt: keep it if it holds resumable work, so the same command continues."""
        from .errors import NtkalError
        if kind is None:
            self.dist.barrier()
        if self.dist.rank == 0 and self._lock is not None:
            if kind is None or issubclass(kind, NtkalError) or not self.saved:
                shutil.rmtree(self.folder, ignore_errors=True)
            os.close(self._lock)
            self._lock = None
        return False

    def _file(self, name: str, shared: bool) -> Path:
        suffix = "" if shared else f"-rank{self.dist.rank}of{self.dist.world}"
        return self.folder / f"{name}{suffix}.safetensors"

    def load(self, name: str, shared: bool = False) -> Optional[dict]:
        """The saved state `name` if it was written for this run key and its content hash holds, else None
        (a torn, edited or foreign file: that work is done again)."""
        f = self._file(name, shared)
        if not f.exists():
            return None
        if not self.sealed(f):
            log.warning("checkpoint state %s failed its integrity check; redoing that work", f.name)
            return None
        try:
            state = state_from_bytes(f.read_bytes())
        except (ValueError, OSError):
            return None
        return state["state"] if state.get("key") == self.key else None

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every_s

    def save(self, name: str, state: dict, shared: bool = False):
        """Save plain state (nested dicts/lists of str, numbers, None, tensors, arrays; no pickles) atomically,
        with its content hash beside it."""
        f = self._file(name, shared)
        data = state_to_bytes({"key": self.key, "state": state})
        _write_atomic(f, data)
        self.seal(f, hashlib.sha256(data).hexdigest())
        self.saved = True
        self._last = time.monotonic()

    def seal(self, path: Path, digest: Optional[str] = None):
        """Record `path`'s content hash (computed if not given) in `<path>.sha256`, written after the file:
        a file without a matching seal is never trusted."""
        _write_atomic(_seal_of(path), (digest or sha256_file(path)).encode())

    def sealed(self, path: Path) -> bool:
        """Whether `path` exists and still has the content hash recorded when it was written."""
        try:
            return _seal_of(path).read_text().strip() == sha256_file(path)
        except OSError:
            return False

    def part(self, chunk: int) -> Path:
        """A chunk's output part; its name carries the run key."""
        return self.folder / f"part-{self.key}-{chunk:08d}.extxyz"

    def parts_done(self) -> set:
        """Chunks whose part is complete and unchanged (content hash as sealed); other parts are redone."""
        done = set()
        for p in self.folder.glob(f"part-{self.key}-*.extxyz"):
            if self.sealed(p):
                done.add(int(p.stem.rsplit("-", 1)[1]))
            else:
                log.warning("checkpoint part %s failed its integrity check; scoring that chunk again", p.name)
        return done


def _seal_of(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_atomic(path: Path, data: bytes):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# plain state: tensors and arrays in safetensors, everything else JSON (nothing is unpickled)

_TENSOR, _ARRAY = "__ntkal_tensor__", "__ntkal_array__"


def state_to_bytes(state) -> bytes:
    """Serialise nested dicts (str keys) / lists / tuples of str, int, float, bool, None, torch tensors and
    numpy arrays: the tensors as safetensors, the structure as JSON in its metadata."""
    import numpy as np
    import torch
    from safetensors.torch import save
    tensors = {}

    def plain(x):
        if isinstance(x, (torch.Tensor, np.ndarray)):
            name = f"t{len(tensors)}"
            is_array = isinstance(x, np.ndarray)
            tensors[name] = (torch.from_numpy(np.array(x)) if is_array else x.detach().cpu().clone()).contiguous()
            return {_ARRAY if is_array else _TENSOR: name}
        if isinstance(x, dict):
            if not all(isinstance(k, str) for k in x):
                raise TypeError(f"checkpoint state: dict keys must be str, got {sorted(map(repr, x))[:3]}")
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, np.generic):
            return x.item()
        if x is None or isinstance(x, (str, bool, int, float)):
            return x
        raise TypeError(f"checkpoint state holds only plain data and tensors, not {type(x).__name__}")
    meta = json.dumps(plain(state), allow_nan=True)
    return save(tensors, metadata={"ntkal_state": meta})


def state_from_bytes(data: bytes):
    """The nested state of `state_to_bytes` (tuples come back as lists)."""
    import struct
    from safetensors.torch import load
    try:
        tensors = load(data)  # checks the header and every tensor's extent
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8:8 + n])["__metadata__"]["ntkal_state"]
    except Exception as exc:  # safetensors' own error type, struct, JSON or a missing key: not our state
        raise ValueError(f"not an ntkal checkpoint state ({type(exc).__name__}: {exc})") from None

    def restore(x):
        if isinstance(x, dict):
            if len(x) == 1 and _TENSOR in x:
                return tensors[x[_TENSOR]]
            if len(x) == 1 and _ARRAY in x:
                return tensors[x[_ARRAY]].numpy()
            return {k: restore(v) for k, v in x.items()}
        if isinstance(x, list):
            return [restore(v) for v in x]
        return x
    return restore(json.loads(meta))
