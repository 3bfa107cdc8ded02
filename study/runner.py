"""Cells x methods x rounds: select B -> label (look up REF labels) -> fine-tune -> evaluate.

A cell is one (dataset, scenario, seed). Every cell starts from one seeded initial labelled set (target
region of the train split) and one shared round-0 fine-tune; each method then runs its rounds. After every
step the method's results JSON (`results/<dataset>_<scenario>/seed<s>/<method>.json`) is rewritten
atomically, so a rerun skips what is done (the labelled set is rebuilt from the recorded picks).
Scenarios: "natural" (the dataset's pool) and "biased" (`pretrain_fraction` of the pool from the
pretraining region, the rest from the target region, drawn per seed). `--shard i/n` runs the i-th of n
contiguous blocks of the ordered cell list, so two processes write disjoint cell folders and their own
`run-<shard>.json`; the report reads them all.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from scipy.stats import spearmanr

from ntkal.io import write_json
from ntkal.provenance import machine_summary
from ntkal.runstate import sha256_file

from .acquisition import Picks, feature_picks, oracle_picks, random_picks, target_picks
from .committee import committee_select, member_seeds
from .config import ConfigError, FinetuneConfig, ScenarioConfig, StudyConfig
from .datasets import Dataset, load_dataset
from .features import FeatureStore
from .finetune import finetune, foundation_e0s
from .methods import parse_method, pool_rows_variant
from .metrics import evaluate_splits, per_structure_errors, predictor


@dataclass(frozen=True)
class Cell:
    dataset: str
    scenario: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.dataset}_{self.scenario}"


def study_cells(cfg: StudyConfig) -> List[Cell]:
    """Every (dataset, scenario, seed) in config order."""
    return [Cell(d.name, s.name, seed) for d in cfg.datasets for s in cfg.scenarios for seed in cfg.seeds]


def parse_shard(text: Optional[str]) -> Tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like i/n (e.g. 0/2), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard {text}: need 0 <= i < n")
    return i, n


def shard_cells(cells: List[Cell], index: int, count: int) -> List[Cell]:
    """The index-th of `count` contiguous, near-equal blocks (contiguous: a dataset's cells stay together,
    so each process featurises few datasets)."""
    n = len(cells)
    lo, hi = round(index * n / count), round((index + 1) * n / count)
    return cells[lo:hi]


def finetune_count(cfg: StudyConfig, cell: Cell) -> int:
    """Fine-tunes one cell costs: the shared round 0; R per method with a learning curve, 1 (the last round)
    per other method; the committee's members in rounds 0 .. R-1 (member 0 is the round's evaluated
    fine-tune where there is one: round 0's shared one, and every round of a committee with a curve)."""
    scen = cfg.scenario(cell.scenario)
    methods = cfg.methods_for(cell.dataset, cell.scenario)
    curve = [scen.curves is None or m in scen.curves for m in methods]
    n = 1 + sum(cfg.rounds if c else 1 for c in curve)
    if "committee" in methods:
        with_curve = curve[methods.index("committee")]
        n += (cfg.committee_size - 1) + (cfg.rounds - 1) * (cfg.committee_size - (1 if with_curve else 0))
    return n


def plan_lines(cfg: StudyConfig, shards: int = 2) -> List[str]:
    """Cells and fine-tunes per dataset x scenario and per shard: the study's arithmetic before it runs."""
    cells = study_cells(cfg)
    lines = []
    for d in cfg.datasets:
        for s in cfg.scenarios:
            mine = [c for c in cells if c.dataset == d.name and c.scenario == s.name]
            lines.append(f"{d.name:>6} {s.name:<8} {len(mine)} cells x {finetune_count(cfg, mine[0])} fine-tunes "
                         f"({cfg.finetune_for(d.name).epochs} epochs)")
    for i in range(shards):
        part = shard_cells(cells, i, shards)
        lines.append(f"shard {i}/{shards}: {len(part)} cells, {sum(finetune_count(cfg, c) for c in part)} fine-tunes: "
                     + ", ".join(f"{c.key}/seed{c.seed}" for c in part))
    return lines


def shard_label(index: int, count: int) -> str:
    return "all" if count == 1 else f"{index}of{count}"


