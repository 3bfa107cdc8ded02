"""The study's data: shipped or on-disk extxyz files, drawn into train / pool / test splits by the config.

Every structure gets `info["exp_id"]` ("<split>:<index>"), the key results files use to name picks.
Splits that share a file share one seeded shuffle of it, so `skip`/`take` carve disjoint slices.
Beside the splits, a Dataset hands out disjoint, seeded, per-dataset draws: the replay sample of the
pretraining split (and its validation part and the rest), and held-out target-region pool structures
(pool split minus the natural pool: the fine-tunes' validation set, then the +target sample).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ntkal.data import DATASET_SPLITS, DATA_DIR, dataset_files as shipped_files
from ntkal.io import COMPRESSION_SUFFIXES, EXTXYZ_SUFFIXES, read_structures

from .config import ConfigError, DatasetConfig, Region, Split

#: structure-file endings ntkal reads as extxyz, longest first (".extxyz.gz" before ".xyz.gz")
SUFFIXES = sorted([x + c for x in EXTXYZ_SUFFIXES for c in ("",) + COMPRESSION_SUFFIXES], key=len, reverse=True)


@dataclass
class Dataset:
    """Structures (with REF_energy / REF_forces) of one chemistry and the pretrained model to fine-tune."""

    name: str
    model: Path
    train: List = field(default_factory=list)
    pool: List = field(default_factory=list)
    pool_all: List = field(default_factory=list)   # the pool split before `max_pool` (pool-shift draws here)
    tests: Dict[str, List] = field(default_factory=dict)
    pretrain: List = field(default_factory=list)     # the pretrained model's training split (replay source)
    files: Dict[str, str] = field(default_factory=dict)
    note: str = ""
    region: Optional[Region] = None                  # None: every structure is target region

    def is_target(self, atoms) -> bool:
        return self.region is None or atoms.info.get(self.region.key) in self.region.target

    def targets(self, items) -> List:
        return [a for a in items if self.is_target(a)]

    def replay_split(self, n_replay: int, n_valid: int):
        """(replay, replay_valid, rest): one seeded permutation of the pretraining split, the same for every
        seed and method (mace's --num_samples_pt draws its MP replay sample once per run, too)."""
        if n_replay + n_valid > len(self.pretrain):
            raise ConfigError(f"dataset {self.name}: {len(self.pretrain)} pretraining structures, "
                              f"{n_replay} replay + {n_valid} replay-validation requested")
        rng = np.random.default_rng(zlib.crc32(f"ntkal-experiment:{self.name}:replay".encode()))
        perm = rng.permutation(len(self.pretrain))
        pick = [self.pretrain[i] for i in perm]
        return pick[:n_replay], pick[n_replay:n_replay + n_valid], pick[n_replay + n_valid:]

    def held_out_targets(self) -> List:
        """Target-region structures of the pool split outside the natural pool, in a seeded order."""
        in_pool = {a.info["exp_id"] for a in self.pool}
        spare = [a for a in self.pool_all if a.info["exp_id"] not in in_pool and self.is_target(a)]
        rng = np.random.default_rng(zlib.crc32(f"ntkal-experiment:{self.name}:held-out".encode()))
        return [spare[i] for i in rng.permutation(len(spare))]

    def summary(self) -> dict:
        return {"name": self.name, "model": str(self.model), "files": self.files, "note": self.note,
                "n_train": len(self.train), "n_pool": len(self.pool), "n_pretrain": len(self.pretrain),
                "n_pool_target": len(self.targets(self.pool)), "n_train_target": len(self.targets(self.train)),
                "region": None if self.region is None else {"key": self.region.key, "target": self.region.target},
                "tests": {k: len(v) for k, v in self.tests.items()},
                "mean_atoms_pool": float(np.mean([len(a) for a in self.pool])) if self.pool else 0.0}


def dataset_files(cfg: DatasetConfig) -> Dict[str, Path]:
    """{"model": path, split-file name: path}: ntkal.data's shipped files, or `<files>/<name>_<split>.*`."""
    if cfg.files == "builtin":
        folder = DATA_DIR
        found = {k: v for k, v in shipped_files(cfg.name).items() if v.exists()} if cfg.name in DATASET_SPLITS else {}
    else:
        folder = Path(cfg.files).expanduser()
        found = {}
        if not folder.is_dir():
            raise ConfigError(f"datasets[{cfg.name}].files: no such folder", path=folder)
    for path in sorted(folder.glob(f"{cfg.name}_*")):
        for suffix in SUFFIXES:
            if path.name.endswith(suffix):
                found.setdefault(path.name[len(cfg.name) + 1:-len(suffix)], path)
    model = Path(cfg.model) if cfg.model else found.get("model", folder / f"{cfg.name}_mace.model")
    found["model"] = Path(model)
    return found


def _matches(atoms, match: dict) -> bool:
    for key, want in match.items():
        have = atoms.info.get(key)
        if isinstance(want, list):
            if have not in want:
                return False
        elif have != want:
            return False
    return True


def _shuffle_seed(dataset: str, file: str) -> int:
    return zlib.crc32(f"ntkal-experiment:{dataset}:{file}".encode())


def draw(structures: list, split: Split, dataset: str) -> list:
    """Filter by `match`, shuffle (seeded by dataset and file), then skip / take."""
    idx = [i for i, a in enumerate(structures) if _matches(a, split.match)]
    if split.shuffle:
        rng = np.random.default_rng(_shuffle_seed(dataset, split.file))
        idx = [idx[i] for i in rng.permutation(len(idx))]
    idx = idx[split.skip:]
    if split.take is not None:
        idx = idx[:split.take]
    return [structures[i] for i in idx]


def subsample(structures: list, n: Optional[int], key: str) -> list:
    """A seeded subsample of at most n structures (order kept), or all of them."""
    if n is None or len(structures) <= n:
        return list(structures)
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    keep = np.sort(rng.choice(len(structures), size=n, replace=False))
    return [structures[i] for i in keep]


def load_dataset(cfg: DatasetConfig) -> Dataset:
    """Read a dataset's files and draw its splits; ConfigError names what is missing."""
    files = dataset_files(cfg)
    if not files["model"].exists():
        raise ConfigError(f"dataset {cfg.name}: no pretrained model", path=files["model"])
    splits = dict(cfg.splits)
    if not splits:
        splits = {name: Split(file=name, shuffle=False) for name in files
                  if name in ("train", "pool", "pretrain") or name.startswith("test")}
        for required in ("train", "pool"):
            if required not in splits:
                raise ConfigError(f"dataset {cfg.name}: no '{required}' file found (looked for {cfg.name}_{required}.*)")
        if not any(s.startswith("test") for s in splits):
            raise ConfigError(f"dataset {cfg.name}: no test files ({cfg.name}_test*.*) and no 'splits' in the config")
    cache: Dict[str, list] = {}
    out = Dataset(name=cfg.name, model=files["model"], note=cfg.note, region=cfg.region,
                  files={k: str(v) for k, v in files.items()})
    for name, split in splits.items():
        if split.file not in files:
            raise ConfigError(f"dataset {cfg.name}: split {name} reads file '{split.file}', which does not exist "
                              f"(have: {', '.join(sorted(k for k in files if k != 'model'))})")
        if split.file not in cache:
            cache[split.file] = list(read_structures(files[split.file]))
        drawn = draw(cache[split.file], split, cfg.name)
        if not drawn:
            raise ConfigError(f"dataset {cfg.name}: split {name} is empty")
        tagged = []
        for i, a in enumerate(drawn):
            a = a.copy()
            a.info["exp_id"] = f"{name}:{i}"
            tagged.append(a)
        if name == "train":
            out.train = tagged
        elif name == "pretrain":
            out.pretrain = tagged
        elif name == "pool":
            out.pool_all = tagged
            out.pool = subsample(tagged, cfg.max_pool, f"{cfg.name}:pool")
        elif name.startswith("test"):
            out.tests[name] = subsample(tagged, cfg.max_test, f"{cfg.name}:{name}")
    for name, items in [("train", out.train), ("pool", out.pool), ("pretrain", out.pretrain)]:
        for i, a in enumerate(items):
            if "REF_energy" not in a.info or "REF_forces" not in a.arrays:
                raise ConfigError(f"dataset {cfg.name}: {name} structure {i} has no REF_energy/REF_forces labels")
    return out
