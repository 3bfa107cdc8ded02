"""Rounds x methods x seeds: select B -> label (look up REF labels) -> fine-tune -> evaluate.

Every (dataset, condition, seed) starts from one seeded initial labelled set and one shared round-0
fine-tune. Each method then runs its rounds; after every step the method's results JSON
(`results/<dataset>_<condition>/seed<s>/<method>.json`) is rewritten atomically, so a rerun skips what
is done (finished rounds are not repeated; the labelled set is rebuilt from the recorded picks).
Conditions: "natural" (the dataset's pool) and, for the pool-shift dataset, "shift" (a pool with
`target_fraction` of target-region structures, plus an unlabelled target sample for the +target runs).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from .acquisition import Picks, feature_picks, parse_method, random_picks, target_picks
from .committee import committee_select, member_seeds
from .config import PoolShiftConfig, StudyConfig
from .datasets import Dataset, load_dataset
from .features import FeatureStore
from .finetune import finetune, foundation_e0s
from .metrics import evaluate, load_model


@dataclass
class Condition:
    """One (dataset, pool condition, seed) cell of the study."""

    dataset: Dataset
    name: str                              # "natural" | "shift"
    seed: int
    pool: List
    tests: Dict[str, List]
    methods: List[str]
    target: Optional[List] = None          # unlabelled target-region sample (shift condition)
    region_key: Optional[str] = None
    target_value: str = "target"
    info: dict = field(default_factory=dict)
    budget: int = 0                        # structures per round
    rounds: int = 0

    @property
    def key(self) -> str:
        return f"{self.dataset.name}_{self.name}"


def _atomic_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_default) + "\n")
    tmp.replace(path)


def _default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _sha256(path) -> str:
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def machine() -> str:
    """CPU model, core count and torch threads: the box the timings come from."""
    import os
    import platform

    import torch
    model = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)"


def initial_set(ds: Dataset, size: int, seed: int) -> List:
    """A seeded draw of `size` structures from the dataset's train split (all of it if smaller)."""
    if len(ds.train) <= size:
        return list(ds.train)
    rng = np.random.default_rng([int(seed), 11])
    return [ds.train[i] for i in sorted(rng.choice(len(ds.train), size=size, replace=False))]


def region_tests(tests: Dict[str, List], key: Optional[str], value: str) -> Dict[str, List]:
    """The test splits plus '<split>:<value>' subsets where the split mixes regions."""
    out = dict(tests)
    if key is None:
        return out
    for name, items in tests.items():
        sub = [a for a in items if a.info.get(key) == value]
        if 0 < len(sub) < len(items):
            out[f"{name}:{value}"] = sub
    return out


def has_regions(ds: Dataset, key: str = "region") -> bool:
    return any(key in a.info for a in ds.pool[:50])


def shifted_pool(ds: Dataset, ps: PoolShiftConfig, seed: int):
    """(biased pool, held-out target sample, info): `target_fraction` of the pool from the target region."""
    rng = np.random.default_rng([int(seed), 23])
    targets = [a for a in ds.pool_all if a.info.get(ps.region_key) == ps.target_value]
    bases = [a for a in ds.pool_all if a.info.get(ps.region_key) != ps.target_value]
    n_t = int(round(ps.target_fraction * ps.pool_size))
    n_b = ps.pool_size - n_t
    if n_t + ps.target_size > len(targets) or n_b > len(bases):
        from .config import ConfigError
        raise ConfigError(f"pool_shift: dataset {ds.name} has {len(targets)} target-region and {len(bases)} other "
                          f"pool structures; {n_t} + {ps.target_size} target and {n_b} other are needed")
    t_perm = rng.permutation(len(targets))
    chosen_t = [targets[i] for i in t_perm[:n_t]]
    target_sample = [targets[i] for i in t_perm[n_t:n_t + ps.target_size]]
    chosen_b = [bases[i] for i in rng.choice(len(bases), size=n_b, replace=False)]
    order = {a.info["exp_id"]: i for i, a in enumerate(ds.pool_all)}
    pool = sorted(chosen_t + chosen_b, key=lambda a: order[a.info["exp_id"]])
    info = {"pool_size": len(pool), "pool_target": n_t, "pool_other": n_b,
            "natural_target_fraction": len(targets) / max(1, len(ds.pool_all)),
            "target_sample": [a.info["exp_id"] for a in target_sample]}
    return pool, target_sample, info