@dataclass
class Condition:
    """One cell, materialised: its pool, tests, labelled seed set and fine-tune recipe."""

    dataset: Dataset
    scenario: ScenarioConfig
    seed: int
    pool: List
    tests: Dict[str, List]
    methods: List[str]
    finetune: FinetuneConfig
    initial: List
    valid: List
    replay: List = field(default_factory=list)
    replay_valid: List = field(default_factory=list)
    target: Optional[List] = None          # unlabelled target-region sample ("+target" methods)
    info: dict = field(default_factory=dict)
    budget: int = 0
    rounds: int = 0

    @property
    def name(self) -> str:
        return self.scenario.name

    @property
    def key(self) -> str:
        return f"{self.dataset.name}_{self.scenario.name}"


def save_record(path: Path, obj) -> None:
    """Write one results JSON atomically (ntkal.io.write_json), NaN kept, unknown objects as strings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, obj, indent=1, default=str, allow_nan=True)


def initial_set(ds: Dataset, size: int, seed: int) -> List:
    """A seeded draw of `size` target-region structures of the train split (all of them if fewer)."""
    pool = ds.targets(ds.train)
    if not pool:
        raise ConfigError(f"dataset {ds.name}: the train split has no target-region structure")
    if len(pool) <= size:
        return list(pool)
    rng = np.random.default_rng([int(seed), 11])
    return [pool[i] for i in sorted(rng.choice(len(pool), size=size, replace=False))]


def region_tests(ds: Dataset, tests: Dict[str, List]) -> Dict[str, List]:
    """The test splits plus '<split>:target' subsets where the split mixes regions."""
    out = dict(tests)
    for name, items in tests.items():
        sub = ds.targets(items)
        if 0 < len(sub) < len(items):
            out[f"{name}:target"] = sub
    return out


def primary_split(scenario: ScenarioConfig, tests: Dict[str, List]) -> str:
    """The scenario's primary split, or its parent split when the dataset has no such region subset."""
    if scenario.primary in tests:
        return scenario.primary
    parent = scenario.primary.split(":")[0]
    if parent in tests:
        return parent
    raise ConfigError(f"scenario {scenario.name}: primary split {scenario.primary!r} is not a test split "
                      f"(have {', '.join(sorted(tests))})")


def biased_pool(ds: Dataset, scenario: ScenarioConfig, seed: int, pretrain_rest: List, biased_source: str):
    """(pool, info): round(pool_size * pretrain_fraction) pretraining-region structures (the natural pool's
    non-target ones, or the pretraining split minus the replay sample) and the rest target-region
    structures of the natural pool, drawn per seed."""
    rng = np.random.default_rng([int(seed), 23])
    n_b = int(round(scenario.pool_size * scenario.pretrain_fraction))
    n_t = scenario.pool_size - n_b
    bases = pretrain_rest if biased_source == "pretrain" else [a for a in ds.pool if not ds.is_target(a)]
    targets = ds.targets(ds.pool)
    if n_b > len(bases) or n_t > len(targets):
        raise ConfigError(f"biased pool of dataset {ds.name}: {n_b} pretraining-region and {n_t} target-region "
                          f"structures needed, {len(bases)} and {len(targets)} available")
    chosen = [bases[i] for i in sorted(rng.choice(len(bases), size=n_b, replace=False))]
    chosen += [targets[i] for i in sorted(rng.choice(len(targets), size=n_t, replace=False))]
    info = {"pool_size": len(chosen), "pool_target": n_t, "pool_pretraining_region": n_b,
            "pretraining_region_source": biased_source,
            "natural_target_fraction": len(targets) / max(1, len(ds.pool))}
    return chosen, info


