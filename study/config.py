"""The study's settings: dataclasses loaded from YAML, checked field by field, with one-line errors.

A config names the datasets (files or the shipped ones) with their target region, the scenarios (the
natural pool and a pool biased towards the pretraining region), the active-learning schedule (initial
labels, rounds, batch size, seeds), the methods of each scenario, the fine-tuning recipe (per-dataset
overrides allowed), the fine-tune-curve calibration and the claims the report judges on the records.
`--quick` applies the config's own `quick:` overrides on top (smaller sizes).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ntkal import InputError
from ntkal.options import KERNELS

from .claims import LABELS, TESTS, Claim
from .methods import ORACLES, known_methods

SCENARIOS = ("natural", "biased")
PROTOCOLS = ("replay", "naive")


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
class Region:
    """The target region: structures whose info[key] is one of `target`; the rest is the pretraining region."""

    key: str = "region"
    target: List[Any] = field(default_factory=lambda: ["target"])


@dataclass
class DatasetConfig:
    """One chemistry: its pretrained model, the train / pool / test splits, and what "target" means."""

    name: str
    files: str = "builtin"              # "builtin": ntkal.data's shipped files of this name; else a folder
    model: Optional[str] = None         # default: the files' pretrained model
    splits: Dict[str, Split] = field(default_factory=dict)   # default: one split per file
    max_pool: Optional[int] = None      # seeded subsample of the pool split: the natural pool
    max_test: Optional[int] = None      # seeded subsample of each test split
    region: Optional[Region] = None     # None: every structure counts as target region
    biased_source: str = "pool"         # the biased pool's pretraining-region structures: "pool" (the natural
                                        # pool's non-target ones) or "pretrain" (pretraining split minus replay)
    finetune: Dict[str, Any] = field(default_factory=dict)   # overrides of the study's finetune settings
    epochs_reason: str = ""             # why these epochs (from the fine-tune curve), for the report
    note: str = ""                      # how the splits were made, for the report
    family: str = ""                    # chemistry family (e.g. "metals/surfaces", "molecules"), for the report
    methods: Optional[List[str]] = None # the scenarios' methods run on this dataset (None: all of them)


@dataclass
class FinetuneConfig:
    """mace_run_train --foundation_model recipe: fixed epochs and seed, final weights kept.

    protocol "replay": mace's multihead fine-tuning (--multiheads_finetuning) with a seeded sample of the
    dataset's pretraining split as the pt_head's replay data; "naive": the pretrained model's one head is
    trained on the labelled set alone.
    """

    protocol: str = "replay"
    epochs: int = 6
    batch_size: int = 5
    lr: float = 0.005
    energy_weight: float = 1.0
    forces_weight: float = 100.0
    valid_size: int = 5                 # held-out target-region structures mace validates on (same for all)
    replay_samples: int = 100           # pretraining structures replayed (mace's --num_samples_pt)
    replay_weight: float = 1.0          # their config_weight (what mace's --weight_pt_head sets for MP replay)
    replay_valid: int = 5               # further pretraining structures the pt_head validates on
    ema_decay: Optional[float] = None   # None: no EMA of the weights
    dtype: str = "float64"              # mace's --default_dtype for training (evaluation is float64)
    in_process: bool = True             # mace's run_train in this interpreter (saves start-up)
    extra_args: List[str] = field(default_factory=list)


@dataclass
class SelectionConfig:
    """Feature and posterior settings shared by the NTK / embedding methods (ntkal.select's options)."""

    sketch_dim: int = 512
    force_probes: Optional[int] = 8     # pool force rows; labelled structures always use exact rows
    sigma_e2: float = 1e-2
    sigma_f2: float = 1e-2
    shortlist: Optional[int] = None     # None: ntkal's default (ntkal.options.default_shortlist)
    target_shortlist: int = 100         # candidates re-featurised exactly for greedy target picks
    mode: str = "tp"
    top_kernel: str = "joint"           # kernel of the top-PV (no LCMD) ablation
    probe_variant: int = 8              # pool force probes of the "~probes" methods
    labelled_force_rows: str = "exact"  # "exact" (`ntkal select` as shipped) or "pool": the pool's probe rows


@dataclass
class ScenarioConfig:
    """One pool condition: "natural" (the dataset's pool) or "biased" (mostly pretraining-region)."""

    name: str
    methods: List[str] = field(default_factory=lambda: ["random"])
    primary: str = "test_id"            # the split verdicts use; "<split>:target" falls back to <split>
                                        # for a dataset without that region subset
    pool_size: Optional[int] = None     # biased: structures in the pool
    pretrain_fraction: float = 0.8      # biased: share of pretraining-region structures
    target_size: int = 0                # unlabelled target-region structures for "<kernel>+target" runs
    curves: Optional[List[str]] = None  # methods fine-tuned after every round (the learning curves); the
                                        # others only after the last one (their picks of every round are
                                        # still recorded). None: every method


@dataclass
class CurveConfig:
    """The once-per-dataset calibration: a long fine-tune on seed 0's initial set, validated per epoch."""

    epochs: int = 30
    valid_size: int = 30                # held-out target-region structures (the study's valid set is a prefix)
    protocols: List[str] = field(default_factory=lambda: list(PROTOCOLS))


@dataclass
class StudyConfig:
    """Everything one `python -m study` run depends on; written into every results JSON."""

    name: str = "study"
    datasets: List[DatasetConfig] = field(default_factory=list)
    scenarios: List[ScenarioConfig] = field(default_factory=lambda: [ScenarioConfig("natural")])
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    initial_size: int = 10
    budget: int = 15
    rounds: int = 3
    committee_size: int = 4
    eval_batch_size: int = 32
    eval_dtype: str = "float32"         # predictions for errors (float64 agrees to 0.01 meV here, at 2.5x the cost)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    curve: CurveConfig = field(default_factory=CurveConfig)
    claims: List[Claim] = field(default_factory=list)
    rails: List[str] = field(default_factory=lambda: list(ORACLES))   # the oracles gap closure is measured against
    quick: bool = False
    source: str = ""                    # the YAML file it came from

    def dataset(self, name: str) -> DatasetConfig:
        for d in self.datasets:
            if d.name == name:
                return d
        raise KeyError(name)

    def scenario(self, name: str) -> ScenarioConfig:
        for s in self.scenarios:
            if s.name == name:
                return s
        raise KeyError(name)

    def methods_for(self, dataset: str, scenario: str) -> List[str]:
        """The scenario's methods that run on `dataset` (its `methods`, when it lists some), in scenario order."""
        keep = self.dataset(dataset).methods
        return [m for m in self.scenario(scenario).methods if keep is None or m in keep]

    def finetune_for(self, dataset: str) -> FinetuneConfig:
        """The study's fine-tune recipe with the dataset's overrides applied."""
        return dataclasses.replace(self.finetune, **self.dataset(dataset).finetune)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_config_path() -> Path:
    return Path(__file__).resolve().parent / "configs" / "study.yaml"


def load_config(path=None, quick: bool = False) -> StudyConfig:
    """Read and check a study YAML (default: study/configs/study.yaml); --quick applies its `quick:` block."""
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
    curve = _build(CurveConfig, data.pop("curve", {}) or {}, "curve", where)
    scen_raw = data.pop("scenarios", None)
    if not isinstance(scen_raw, dict) or not scen_raw:
        raise ConfigError("'scenarios' must be a non-empty mapping of scenario name -> settings", path=where)
    scenarios = []
    for name, spec in scen_raw.items():
        if name not in SCENARIOS:
            raise ConfigError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})", path=where)
        scenarios.append(_build(ScenarioConfig, {**(spec or {}), "name": name}, f"scenarios.{name}", where))
    claims_raw = data.pop("claims", None) or []
    if not isinstance(claims_raw, list):
        raise ConfigError("'claims' must be a list of claims", path=where)
    claims = [_build(Claim, c, f"claims[{i}]", where) for i, c in enumerate(claims_raw)]
    ds = [_dataset(d, i, where) for i, d in enumerate(datasets)]
    cfg = _build(StudyConfig, data, "", where)
    cfg.datasets, cfg.finetune, cfg.selection, cfg.curve, cfg.scenarios = ds, ft, sel, curve, scenarios
    cfg.claims = claims
    for c in claims:
        c.rails = c.rails if c.rails is not None else list(cfg.rails)
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
    region = raw.pop("region", None)
    d = _build(DatasetConfig, raw, f"datasets[{i}]", where)
    if region is not None:
        d.region = _build(Region, region, f"datasets[{i}].region", where)
        if not isinstance(d.region.target, list):
            d.region.target = [d.region.target]
    if not isinstance(d.finetune, dict):
        raise ConfigError(f"datasets[{i}].finetune must be a mapping of finetune settings", path=where)
    _build(FinetuneConfig, d.finetune, f"datasets[{i}].finetune", where)   # names checked here
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
    ints(cfg.seeds, "seeds")
    positive(cfg.initial_size, "initial_size")
    positive(cfg.budget, "budget")
    positive(cfg.rounds, "rounds")
    positive(cfg.committee_size, "committee_size")
    need(cfg.committee_size >= 2, f"committee_size must be at least 2, got {cfg.committee_size}")
    positive(cfg.eval_batch_size, "eval_batch_size")
    need(cfg.eval_dtype in ("float32", "float64"), f"eval_dtype must be float32 or float64, got {cfg.eval_dtype!r}")
    names = [d.name for d in cfg.datasets]
    need(len(set(names)) == len(names), "two datasets share a name")
    for d in cfg.datasets:
        _check_finetune(cfg.finetune_for(d.name), f"datasets[{d.name}].finetune" if d.finetune else "finetune",
                        need, positive, number)
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
    positive(sel.probe_variant, "selection.probe_variant")
    need(sel.labelled_force_rows in ("exact", "pool"),
         f"selection.labelled_force_rows must be 'exact' or 'pool', got {sel.labelled_force_rows!r}")
    need(isinstance(cfg.rails, list) and cfg.rails and set(cfg.rails) <= set(ORACLES),
         f"rails must be a non-empty list of {', '.join(ORACLES)}, got {cfg.rails!r}")
    need(sel.top_kernel in KERNELS, f"selection.top_kernel must be one of {', '.join(KERNELS)}, got {sel.top_kernel!r}")
    positive(cfg.curve.epochs, "curve.epochs")
    positive(cfg.curve.valid_size, "curve.valid_size")
    need(isinstance(cfg.curve.protocols, list) and cfg.curve.protocols
         and all(p in PROTOCOLS for p in cfg.curve.protocols),
         f"curve.protocols must be a non-empty list of {', '.join(PROTOCOLS)}, got {cfg.curve.protocols!r}")
    need(cfg.finetune.valid_size <= cfg.curve.valid_size,
         f"finetune.valid_size ({cfg.finetune.valid_size}) must not exceed curve.valid_size ({cfg.curve.valid_size}): "
         "the study validates on a prefix of the curve's held-out set")
    need(len({s.name for s in cfg.scenarios}) == len(cfg.scenarios), "a scenario is listed twice")
    for s in cfg.scenarios:
        where_s = f"scenarios.{s.name}"
        need(isinstance(s.methods, list) and s.methods, f"{where_s}.methods must be a non-empty list")
        need(len(set(s.methods)) == len(s.methods), f"{where_s}.methods lists a method twice")
        bad = [m for m in s.methods if not isinstance(m, str) or m not in known_methods()]
        need(not bad, f"unknown method {bad[0]!r} in {where_s}.methods" if bad else "")
        need(isinstance(s.primary, str) and s.primary.startswith("test"),
             f"{where_s}.primary must name a test split (test_...), got {s.primary!r}")
        positive(s.target_size, f"{where_s}.target_size", allow_zero=True)
        need(s.curves is None or (isinstance(s.curves, list) and set(s.curves) <= set(s.methods)),
             f"{where_s}.curves must be null or a list of its methods, got {s.curves!r}")
        targeted = [m for m in s.methods if m.endswith("+target")]
        need(not targeted or s.target_size > 0,
             f"{where_s}.methods has {targeted[0] if targeted else ''} but target_size is 0")
        if s.name == "biased":
            need(s.pool_size is not None, f"{where_s}.pool_size is required")
            positive(s.pool_size, f"{where_s}.pool_size")
            need(s.pool_size >= cfg.budget * cfg.rounds,
                 f"{where_s}.pool_size ({s.pool_size}) is smaller than budget x rounds ({cfg.budget * cfg.rounds})")
            need(isinstance(s.pretrain_fraction, (int, float)) and 0 < s.pretrain_fraction < 1,
                 f"{where_s}.pretrain_fraction must be in (0, 1), got {s.pretrain_fraction!r}")
        else:
            need(s.pool_size is None, f"{where_s}.pool_size applies to the biased scenario only")
    everywhere = {m for s in cfg.scenarios for m in s.methods}
    for d in cfg.datasets:
        need(d.methods is None or (isinstance(d.methods, list) and d.methods and set(d.methods) <= everywhere),
             f"datasets[{d.name}].methods must be null or a non-empty list of the scenarios' methods, got {d.methods!r}")
        need(isinstance(d.name, str) and d.name.replace("_", "").isalnum(),
             f"dataset name {d.name!r} must be letters, digits and underscores")
        need(d.biased_source in ("pool", "pretrain"),
             f"datasets[{d.name}].biased_source must be 'pool' or 'pretrain', got {d.biased_source!r}")
        need(d.region is not None or d.biased_source == "pretrain"
             or all(s.name != "biased" for s in cfg.scenarios),
             f"datasets[{d.name}]: the biased scenario needs a 'region' (or biased_source: pretrain)")
        if d.max_pool is not None:
            positive(d.max_pool, f"datasets[{d.name}].max_pool")
            need(d.max_pool >= cfg.budget * cfg.rounds,
                 f"datasets[{d.name}].max_pool ({d.max_pool}) is smaller than budget x rounds "
                 f"({cfg.budget * cfg.rounds})")
        if d.max_test is not None:
            positive(d.max_test, f"datasets[{d.name}].max_test")
        for sname, sp in d.splits.items():
            positive(sp.skip, f"datasets[{d.name}].splits.{sname}.skip", allow_zero=True)
            if sp.take is not None:
                positive(sp.take, f"datasets[{d.name}].splits.{sname}.take")
            need(isinstance(sp.match, dict), f"datasets[{d.name}].splits.{sname}.match must be a mapping")
        if d.splits:
            for required in ("train", "pool"):
                need(required in d.splits, f"datasets[{d.name}].splits needs a '{required}' split")
            need(any(s.startswith("test") for s in d.splits),
                 f"datasets[{d.name}].splits needs at least one test split (a name starting with 'test')")
    _check_claims(cfg, need)