class Runner:
    """Runs a StudyConfig into `out/results/`; `log` receives one line per finished step."""

    def __init__(self, cfg: StudyConfig, out: Path, log: Callable[[str], None] = print):
        self.cfg, self.out, self.log = cfg, Path(out), log
        self.results = self.out / "results"
        self.stats = {"finetunes": 0, "finetune_s": 0.0, "evaluations": 0, "evaluate_s": 0.0}

    # ------------------------------------------------------------------ study
    def run(self) -> dict:
        t0, cpu0 = time.perf_counter(), time.process_time()
        cfg = self.cfg
        self.results.mkdir(parents=True, exist_ok=True)
        _atomic_json(self.results / "config.json", cfg.to_dict())
        datasets = {}
        for dcfg in cfg.datasets:
            ds = load_dataset(dcfg)
            datasets[ds.name] = ds
            self.log(f"[{ds.name}] train {len(ds.train)}, pool {len(ds.pool)} (of {len(ds.pool_all)}), tests "
                     + ", ".join(f"{k} {len(v)}" for k, v in ds.tests.items()))
        feature_seconds = {}
        for name, ds in datasets.items():
            store = FeatureStore(ds.model, cfg.selection)
            e0s = foundation_e0s(ds.model)
            region = "region" if has_regions(ds) else None
            for seed in cfg.seeds:
                cond = Condition(ds, "natural", seed, ds.pool, region_tests(ds.tests, region, "target"),
                                 list(cfg.methods), region_key=region, budget=cfg.budget, rounds=cfg.rounds)
                self.run_condition(cond, store, e0s)
            ps = cfg.pool_shift
            if ps is not None and ps.dataset == name:
                methods = list(ps.methods) + [f"{k}+target" for k in ps.target_kernels]
                for seed in ps.seeds:
                    pool, target, info = shifted_pool(ds, ps, seed)
                    cond = Condition(ds, "shift", seed, pool, region_tests(ds.tests, ps.region_key, ps.target_value),
                                     methods, target=target, region_key=ps.region_key,
                                     target_value=ps.target_value, info=info,
                                     budget=ps.budget or cfg.budget, rounds=ps.rounds or cfg.rounds)
                    self.run_condition(cond, store, e0s)
            feature_seconds[name] = {"seconds": store.seconds(), "structures": store.count(),
                                     "settings": store.settings}
            if sum(store.count().values()) > 0:   # a resumed run that featurised nothing keeps the old record
                _atomic_json(self.results / f"{name}_features.json", feature_seconds[name])
        wall = time.perf_counter() - t0
        previous = self.results / "run.json"
        invocations = json.loads(previous.read_text()).get("invocations", []) if previous.exists() else []
        invocations.append({"wall_s": wall, "cpu_s": time.process_time() - cpu0, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": cfg.quick,
                            **{k: v for k, v in self.stats.items() if not isinstance(v, str)}})
        summary = {"wall_s": wall, **self.stats, "invocations": invocations, "machine": machine(),
                   "datasets": {k: v.summary() for k, v in datasets.items()}, "features": feature_seconds}
        _atomic_json(previous, summary)
        return summary

    # ------------------------------------------------------------------ one condition
    def run_condition(self, cond: Condition, store: FeatureStore, e0s: str) -> None:
        cfg = self.cfg
        folder = self.results / cond.key / f"seed{cond.seed}"
        init = initial_set(cond.dataset, cfg.initial_size, cond.seed)
        valid = init[:cfg.finetune.valid_size]
        by_id = {a.info["exp_id"]: a for a in cond.pool}
        self._check_settings(folder, cond)
        tmp = Path(tempfile.mkdtemp(prefix=f"ntkal-exp-{cond.key}-s{cond.seed}-"))
        try:
            r0_path = folder / "round0.json"
            r0_model = None
            if r0_path.exists():
                r0 = json.loads(r0_path.read_text())
            else:
                pretrained = self._evaluate(cond.dataset.model, cond)
                r0_model, ft_s = self._finetune(init, valid, tmp / "round0", cond.seed, cond, e0s)
                r0 = {"n_labels": len(init), "labelled": [a.info["exp_id"] for a in init],
                      "metrics": self._evaluate(r0_model, cond), "finetune_s": ft_s, "condition": cond.info,
                      "pretrained_metrics": pretrained}
                _atomic_json(r0_path, r0)
            for method in cond.methods:
                self.run_method(cond, method, folder, init, valid, by_id, r0, r0_model, tmp, store, e0s)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _check_settings(self, folder: Path, cond: Condition) -> None:
        """Results in `folder` are resumed only if they were made with the same settings."""
        cfg = self.cfg.to_dict()
        wanted = {k: cfg[k] for k in ("initial_size", "budget", "rounds", "committee_size", "finetune", "selection")}
        wanted["dataset"] = next(d for d in cfg["datasets"] if d["name"] == cond.dataset.name)
        if cond.name == "shift":
            wanted["pool_shift"] = cfg["pool_shift"]
        wanted["data_sha256"] = {k: _sha256(v) for k, v in sorted(cond.dataset.files.items())}
        path = folder / "settings.json"
        if path.exists():
            old = json.loads(path.read_text())
            old.setdefault("data_sha256", wanted["data_sha256"])   # records from before data hashes were kept
            if old != json.loads(json.dumps(wanted, default=_default)):
                from .config import ConfigError
                diff = sorted(k for k in wanted if old.get(k) != json.loads(json.dumps(wanted[k], default=_default)))
                raise ConfigError(f"results in {folder} were made with other settings ({', '.join(diff)}); "
                                  "use another --out or delete that folder")
        else:
            _atomic_json(path, wanted)

    def run_method(self, cond, method, folder, init, valid, by_id, r0, r0_model, tmp, store, e0s) -> None:
        cfg = self.cfg
        path = folder / f"{method}.json"
        state = json.loads(path.read_text()) if path.exists() else None
        if state is None:
            state = {"dataset": cond.dataset.name, "condition": cond.name, "seed": cond.seed, "method": method,
                     "budget": cond.budget, "rounds": [dict(r0, round=0, shared_round0=True)]}
        rounds = state["rounds"]
        labelled = list(init)
        model_path = r0_model
        for r in range(cond.rounds + 1):
            if r >= len(rounds):     # fine-tune and evaluate on the labelled set of this round
                model_path, ft_s = self._finetune(labelled, valid, tmp / f"{method}-r{r}", cond.seed, cond, e0s)
                rounds.append({"round": r, "n_labels": len(labelled), "metrics": self._evaluate(model_path, cond),
                               "finetune_s": ft_s})
                _atomic_json(path, state)
                self._say(cond, method, rounds[r])
            elif r > 0:
                model_path = None    # trained in an earlier process: retrained only if the committee needs it
            if r == cond.rounds:
                self._drop(model_path, r0_model)
                break
            if "picks" in rounds[r]:
                labelled += [by_id[i] for i in rounds[r]["picks"]]
                continue
            taken = {a.info["exp_id"] for a in labelled}
            avail = [a for a in cond.pool if a.info["exp_id"] not in taken]
            picks = self._select(cond, method, labelled, avail, valid, r, model_path, tmp, store, e0s)
            self._drop(model_path, r0_model)
            chosen = [avail[i] for i in picks.positions]
            rounds[r].update({"picks": [a.info["exp_id"] for a in chosen], "acquisition_s": picks.seconds,
                              "acquisition": picks.detail})
            if cond.region_key is not None:
                rounds[r]["picks_target_fraction"] = float(np.mean(
                    [a.info.get(cond.region_key) == cond.target_value for a in chosen]))
            _atomic_json(path, state)
            labelled += chosen
        state["done"] = True
        _atomic_json(path, state)

    # ------------------------------------------------------------------ steps
    def _select(self, cond, method, labelled, avail, valid, r, model_path, tmp, store, e0s) -> Picks:
        cfg, sel = self.cfg, self.cfg.selection
        base, kernel, with_target = parse_method(method)
        seed = cond.seed
        if base == "random":
            return random_picks(len(avail), cond.budget, seed, r, f"{cond.key}:{method}")
        if with_target:
            return target_picks(store, kernel, labelled, avail, cond.target, cond.budget, sel)
        if kernel is not None:
            return feature_picks(store, kernel, "lcmd", labelled, avail, cond.budget, sel, seed)
        if base == "top":
            return feature_picks(store, sel.top_kernel, "top", labelled, avail, cond.budget, sel, seed)
        if base == "committee":
            seeds = member_seeds(seed, cfg.committee_size)
            paths, extra_s = [], 0.0
            for j, s in enumerate(seeds):
                if j == 0 and model_path is not None:
                    paths.append(model_path)   # the round's evaluated fine-tune is member 0
                    continue
                p, ft_s = self._finetune(labelled, valid, tmp / f"committee-r{r}-m{j}", s, cond, e0s)
                paths.append(p)
                if j > 0:
                    extra_s += ft_s
            t0 = time.perf_counter()
            pos, info = committee_select(paths, labelled, avail, cond.budget, seed, sel.shortlist, cfg.eval_batch_size)
            pred_s = time.perf_counter() - t0
            for p in paths[1:]:
                self._drop(p, None)
            info.update({"members": len(paths), "member_seeds": seeds, "extra_member_finetune_s": extra_s,
                         "predict_and_select_s": pred_s})
            return Picks(pos, extra_s + pred_s, info)
        raise ValueError(f"unknown method {method!r}")

    def _finetune(self, labelled, valid, workdir: Path, seed: int, cond: Condition, e0s: str):
        res = finetune(self.cfg.finetune, cond.dataset.model, labelled, valid, workdir, seed, e0s)
        self.stats["finetunes"] += 1
        self.stats["finetune_s"] += res.seconds
        self.stats.setdefault("finetune_command_example", res.command)
        return res.model_path, res.seconds

    @staticmethod
    def _drop(model_path, keep) -> None:
        """Delete a fine-tune's work folder (models, checkpoints) once it is no longer needed."""
        if model_path is not None and model_path != keep:
            shutil.rmtree(Path(model_path).parent, ignore_errors=True)

    def _evaluate(self, model_path, cond: Condition) -> dict:
        t0 = time.perf_counter()
        model = load_model(model_path)
        out = {name: evaluate(model, items, self.cfg.eval_batch_size) for name, items in cond.tests.items()}
        self.stats["evaluations"] += 1
        self.stats["evaluate_s"] += time.perf_counter() - t0
        return out

    def _say(self, cond: Condition, method: str, rnd: dict) -> None:
        first = next(iter(rnd["metrics"]))
        m = rnd["metrics"][first]
        self.log(f"[{cond.key} seed{cond.seed}] {method:<14} round {rnd['round']} n={rnd['n_labels']:<4} "
                 f"{first}: E MAE {m['e_mae']:.1f} meV/atom, F MAE {m['f_mae']:.1f} meV/A "
                 f"(fine-tune {rnd['finetune_s']:.1f} s)")
