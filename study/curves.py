"""Once per dataset: a long fine-tune on the first seed's initial labelled set, per protocol, validated
every epoch on held-out target-region structures; the curve the study's epochs are read from.

Records go to results/<dataset>_finetune_curve.json ({protocol: {...}}, resumable per protocol): the
validation curve mace logged, wall and CPU seconds (per epoch too), and the pretrained and fine-tuned
models' errors on every test split, i.e. whether fine-tuning on target-region labels helps at all.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from .config import StudyConfig
from .datasets import load_dataset
from .finetune import finetune, foundation_e0s
from .metrics import evaluate_splits, predictor
from .runner import save_record, initial_set, region_tests


def run_curves(cfg: StudyConfig, out: Path, log: Callable[[str], None] = print) -> dict:
    """Run every missing (dataset, protocol) curve of the config into out/results/; returns the records."""
    results = Path(out) / "results"
    results.mkdir(parents=True, exist_ok=True)
    save_record(results / "config.json", cfg.to_dict())
    records = {}
    for dcfg in cfg.datasets:
        path = results / f"{dcfg.name}_finetune_curve.json"
        rec = json.loads(path.read_text()) if path.exists() else {}
        todo = [p for p in cfg.curve.protocols if p not in rec]
        if todo:
            ds = load_dataset(dcfg)
            e0s = foundation_e0s(ds.model)
            base = cfg.finetune_for(ds.name)
            init = initial_set(ds, cfg.initial_size, cfg.seeds[0])
            valid = ds.held_out_targets()[:cfg.curve.valid_size]
            replay, replay_valid, _ = ds.replay_split(base.replay_samples, base.replay_valid)
            tests = region_tests(ds, ds.tests)
            pre = evaluate_splits(predictor(ds.model, cfg.eval_dtype, cfg.eval_batch_size), tests)
            for protocol in todo:
                ft = dataclasses.replace(base, protocol=protocol, epochs=cfg.curve.epochs)
                tmp = Path(tempfile.mkdtemp(prefix=f"ntkal-curve-{ds.name}-{protocol}-"))
                try:
                    cpu0 = time.process_time()
                    res = finetune(ft, ds.model, init, valid, tmp, cfg.seeds[0], e0s, replay=replay,
                                   replay_valid=replay_valid)
                    cpu = time.process_time() - cpu0
                    after = evaluate_splits(predictor(res.model_path, cfg.eval_dtype, cfg.eval_batch_size), tests)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                rec[protocol] = {"epochs": ft.epochs, "n_labels": len(init), "n_valid": len(valid),
                                 "n_replay": len(replay) if protocol == "replay" else 0,
                                 "finetune": dataclasses.asdict(ft), "seconds": res.seconds, "cpu_s": cpu,
                                 "cpu_s_per_epoch": cpu / ft.epochs, "curve": res.curve,
                                 "pretrained_metrics": pre, "finetuned_metrics": after, "command": res.command}
                save_record(path, rec)
                log(f"[{ds.name}] fine-tune curve, {protocol}: {ft.epochs} epochs in {res.seconds:.0f} s "
                    f"({cpu:.0f} s CPU)")
        records[dcfg.name] = rec
    return records