def _check_claims(cfg: StudyConfig, need) -> None:
    """Every claim names a known test, methods, quantities and scenarios (datasets the run lacks, as under
    --quick, leave the claim "not tested")."""
    ids = [c.id for c in cfg.claims]
    need(len(set(ids)) == len(ids), "two claims share an id")
    for c in cfg.claims:
        what = f"claims[{c.id}]"
        need(isinstance(c.text, str) and c.text.strip(), f"{what}.text must be a non-empty string")
        need(c.test in TESTS, f"{what}.test must be one of {', '.join(TESTS)}, got {c.test!r}")
        for m in (c.method, c.against):
            need(m in known_methods(), f"{what}: unknown method {m!r}")
        need(isinstance(c.quantities, list) and c.quantities and all(q in LABELS for q in c.quantities),
             f"{what}.quantities must be a non-empty list of {', '.join(LABELS)}, got {c.quantities!r}")
        need(c.scenarios is None or (isinstance(c.scenarios, list) and set(c.scenarios) <= set(SCENARIOS)),
             f"{what}.scenarios must be null or a list of {', '.join(SCENARIOS)}, got {c.scenarios!r}")
        need(c.datasets is None or (isinstance(c.datasets, list) and all(isinstance(d, str) for d in c.datasets)),
             f"{what}.datasets must be null or a list of dataset names, got {c.datasets!r}")
        if c.test in ("non_inferior", "less_variable", "reaches"):
            need(isinstance(c.threshold, (int, float)) and not isinstance(c.threshold, bool) and c.threshold > 0,
                 f"{what}.threshold must be a positive number for test {c.test}, got {c.threshold!r}")
        need(isinstance(c.rails, list) and c.rails and set(c.rails) <= set(ORACLES),
             f"{what}.rails must be a non-empty list of {', '.join(ORACLES)}, got {c.rails!r}")
        if c.test == "closes_gap":
            need(isinstance(c.threshold, (int, float)) and not isinstance(c.threshold, bool) and 0 < c.threshold <= 1,
                 f"{what}.threshold must be a share in (0, 1] for test closes_gap, got {c.threshold!r}")
        need(c.needed is None or (isinstance(c.needed, int) and c.needed > 0),
             f"{what}.needed must be null or a positive integer, got {c.needed!r}")


