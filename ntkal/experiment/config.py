"""The study's settings: dataclasses loaded from YAML, checked field by field, with one-line errors.

A config names the datasets (files or the shipped ones), how each split is drawn, the active-learning
schedule (initial labels, rounds, batch size), the methods, the fine-tuning recipe, and optionally a
pool-shift case study. `--quick` applies the config's own `quick:` overrides on top (smaller sizes).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import InputError

#: Acquisition methods of the main study (DESIGN §5 plus the committee baseline and random).
METHODS = ("random", "committee", "embedding", "energy", "force", "joint", "top")
#: NTK kernels that can rank by expected target-variance reduction (`ntkal select --target`).
TARGET_KERNELS = ("energy", "force", "joint")
KERNELS = ("embedding", "energy", "force", "joint")


class ConfigError(InputError):
    """A config that cannot be run: names the file and the offending field."""


@dataclass
class Split:
    """Structures drawn from one file: optional info-key filter, seeded shuffle, then skip/take."""

    file: str
    match: Dict[str, Any] = field(default_factory=dict)
    skip: int = 0
    take: Optional[int] = None
    shuffle: bool = True


@dataclass
class DatasetConfig:
    """One chemistry: its pretrained model, and the train / pool / test splits."""

    name: str
    files: str = "builtin"              # "builtin": ntkal.data's shipped files of this name; else a folder
    model: Optional[str] = None         # default: the files' pretrained model
    splits: Dict[str, Split] = field(default_factory=dict)   # default: one split per file
    max_pool: Optional[int] = None      # seeded subsample of the pool
    max_test: Optional[int] = None      # seeded subsample of each test split
    note: str = ""                      # how the splits were made, for the report


@dataclass
class FinetuneConfig:
    """mace_run_train --foundation_model recipe: fixed epochs and seed, final weights kept."""

    epochs: int = 6
    batch_size: int = 5
    lr: float = 0.005
    energy_weight: float = 1.0
    forces_weight: float = 100.0
    valid_size: int = 5                 # structures of the initial labelled set mace validates on
    in_process: bool = True             # mace's run_train in this interpreter (saves start-up)
    extra_args: List[str] = field(default_factory=list)


@dataclass
class SelectionConfig:
    """Feature and posterior settings shared by the NTK / embedding methods (ntkal.select's options)."""

    sketch_dim: int = 512
    force_probes: Optional[int] = 8     # pool force rows; labelled structures always use exact rows
    sigma_e2: float = 1e-2
    sigma_f2: float = 1e-2
    shortlist: Optional[int] = None     # None: ntkal's default max(10 B, 2000)
    target_shortlist: int = 100         # candidates re-featurised exactly for greedy target picks
    mode: str = "tp"
    top_kernel: str = "joint"           # kernel of the top-PV (no LCMD) ablation


@dataclass
class PoolShiftConfig:
    """Case study: the pool under-represents the target region; every method over several seeds."""

    dataset: str
    region_key: str = "region"
    target_value: str = "target"
    target_fraction: float = 0.1        # share of target-region structures in the biased pool
    pool_size: int = 400
    target_size: int = 30               # unlabelled target-region structures given to --target runs
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    methods: List[str] = field(default_factory=lambda: list(METHODS))
    target_kernels: List[str] = field(default_factory=lambda: list(TARGET_KERNELS))
    rounds: Optional[int] = None        # default: the study's rounds / budget
    budget: Optional[int] = None


@dataclass
class StudyConfig:
    """Everything one `ntkal experiment` run depends on; written into every results JSON."""

    name: str = "study"
    datasets: List[DatasetConfig] = field(default_factory=list)
    methods: List[str] = field(default_factory=lambda: list(METHODS))
    seeds: List[int] = field(default_factory=lambda: [0])
    initial_size: int = 20
    budget: int = 15
    rounds: int = 2
    committee_size: int = 4
    eval_batch_size: int = 32
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    pool_shift: Optional[PoolShiftConfig] = None
    quick: bool = False
    source: str = ""                    # the YAML file it came from

    def dataset(self, name: str) -> DatasetConfig:
        for d in self.datasets:
            if d.name == name:
                return d
        raise KeyError(name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_config_path() -> Path:
    return Path(__file__).resolve().parent / "configs" / "study.yaml"


def load_config(path=None, quick: bool = False) -> StudyConfig:
    """Read and check a study YAML (default: the packaged study.yaml); --quick applies its `quick:` block."""
    import yaml
    path = Path(path) if path is not None else default_config_path()
    if not path.exists():
        raise ConfigError("no such config file", path=path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {' '.join(str(exc).split())}", path=path) from None
    return config_from_dict(raw, quick=quick, source=str(path))


def config_from_dict(raw, quick: bool = False, source: str = "") -> StudyConfig:
    """Build a StudyConfig from parsed YAML; every problem is a ConfigError naming the field."""
    where = source or None
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a mapping of settings", path=where)
    raw = copy.deepcopy(raw)
    overrides = raw.pop("quick", None) or {}
    if quick:
        if not isinstance(overrides, dict):
            raise ConfigError("'quick' must be a mapping of overrides", path=where)
        raw = _merge(raw, overrides)
    data = dict(raw)
    datasets = data.pop("datasets", None)
    if not datasets or not isinstance(datasets, list):
        raise ConfigError("'datasets' must be a non-empty list", path=where)
    ft = _build(FinetuneConfig, data.pop("finetune", {}) or {}, "finetune", where)
    sel = _build(SelectionConfig, data.pop("selection", {}) or {}, "selection", where)
    ps_raw = data.pop("pool_shift", None)
    ps = _build(PoolShiftConfig, ps_raw, "pool_shift", where) if ps_raw else None
    ds = [_dataset(d, i, where) for i, d in enumerate(datasets)]
    cfg = _build(StudyConfig, data, "", where)
    cfg.datasets, cfg.finetune, cfg.selection, cfg.pool_shift = ds, ft, sel, ps
    cfg.quick, cfg.source = bool(quick), source
    validate(cfg)
    return cfg


def _merge(base: dict, over: dict) -> dict:
    """Recursive dict merge; lists and scalars in `over` replace; `datasets` entries merge by name."""
    out = dict(base)
    for key, value in over.items():
        if key == "datasets" and isinstance(value, list) and isinstance(base.get(key), list):
            by_name = {d.get("name"): d for d in value if isinstance(d, dict)}
            keep = [d for d in base[key] if isinstance(d, dict) and d.get("name") in by_name]
            out[key] = [_merge(d, by_name[d["name"]]) for d in keep]
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value)
        else:
            out[key] = value
    return out


def _build(cls, raw, section: str, where):
    if not isinstance(raw, dict):
        raise ConfigError(f"'{section}' must be a mapping", path=where)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        prefix = f"{section}." if section else ""
        raise ConfigError(f"unknown setting {prefix}{unknown[0]} (known: {', '.join(sorted(names))})", path=where)
    try:
        return cls(**raw)
    except TypeError as exc:
        raise ConfigError(f"{section or 'config'}: {exc}", path=where) from None


def _dataset(raw, i: int, where) -> DatasetConfig:
    if not isinstance(raw, dict) or "name" not in raw:
        raise ConfigError(f"datasets[{i}] must be a mapping with a 'name'", path=where)
    raw = dict(raw)
    splits = raw.pop("splits", None) or {}
    if not isinstance(splits, dict):
        raise ConfigError(f"datasets[{i}].splits must be a mapping of split name -> spec", path=where)
    d = _build(DatasetConfig, raw, f"datasets[{i}]", where)
    d.splits = {}
    for name, spec in splits.items():
        if isinstance(spec, str):
            spec = {"file": spec}
        d.splits[name] = _build(Split, spec, f"datasets[{i}].splits.{name}", where)
    return d


def validate(cfg: StudyConfig) -> None:
    """Range and consistency checks; the first problem found is raised as a ConfigError."""
    where = cfg.source or None

    def need(cond, msg):
        if not cond:
            raise ConfigError(msg, path=where)

    def ints(values, what):
        need(isinstance(values, list) and values and all(isinstance(v, int) and not isinstance(v, bool)
                                                         for v in values),
             f"{what} must be a non-empty list of integers, got {values!r}")
        need(len(set(values)) == len(values), f"{what} has repeated seeds: {values!r}")

    def positive(value, what, allow_zero=False):
        ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
        need(ok, f"{what} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")

    def number(value, what):
        need(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
             f"{what} must be a positive number, got {value!r}")

    need(isinstance(cfg.name, str) and cfg.name.strip(), "name must be a non-empty string")
    for what, ok in (("methods", cfg.methods),):
        need(isinstance(ok, list) and ok, f"{what} must be a non-empty list")
    bad = [m for m in cfg.methods if m not in METHODS]
    need(not bad, f"unknown method {bad[0]!r} in methods (known: {', '.join(METHODS)})" if bad else "")
    need(len(set(cfg.methods)) == len(cfg.methods), "methods lists a method twice")
    ints(cfg.seeds, "seeds")
    positive(cfg.initial_size, "initial_size")
    positive(cfg.budget, "budget")
    positive(cfg.rounds, "rounds")
    positive(cfg.committee_size, "committee_size")
    need(cfg.committee_size >= 2, f"committee_size must be at least 2, got {cfg.committee_size}")
    positive(cfg.eval_batch_size, "eval_batch_size")
    ft = cfg.finetune
    positive(ft.epochs, "finetune.epochs")
    positive(ft.batch_size, "finetune.batch_size")
    positive(ft.valid_size, "finetune.valid_size")
    need(ft.valid_size <= cfg.initial_size,
         f"finetune.valid_size ({ft.valid_size}) must not exceed initial_size ({cfg.initial_size})")
    number(ft.lr, "finetune.lr")
    number(ft.energy_weight, "finetune.energy_weight")
    number(ft.forces_weight, "finetune.forces_weight")
    need(isinstance(ft.extra_args, list) and all(isinstance(a, str) and a.startswith("--") for a in ft.extra_args),
         "finetune.extra_args must be a list of '--option=value' strings")
    sel = cfg.selection
    positive(sel.sketch_dim, "selection.sketch_dim")
    if sel.force_probes is not None:
        positive(sel.force_probes, "selection.force_probes")
    number(sel.sigma_e2, "selection.sigma_e2")
    number(sel.sigma_f2, "selection.sigma_f2")
    if sel.shortlist is not None:
        positive(sel.shortlist, "selection.shortlist")
        need(sel.shortlist >= cfg.budget, f"selection.shortlist ({sel.shortlist}) is smaller than budget ({cfg.budget})")
    positive(sel.target_shortlist, "selection.target_shortlist")
    need(sel.target_shortlist >= cfg.budget,
         f"selection.target_shortlist ({sel.target_shortlist}) is smaller than budget ({cfg.budget})")
    need(sel.mode in ("tp", "p"), f"selection.mode must be 'tp' or 'p', got {sel.mode!r}")
    need(sel.top_kernel in KERNELS, f"selection.top_kernel must be one of {', '.join(KERNELS)}, got {sel.top_kernel!r}")
    names = [d.name for d in cfg.datasets]
    need(len(set(names)) == len(names), "two datasets share a name")
    for d in cfg.datasets:
        need(isinstance(d.name, str) and d.name.replace("_", "").isalnum(),
             f"dataset name {d.name!r} must be letters, digits and underscores")
        if d.max_pool is not None:
            positive(d.max_pool, f"datasets[{d.name}].max_pool")
            need(d.max_pool >= cfg.budget * cfg.rounds,
                 f"datasets[{d.name}].max_pool ({d.max_pool}) is smaller than budget x rounds "
                 f"({cfg.budget * cfg.rounds})")
        if d.max_test is not None:
            positive(d.max_test, f"datasets[{d.name}].max_test")
        for sname, s in d.splits.items():
            positive(s.skip, f"datasets[{d.name}].splits.{sname}.skip", allow_zero=True)
            if s.take is not None:
                positive(s.take, f"datasets[{d.name}].splits.{sname}.take")
            need(isinstance(s.match, dict), f"datasets[{d.name}].splits.{sname}.match must be a mapping")
        if d.splits:
            for required in ("train", "pool"):
                need(required in d.splits, f"datasets[{d.name}].splits needs a '{required}' split")
            need(any(s.startswith("test") for s in d.splits),
                 f"datasets[{d.name}].splits needs at least one test split (a name starting with 'test')")
    ps = cfg.pool_shift
    if ps is not None:
        need(ps.dataset in names, f"pool_shift.dataset {ps.dataset!r} is not one of the datasets ({', '.join(names)})")
        need(isinstance(ps.target_fraction, (int, float)) and 0 <= ps.target_fraction < 1,
             f"pool_shift.target_fraction must be in [0, 1), got {ps.target_fraction!r}")
        for what in ("rounds", "budget"):
            if getattr(ps, what) is not None:
                positive(getattr(ps, what), f"pool_shift.{what}")
        b, r = ps.budget or cfg.budget, ps.rounds or cfg.rounds
        positive(ps.pool_size, "pool_shift.pool_size")
        need(ps.pool_size >= b * r, f"pool_shift.pool_size ({ps.pool_size}) is smaller than budget x rounds ({b * r})")
        need(sel.shortlist is None or sel.shortlist >= b,
             f"selection.shortlist ({sel.shortlist}) is smaller than pool_shift budget ({b})")
        need(sel.target_shortlist >= b,
             f"selection.target_shortlist ({sel.target_shortlist}) is smaller than pool_shift budget ({b})")
        positive(ps.target_size, "pool_shift.target_size")
        ints(ps.seeds, "pool_shift.seeds")
        bad = [m for m in ps.methods if m not in METHODS]
        need(not bad, f"unknown method {bad[0]!r} in pool_shift.methods" if bad else "")
        bad = [k for k in ps.target_kernels if k not in TARGET_KERNELS]
        need(not bad, f"pool_shift.target_kernels: {bad[0]!r} is not one of {', '.join(TARGET_KERNELS)}"
             if bad else "")
