"""The study's records read back: every method's results JSON under results/<dataset>_<scenario>/seed<s>/,
grouped per (dataset, scenario) cell for the report and the claims."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .stats import labels_to_reach, mean_sd, paired_difference


def load_runs(results: Path) -> List[dict]:
    """Every method's results JSON under results/<dataset>_<scenario>/seed<s>/."""
    runs = []
    for path in sorted(Path(results).glob("*_*/seed*/*.json")):
        if path.name in ("round0.json", "settings.json"):
            continue
        d = json.loads(path.read_text())
        if "method" in d and isinstance(d.get("rounds"), list):
            runs.append(d)
    return runs


def _order(methods, order: Sequence[str]) -> List[str]:
    """`order`'s methods first (the config's order), then the rest by name."""
    methods = set(methods)
    return [m for m in dict.fromkeys(order) if m in methods] + sorted(methods - set(order))


class Records:
    """The runs of one (dataset, scenario): per method, per seed, the evaluated rounds; methods listed in
    `order` first."""

    def __init__(self, runs: List[dict], dataset: str, scenario: str, order: Sequence[str] = ()):
        self.by_method: Dict[str, Dict[int, List[dict]]] = defaultdict(dict)   # evaluated rounds only
        self.picked: Dict[str, Dict[int, List[dict]]] = defaultdict(dict)      # every round (picks, cheap)
        for run in runs:
            if run["dataset"] == dataset and run["condition"] == scenario:
                self.by_method[run["method"]][run["seed"]] = [r for r in run["rounds"] if "metrics" in r]
                self.picked[run["method"]][run["seed"]] = list(run["rounds"])
        self.methods = _order(self.by_method, order)
        first = next((rs[0] for seeds in self.by_method.values() for rs in seeds.values() if rs), {})
        self.info = first.get("condition", {})
        self.primary = self.info.get("primary_split", "test_id")

    def __bool__(self):
        return bool(self.by_method)

    def seeds(self, method: str) -> List[int]:
        return sorted(self.by_method.get(method, {}))

    def final(self, method: str, split: str, key: str) -> Dict[int, float]:
        """seed -> error at the method's last evaluated round (only seeds that finished every round)."""
        out = {}
        n_rounds = max((len(r) for r in self.by_method.get(method, {}).values()), default=0)
        for seed, rounds in self.by_method.get(method, {}).items():
            if len(rounds) == n_rounds and split in rounds[-1]["metrics"]:
                out[seed] = rounds[-1]["metrics"][split][key]
        return out

    def final_mean(self, method: str, key: str) -> float:
        """Mean over seeds of the method's final error on the primary split (NaN without records)."""
        return mean_sd(list(self.final(method, self.primary, key).values()))["mean"]

    def difference(self, a: str, b: str, key: str) -> dict:
        """Per-seed difference a - b of the final errors on the primary split, with its t-interval."""
        return paired_difference(self.final(a, self.primary, key), self.final(b, self.primary, key))

    def reach(self, method: str, key: str, ref: str = "random"):
        """(labels at which the method's mean curve reaches `ref`'s final mean error, their ratio to `ref`'s
        final labels, (seeds whose own curve reaches their `ref` seed's final error, seeds)); Nones without
        records."""
        base = self.curve(ref, self.primary, key)
        if not base or method not in self.by_method:
            return None, None, None
        n_final = max(base)
        cur = self.curve(method, self.primary, key)
        ns = sorted(cur)
        got = labels_to_reach(ns, [float(np.mean(cur[n])) for n in ns], float(np.mean(base[n_final])))
        per_seed = []
        ref_final = self.final(ref, self.primary, key)
        for seed in self.seeds(method):
            if seed in ref_final:
                n, e = self.seed_curve(method, seed, self.primary, key)
                per_seed.append(labels_to_reach(n, e, ref_final[seed]) is not None)
        return got, (got / n_final if got is not None else None), (sum(per_seed), len(per_seed))

    def has_curve(self, method: str, ref: str = "random") -> bool:
        """Was the method fine-tuned after every round `ref` was (a learning curve, not round 0 and the end)?"""
        mine = {r["n_labels"] for rounds in self.by_method.get(method, {}).values() for r in rounds}
        theirs = {r["n_labels"] for rounds in self.by_method.get(ref, {}).values() for r in rounds}
        return len(mine) > 2 or (bool(mine) and len(mine) >= len(theirs))

    def final_labels(self, method: str) -> Optional[int]:
        rs = [r[-1]["n_labels"] for r in self.by_method.get(method, {}).values() if r]
        return max(rs) if rs else None

    def curve(self, method: str, split: str, key: str) -> Dict[int, List[float]]:
        """n_labels -> per-seed values."""
        out: Dict[int, List[float]] = defaultdict(list)
        for rounds in self.by_method.get(method, {}).values():
            for r in rounds:
                if split in r["metrics"]:
                    out[r["n_labels"]].append(r["metrics"][split][key])
        return dict(sorted(out.items()))

    def seed_curve(self, method: str, seed: int, split: str, key: str):
        rounds = self.by_method.get(method, {}).get(seed, [])
        return [r["n_labels"] for r in rounds], [r["metrics"][split][key] for r in rounds if split in r["metrics"]]

    def pretrained(self, split: str, key: str) -> List[float]:
        return list(self.pretrained_by_seed(split, key).values())

    def round0(self, split: str, key: str) -> Dict[int, float]:
        return self._first_round(split, key, "metrics")

    def pretrained_by_seed(self, split: str, key: str) -> Dict[int, float]:
        return self._first_round(split, key, "pretrained_metrics")

    def _first_round(self, split: str, key: str, field: str) -> Dict[int, float]:
        """seed -> round 0's `field` ("metrics": the round-0 fine-tune, "pretrained_metrics") value."""
        vals = {}
        for seeds in self.by_method.values():
            for seed, rounds in seeds.items():
                got = rounds[0].get(field, {}) if rounds else {}
                if split in got:
                    vals[seed] = got[split][key]
        return vals

    def splits(self) -> List[str]:
        names = set()
        for seeds in self.by_method.values():
            for rounds in seeds.values():
                for r in rounds:
                    names.update(r["metrics"])
        return sorted(names, key=lambda s: (s != self.primary, s.split(":")[0] != "test_id", s))

    def acquisition(self, method: str):
        """(fresh seconds per round, seconds with the pool's features reused), over rounds and seeds."""
        fresh, reuse = [], []
        for rounds in self.picked.get(method, {}).values():
            for r in rounds:
                if r.get("acquisition_s") is not None:
                    fresh.append(r["acquisition_s"])
                    reuse.append(r["acquisition_s"] - (r.get("acquisition") or {}).get("features_pool_s", 0.0))
        return fresh, reuse

    def cheap(self, method: str, key: str) -> List[float]:
        out = []
        for rounds in self.picked.get(method, {}).values():
            for r in rounds:
                v = (r.get("cheap") or {}).get(key)
                if v is not None and math.isfinite(v):
                    out.append(v)
        return out

    def finetune_times(self):
        wall, cpu = [], []
        for seeds in self.by_method.values():
            for rounds in seeds.values():
                for r in rounds[1:]:
                    if "finetune_s" in r:
                        wall.append(r["finetune_s"])
                        cpu.append(r.get("finetune_cpu_s", math.nan))
        return wall, cpu