class Runner:
    """Runs a StudyConfig's cells (or one shard of them) into `out/results/`; `log` gets a line per step."""

    def __init__(self, cfg: StudyConfig, out: Path, log: Callable[[str], None] = print, shard=(0, 1),
                 only: Optional[str] = None):
        self.cfg, self.out, self.log = cfg, Path(out), log
        self.shard = shard
        self.only = None if only is None else [n.strip() for n in str(only).split(",") if n.strip()]
        unknown = [n for n in self.only or [] if n not in [d.name for d in cfg.datasets]]
        if unknown or self.only == []:
            raise ConfigError(f"--only {only}: not a dataset of the config (have "
                              f"{', '.join(d.name for d in cfg.datasets)})")
        self.results = self.out / "results"
        self.stats = {"finetunes": 0, "finetune_s": 0.0, "finetune_cpu_s": 0.0, "evaluations": 0, "evaluate_s": 0.0}
        self.pre_errors: Dict[str, Dict[str, Tuple[float, float]]] = {}

    # ------------------------------------------------------------------ study
    def run(self) -> dict:
        import os
        t0, cpu0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
        cfg = self.cfg
        self.results.mkdir(parents=True, exist_ok=True)
        save_record(self.results / "config.json", cfg.to_dict())
        cells = [c for c in shard_cells(study_cells(cfg), *self.shard) if self.only is None or c.dataset in self.only]
        label = shard_label(*self.shard) + ("" if self.only is None else "-" + "-".join(self.only))
        datasets: Dict[str, Dataset] = {}
        for name in dict.fromkeys(c.dataset for c in cells):
            ds = load_dataset(cfg.dataset(name))
            datasets[name] = ds
            self.log(f"[{ds.name}] train {len(ds.train)} ({len(ds.targets(ds.train))} target), pool {len(ds.pool)} "
                     f"({len(ds.targets(ds.pool))} target) of {len(ds.pool_all)}, pretrain {len(ds.pretrain)}, tests "
                     + ", ".join(f"{k} {len(v)}" for k, v in ds.tests.items()))
        feature_seconds = {}
        for name, ds in datasets.items():
            store = FeatureStore(ds.model, cfg.selection)
            e0s = foundation_e0s(ds.model)
            for cell in (c for c in cells if c.dataset == name):
                self.run_condition(self.condition(ds, cell), store, e0s)
            feature_seconds[name] = {"seconds": store.seconds(), "structures": store.count(),
                                     "settings": store.settings}
            if sum(store.count().values()) > 0:   # a resumed run that featurised nothing keeps the old record
                save_record(self.results / f"{name}_features-{label}.json", feature_seconds[name])
        wall = time.perf_counter() - t0
        path = self.results / f"run-{label}.json"
        invocations = json.loads(path.read_text()).get("invocations", []) if path.exists() else []
        invocations.append({"wall_s": wall, "cpu_s": time.process_time() - cpu0,
                            "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": cfg.quick,
                            "loadavg_start": load0, "loadavg_end": os.getloadavg()[0],
                            "cells": [f"{c.key}/seed{c.seed}" for c in cells],
                            **{k: v for k, v in self.stats.items() if not isinstance(v, str)}})
        summary = {"wall_s": wall, "shard": label, **self.stats, "invocations": invocations,
                   "machine": machine_summary(), "datasets": {k: v.summary() for k, v in datasets.items()},
                   "features": feature_seconds}
        save_record(path, summary)
        return summary

    def condition(self, ds: Dataset, cell: Cell) -> Condition:
        """The cell's pool, tests, initial / validation / replay sets (all seeded, all disjoint)."""
        cfg = self.cfg
        scen, dcfg, ft = cfg.scenario(cell.scenario), cfg.dataset(ds.name), cfg.finetune_for(ds.name)
        replay, replay_valid, rest = ds.replay_split(ft.replay_samples, ft.replay_valid) if ds.pretrain else ([], [], [])
        held = ds.held_out_targets()
        need = cfg.curve.valid_size + scen.target_size
        if len(held) < need:
            raise ConfigError(f"dataset {ds.name}: {len(held)} target-region pool structures outside the natural "
                              f"pool; {cfg.curve.valid_size} validation + {scen.target_size} target needed "
                              "(lower max_pool?)")
        valid = held[:ft.valid_size]
        target = held[cfg.curve.valid_size:need] if scen.target_size else None
        info: dict = {}
        if scen.name == "biased":
            pool, info = biased_pool(ds, scen, cell.seed, rest, dcfg.biased_source)
        else:
            pool = list(ds.pool)
            info = {"pool_size": len(pool), "pool_target": len(ds.targets(pool))}
        tests = region_tests(ds, ds.tests)
        info.update({"primary_split": primary_split(scen, tests), "replay": len(replay), "valid": len(valid),
                     "target_sample": [a.info["exp_id"] for a in target] if target else []})
        return Condition(ds, scen, cell.seed, pool, tests, cfg.methods_for(ds.name, scen.name), ft,
                         initial_set(ds, cfg.initial_size, cell.seed), valid, replay, replay_valid, target, info,
                         budget=cfg.budget, rounds=cfg.rounds)

    # ------------------------------------------------------------------ one cell
    def run_condition(self, cond: Condition, store: FeatureStore, e0s: str) -> None:
        folder = self.results / cond.key / f"seed{cond.seed}"
        by_id = {a.info["exp_id"]: a for a in cond.pool}
        self._check_settings(folder, cond)
        pre_err = self.pretrained_errors(cond.dataset, cond.pool)
        tmp = Path(tempfile.mkdtemp(prefix=f"ntkal-exp-{cond.key}-s{cond.seed}-"))
        try:
            r0_path = folder / "round0.json"
            r0_model = None
            if r0_path.exists():
                r0 = json.loads(r0_path.read_text())
            else:
                pretrained = self._evaluate(cond.dataset.model, cond)
                r0_model, ft = self._finetune(cond.initial, tmp / "round0", cond.seed, cond, e0s)
                r0 = {"n_labels": len(cond.initial), "labelled": [a.info["exp_id"] for a in cond.initial],
                      "metrics": self._evaluate(r0_model, cond), **ft, "condition": cond.info,
                      "pretrained_metrics": pretrained}
                save_record(r0_path, r0)
            for method in cond.methods:
                self.run_method(cond, method, folder, by_id, r0, r0_model, tmp, store, e0s, pre_err)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _check_settings(self, folder: Path, cond: Condition) -> None:
        """Results in `folder` are resumed only if they were made with the same settings."""
        cfg = self.cfg.to_dict()
        wanted = {k: cfg[k] for k in ("initial_size", "budget", "rounds", "committee_size", "eval_dtype", "selection")}
        wanted["finetune"] = dict(cond.finetune.__dict__)
        wanted["scenario"] = {k: v for k, v in cfg["scenarios"][[s["name"] for s in cfg["scenarios"]].index(
            cond.name)].items() if k != "methods"}
        wanted["curve_valid_size"] = cfg["curve"]["valid_size"]
        wanted["dataset"] = {k: v for k, v in next(d for d in cfg["datasets"] if d["name"] == cond.dataset.name).items()
                             if k not in ("note", "epochs_reason", "methods")}  # a method added later runs on its own
        wanted["data_sha256"] = {k: sha256_file(v) for k, v in sorted(cond.dataset.files.items())}
        wanted = json.loads(json.dumps(wanted, default=str))
        path = folder / "settings.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old != wanted:
                diff = sorted(k for k in set(wanted) | set(old) if old.get(k) != wanted.get(k))
                raise ConfigError(f"results in {folder} were made with other settings ({', '.join(diff)}); "
                                  "use another --out or delete that folder")
        else:
            save_record(path, wanted)

    def pretrained_errors(self, ds: Dataset, structures) -> Dict[str, Tuple[float, float]]:
        """{exp_id: (|dE| meV/atom, force MAE meV/Å)} of the pretrained model, computed once per structure and
        kept in results/<dataset>_pretrained_errors.json (identical in every shard)."""
        have = self.pre_errors.setdefault(ds.name, {})
        path = self.results / f"{ds.name}_pretrained_errors.json"
        if not have and path.exists():
            have.update({k: tuple(v) for k, v in json.loads(path.read_text()).items()})
        todo = [a for a in structures if a.info["exp_id"] not in have]
        if todo:
            de, df = per_structure_errors(predictor(ds.model, self.cfg.eval_dtype, self.cfg.eval_batch_size), todo)
            have.update({a.info["exp_id"]: (float(e), float(f)) for a, e, f in zip(todo, de, df)})
            save_record(path, dict(sorted(have.items())))
        return have

    def run_method(self, cond, method, folder, by_id, r0, r0_model, tmp, store, e0s, pre_err) -> None:
        path = folder / f"{method}.json"
        state = json.loads(path.read_text()) if path.exists() else None
        if state is None:
            state = {"dataset": cond.dataset.name, "condition": cond.name, "seed": cond.seed, "method": method,
                     "budget": cond.budget, "rounds": [dict(r0, round=0, shared_round0=True)]}
        if state.get("done"):
            return
        rounds = state["rounds"]
        labelled = list(cond.initial)
        model_path = r0_model
        curve = cond.scenario.curves is None or method in cond.scenario.curves
        for r in range(cond.rounds + 1):
            if r >= len(rounds) and not (curve or r == cond.rounds):   # picks only: no fine-tune this round
                model_path = None
                rounds.append({"round": r, "n_labels": len(labelled)})
            elif r >= len(rounds):     # fine-tune and evaluate on the labelled set of this round
                model_path, ft = self._finetune(labelled, tmp / f"{method}-r{r}", cond.seed, cond, e0s)
                rounds.append({"round": r, "n_labels": len(labelled), "metrics": self._evaluate(model_path, cond), **ft})
                save_record(path, state)
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
            picks = self._select(cond, method, labelled, avail, r, model_path, tmp, store, e0s, pre_err)
            self._drop(model_path, r0_model)
            chosen = [avail[i] for i in picks.positions]
            detail = dict(picks.detail)
            pool_scores = detail.pop("pool_scores", None)
            rounds[r].update({"picks": [a.info["exp_id"] for a in chosen], "acquisition_s": picks.seconds,
                              "acquisition": detail,
                              "cheap": cheap_metrics(pre_err, chosen, avail, cond.dataset.is_target, pool_scores),
                              "picks_target_fraction": float(np.mean([cond.dataset.is_target(a) for a in chosen]))})
            save_record(path, state)
            labelled += chosen
        state["done"] = True
        save_record(path, state)

    # ------------------------------------------------------------------ steps
    def _select(self, cond, method, labelled, avail, r, model_path, tmp, store, e0s, pre_err) -> Picks:
        """The seam with acquisition.py: one round's Picks for `method`. Picks.detail may carry
        "pool_scores" (one score per `avail` structure, higher = picked first) for Spearman(score, error)."""
        cfg, sel = self.cfg, self.cfg.selection
        plain, variant = pool_rows_variant(method)
        base, kernel, with_target = parse_method(method)
        seed = cond.seed
        if base == "random":
            return random_picks(len(avail), cond.budget, seed, r, f"{cond.key}:{method}")
        if base == "oracle":   # the rails: real force errors of the pretrained model (the model selectors see)
            real = np.array([pre_err[a.info["exp_id"]][1] for a in avail])
            return oracle_picks(kernel, real, store, labelled, avail, cond.budget)
        if with_target:
            return target_picks(store, kernel, labelled, avail, cond.target, cond.budget, sel)
        if kernel is not None and plain == base:
            return feature_picks(store, kernel, "lcmd", labelled, avail, cond.budget, sel, seed, pool_rows=variant)
        if base == "top":
            return feature_picks(store, sel.top_kernel, "top", labelled, avail, cond.budget, sel, seed)
        if base in ("error", "error+pretrain"):  # the pretraining sample a fine-tuning user has: the replay data
            pretrain = cond.replay if base == "error+pretrain" else ()
            return feature_picks(store, kernel, "lcmd", labelled, avail, cond.budget, sel, seed, score="error",
                                 pretrain=pretrain, pool_rows=variant)
        if base == "llpr":
            return feature_picks(store, "readout", "lcmd", labelled, avail, cond.budget, sel, seed)
        if base == "committee":
            seeds = member_seeds(seed, cfg.committee_size)
            paths, extra_s = [], 0.0
            for j, s in enumerate(seeds):
                if j == 0 and model_path is not None:
                    paths.append(model_path)   # the round's evaluated fine-tune is member 0
                    continue
                p, ft = self._finetune(labelled, tmp / f"committee-r{r}-m{j}", s, cond, e0s)
                paths.append(p)
                if j > 0:
                    extra_s += ft["finetune_s"]
            t0 = time.perf_counter()
            pos, info = committee_select(paths, labelled, avail, cond.budget, seed, sel.shortlist, cfg.eval_batch_size)
            pred_s = time.perf_counter() - t0
            for p in paths[1:]:
                self._drop(p, None)
            info.update({"members": len(paths), "member_seeds": seeds, "extra_member_finetune_s": extra_s,
                         "predict_and_select_s": pred_s})
            return Picks(pos, extra_s + pred_s, info)
        raise ConfigError(f"method {method!r} is known (study/methods.py) but Runner._select has no branch for it")

    def _finetune(self, labelled, workdir: Path, seed: int, cond: Condition, e0s: str):
        """(model path, {"finetune_s", "finetune_cpu_s", "valid_curve"}) of one fine-tune of the pretrained model."""
        cpu0 = time.process_time()
        res = finetune(cond.finetune, cond.dataset.model, labelled, cond.valid, workdir, seed, e0s,
                       replay=cond.replay, replay_valid=cond.replay_valid)
        cpu = time.process_time() - cpu0
        self.stats["finetunes"] += 1
        self.stats["finetune_s"] += res.seconds
        self.stats["finetune_cpu_s"] += cpu
        self.stats.setdefault("finetune_command_example", res.command)
        return res.model_path, {"finetune_s": res.seconds, "finetune_cpu_s": cpu, "valid_curve": res.curve}

    @staticmethod
    def _drop(model_path, keep) -> None:
        """Delete a fine-tune's work folder (models, checkpoints) once it is no longer needed."""
        if model_path is not None and model_path != keep:
            shutil.rmtree(Path(model_path).parent, ignore_errors=True)

    def _evaluate(self, model_path, cond: Condition) -> dict:
        t0 = time.perf_counter()
        out = evaluate_splits(predictor(model_path, self.cfg.eval_dtype, self.cfg.eval_batch_size), cond.tests)
        self.stats["evaluations"] += 1
        self.stats["evaluate_s"] += time.perf_counter() - t0
        return out

    def _say(self, cond: Condition, method: str, rnd: dict) -> None:
        split = cond.info["primary_split"]
        m = rnd["metrics"][split]
        self.log(f"[{cond.key} seed{cond.seed}] {method:<22} round {rnd['round']} n={rnd['n_labels']:<4} "
                 f"{split}: E MAE {m['e_mae']:.1f} meV/atom, F MAE {m['f_mae']:.1f} meV/A "
                 f"(fine-tune {rnd['finetune_s']:.1f} s, {rnd['finetune_cpu_s']:.1f} s CPU)")