def _check_finetune(ft: FinetuneConfig, what: str, need, positive, number) -> None:
    need(ft.protocol in PROTOCOLS, f"{what}.protocol must be one of {', '.join(PROTOCOLS)}, got {ft.protocol!r}")
    positive(ft.epochs, f"{what}.epochs")
    positive(ft.batch_size, f"{what}.batch_size")
    positive(ft.valid_size, f"{what}.valid_size")
    positive(ft.replay_samples, f"{what}.replay_samples")
    positive(ft.replay_valid, f"{what}.replay_valid")
    number(ft.replay_weight, f"{what}.replay_weight")
    number(ft.lr, f"{what}.lr")
    number(ft.energy_weight, f"{what}.energy_weight")
    number(ft.forces_weight, f"{what}.forces_weight")
    need(ft.ema_decay is None or (isinstance(ft.ema_decay, float) and 0 < ft.ema_decay < 1),
         f"{what}.ema_decay must be null or a number in (0, 1), got {ft.ema_decay!r}")
    need(ft.dtype in ("float32", "float64"), f"{what}.dtype must be float32 or float64, got {ft.dtype!r}")
    need(isinstance(ft.extra_args, list) and all(isinstance(a, str) and a.startswith("--") for a in ft.extra_args),
         f"{what}.extra_args must be a list of '--option=value' strings")