def cheap_metrics(pre_err: Dict[str, Tuple[float, float]], chosen, avail, is_target, pool_scores=None) -> dict:
    """What needs no fine-tune: the picks' mean pretrained-model error over the available pool's (energy and
    force), the target share of picks and pool, and Spearman(score, pretrained error) over the available
    pool when the method gave a score to every available structure."""
    pe = np.array([pre_err[a.info["exp_id"]] for a in avail])
    ce = np.array([pre_err[a.info["exp_id"]] for a in chosen])
    out = {"pick_pool_error_ratio_e": float(ce[:, 0].mean() / pe[:, 0].mean()),
           "pick_pool_error_ratio_f": float(ce[:, 1].mean() / pe[:, 1].mean()),
           "picks_mean_error_e": float(ce[:, 0].mean()), "picks_mean_error_f": float(ce[:, 1].mean()),
           "pool_mean_error_e": float(pe[:, 0].mean()), "pool_mean_error_f": float(pe[:, 1].mean()),
           "picks_target_share": float(np.mean([is_target(a) for a in chosen])),
           "pool_target_share": float(np.mean([is_target(a) for a in avail]))}
    if pool_scores is not None:
        scores = np.asarray(pool_scores, dtype=np.float64)
        if scores.shape == (len(avail),):
            out["spearman_score_error_e"] = float(spearmanr(scores, pe[:, 0]).statistic)
            out["spearman_score_error_f"] = float(spearmanr(scores, pe[:, 1]).statistic)
    return out
