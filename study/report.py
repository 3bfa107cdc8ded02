"""docs/results.md from the study's records alone: how it was run, the fine-tune curves and the check that
fine-tuning helps, per (dataset, scenario) learning curves with bands, final errors with paired
differences to random (95 % t-intervals over seeds), labels needed to reach random's final error, the
cheap acquisition metrics and acquisition times, and a verdict on each claim the config declares
(study/claims.py judges them on the records).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ntkal.io.write import figure, save_png

from scipy.stats import spearmanr

from .claims import CHEAP, Claim, describe, judge
from .fmt import ci, msd, num, pct, side
from .methods import ORACLES, is_rail
from .rails import gap_closure, resolving
from .records import Records, load_runs
from .stats import mean_sd, paired_difference, t_interval


REPO = Path(__file__).resolve().parents[1]


def _reach_text(rec: Records, method: str, key: str) -> str:
    if not rec.has_curve(method):
        return "– (no curve)"
    got, ratio, seeds = rec.reach(method, key)
    if seeds is None:
        return "–"
    if got is None:
        return f"not reached ({seeds[0]}/{seeds[1]} seeds)"
    return f"{got:.0f} ({100 * ratio:.0f} %; {seeds[0]}/{seeds[1]} seeds)"


# ---------------------------------------------------------------------- figures
def plot_learning_curves(rec: Records, title: str, path: Path) -> None:
    fig, axes = figure(1, 2, figsize=(11, 4.2))
    for ax, (key, label) in zip(axes, (("e_mae", "E MAE (meV/atom)"), ("f_mae", "F MAE (meV/Å)"))):
        for k, m in enumerate(rec.methods):
            cur = rec.curve(m, rec.primary, key)
            ns = np.array(sorted(cur), dtype=float)
            mean = np.array([np.mean(cur[n]) for n in sorted(cur)])
            sd = np.array([np.std(cur[n], ddof=1) if len(cur[n]) > 1 else 0.0 for n in sorted(cur)])
            if len(ns) <= 2 and len(ns) < len(rec.curve("random", rec.primary, key)):
                # fine-tuned after the last round only: its final point (mean ± sd), no line through the rounds
                ax.errorbar(ns[-1:], mean[-1:], yerr=sd[-1:], fmt="s", ms=4, capsize=2, color=f"C{k % 10}", label=m)
                continue
            style = "--" if m in ("random", "committee") else "-"
            ax.plot(ns, mean, style, marker="o", ms=3, color=f"C{k % 10}", label=m)
            ax.fill_between(ns, mean - sd, mean + sd, color=f"C{k % 10}", alpha=0.12)
        pre = rec.pretrained(rec.primary, key)
        if pre:
            ax.axhline(float(np.mean(pre)), color="0.4", ls=":", lw=1, label="pretrained")
        ax.set_xlabel("labelled structures")
        ax.set_ylabel(f"{label}, {rec.primary}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, frameon=False, ncol=2)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, path)


def plot_finetune_curve(rec: dict, chosen: Optional[int], title: str, path: Path) -> None:
    fig, axes = figure(1, 3, figsize=(13, 3.8))
    panels = (("loss", "validation loss / its value before training", None),
              ("mae_e_per_atom", "valid E MAE (meV/atom)", 1e3), ("mae_f", "valid F MAE (meV/Å)", 1e3))
    for k, (protocol, r) in enumerate(sorted(rec.items())):
        pts = [p for p in r["curve"].get("Default", []) if p.get("loss") is not None]
        ep = [p["epoch"] + 1 for p in pts]            # 0 = before training, n = after n epochs
        for ax, (key, label, scale) in zip(axes, panels):
            # the protocols' losses differ in kind (mace: "universal" for multihead, weighted MSE otherwise)
            s = scale if scale is not None else 1.0 / pts[0][key]
            ax.plot(ep, [s * p[key] if p.get(key) is not None else np.nan for p in pts], marker=".",
                    color=f"C{k}", label=protocol)
            ax.set_xlabel("epochs")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    for ax in axes:
        if chosen:
            ax.axvline(chosen, color="0.3", ls="--", lw=1)
    axes[0].legend(fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, path)


def flat_epoch(points: List[dict], key: str = "loss", within: float = 0.05):
    """(epochs at the lowest validation `key`, first epoch count within `within` (relative) of that lowest
    value): where further training gains less than `within`. Epoch 0 = before training."""
    vals = [(p["epoch"] + 1, p[key]) for p in points if p.get(key) is not None]
    if not vals:
        return None, None
    best_ep, lo = min(vals, key=lambda t: t[1])
    first = next(ep for ep, v in vals if v <= lo * (1 + within))
    return best_ep, first


# ---------------------------------------------------------------------- sections
def _how_run(results: Path, out: Path) -> List[str]:
    lines = ["## How it was run", ""]
    shards = [json.loads(p.read_text()) for p in sorted(results.glob("run-*.json"))]
    spans = {id(s): _spans(s) for s in shards}
    # a shard one of whose invocations overlaps an invocation of a group ran beside it ("&"); the rest ran
    # after; shards that say nothing of their times come last
    groups: List[list] = []
    for s in sorted(shards, key=lambda s: min((a for a, _ in spans[id(s)]), default=math.inf)):
        sp = spans[id(s)]
        beside = [g for g in groups if any(a < d and c < b for a, b in sp for c, d in g[1])]
        merged = [[x for g in beside for x in g[0]] + [s], [x for g in beside for x in g[1]] + list(sp)]
        groups = [g for g in groups if not any(g is b for b in beside)] + [merged]
    groups.sort(key=lambda g: min((a for a, _ in g[1]), default=math.inf))
    runs = [" & ".join(f"python -m study {_invocation(s.get('shard', 'all'))}--out DIR" for s in g) + "; wait"
            for g, _ in groups] or ["python -m study --shard 0/2 --out DIR & python -m study --shard 1/2 --out DIR; wait"]
    lines += ["```", "python -m study --curves --out DIR        # fine-tune curves, once", *runs,
              f"python -m study --report-only --out DIR   # this page (DIR = {out})", "```", ""]
    if not shards:
        return lines + ["No run records (results/run-*.json).", ""]
    for s in shards:
        inv = s.get("invocations", [])
        wall = sum(i.get("wall_s", 0.0) for i in inv)
        cpu = sum(i.get("cpu_s", 0.0) for i in inv)
        n_ft = sum(i.get("finetunes", 0) for i in inv)
        ft_s = sum(i.get("finetune_s", 0.0) for i in inv)
        ft_cpu = sum(i.get("finetune_cpu_s", 0.0) for i in inv)
        loads = [x for i in inv for x in (i.get("loadavg_start"), i.get("loadavg_end")) if x is not None]
        load = f"; 1-min load average {min(loads):.1f}–{max(loads):.1f} at starts/ends" if loads else ""
        lines.append(f"- shard {s.get('shard', '?')}: {len(inv)} invocation(s), {wall / 60:.1f} min wall, "
                     f"{cpu / 60:.1f} min process CPU; {n_ft} fine-tunes took {ft_s / 60:.1f} min wall "
                     f"({ft_cpu / 60:.1f} min CPU){load}; {s.get('machine', '?')}")
    every = [sp for g in groups for sp in g[1]]
    if every:
        busy = _union_length(every)
        lines.append(f"- running time: {busy / 60:.1f} min (the time at least one shard was running; "
                     f"{(max(b for _, b in every) - min(a for a, _ in every)) / 60:.1f} min from the first start "
                     "to the last finish, pauses between invocations included)")
    return lines + [""]


def _spans(shard: dict) -> List[tuple]:
    """(start, end) in seconds since the epoch of each invocation of a run record that says when it finished."""
    spans = []
    for i in shard.get("invocations", []):
        try:
            end = time.mktime(time.strptime(i["finished"], "%Y-%m-%d %H:%M:%S"))
        except (KeyError, ValueError):
            continue
        spans.append((end - i.get("wall_s", 0.0), end))
    return spans


def _union_length(spans) -> float:
    """Total length of the union of (start, end) intervals."""
    total, cur = 0.0, None
    for a, b in sorted(spans):
        if cur is None or a > cur[1]:
            total += 0.0 if cur is None else cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    return total + (0.0 if cur is None else cur[1] - cur[0])


def _invocation(label: str) -> str:
    """The flags a run record's shard label stands for: "0of2" -> "--shard 0/2 ", "all-a-b" -> "--only a,b "."""
    shard, _, only = label.partition("-")
    out = "" if shard == "all" else "--shard " + shard.replace("of", "/") + " "
    return out + (f"--only {only.replace('-', ',')} " if only else "")


def _setup(cfg: dict, run_info: dict) -> List[str]:
    ft = cfg.get("finetune", {})
    lines = ["## Set-up", "",
             f"- schedule: {cfg.get('initial_size')} labelled target-region structures to start (seeded draw from "
             f"the train split), {cfg.get('rounds')} rounds of {cfg.get('budget')}; seeds {cfg.get('seeds')}: seed s "
             "fixes the initial set, the fine-tune seed (and a biased pool's draw) for every method, so methods are "
             "compared seed by seed (paired).",
             f"- fine-tuning ({ft.get('protocol')} protocol): `mace_run_train --foundation_model` "
             + ("`--multiheads_finetuning True` with "
                f"{ft.get('replay_samples')} structures of the dataset's pretraining split as the pt_head's replay data "
                f"(weight {ft.get('replay_weight')}); the model is evaluated with its 'Default' head; "
                if ft.get("protocol") == "replay" else "alone (one head, labelled set only); ")
             + f"batch {ft.get('batch_size')}, lr {ft.get('lr')}, energy/force weights {ft.get('energy_weight')}/"
             f"{ft.get('forces_weight')}, EMA {ft.get('ema_decay')}, {ft.get('dtype')}, validation on "
             f"{ft.get('valid_size')} held-out target-region structures, last epoch kept, fine-tune seed = study "
             "seed, E0s of the pretrained model. Epochs per dataset below.",
             f"- committee: {cfg.get('committee_size')} members fine-tuned the same way (seeds s, s+1000, …); its "
             "acquisition time counts the extra members' fine-tunes and all members' predictions.",
             "- NTK / embedding / error-aware / LLPR methods use the ONE pretrained model's features; acquisition time "
             "is what a fresh call would spend, and the 'features reused' column leaves out the pool's "
             "featurisation (computed once per campaign with a fixed pretrained model).",
             "- errors: energies per atom (meV/atom), forces per component (meV/Å); the *primary split* of a "
             "scenario is the one the verdicts use.", ""]
    for s in cfg.get("scenarios", []):
        extra = (f"pool of {s.get('pool_size')}: {100 * s.get('pretrain_fraction', 0):.0f} % pretraining region, "
                 "the rest target region, drawn per seed; " if s["name"] == "biased" else "the dataset's pool; ")
        lines.append(f"- scenario **{s['name']}**: {extra}primary split {s.get('primary')}; methods "
                     + ", ".join(f"`{m}`" for m in s.get("methods", [])) + "."
                     + ("" if s.get("curves") is None else " Fine-tuned after every round (learning curves): "
                        + ", ".join(f"`{m}`" for m in s["curves"]) + "; the others after the last round only "
                        "(their picks are made every round all the same)."))
    everywhere = {m for s in cfg.get("scenarios", []) for m in s.get("methods", [])}
    for s in cfg.get("scenarios", []):
        left_out = sorted(everywhere - set(s.get("methods", [])))
        if left_out:
            lines.append(f"- not run in **{s['name']}** (why: the config's comments, "
                         f"study/configs/study.yaml for the shipped study): "
                         + ", ".join(f"`{m}`" for m in left_out) + ".")
    lines.append("")
    for d in cfg.get("datasets", []):
        info = run_info.get(d["name"], {})
        eps = {**ft, **(d.get("finetune") or {})}.get("epochs")
        desc = (f"pool {info.get('n_pool')} ({info.get('n_pool_target')} target region), train split "
                f"{info.get('n_train')} ({info.get('n_train_target')} target), pretraining split {info.get('n_pretrain')}; "
                "tests " + ", ".join(f"{k} {v}" for k, v in info.get("tests", {}).items()) + ". " if info else "")
        region = d.get("region") or {}
        only = ("" if not d.get("methods") else " Methods run here: " + ", ".join(f"`{m}`" for m in d["methods"])
                + " (the rest of the scenario's list runs on the other scenario of its family).")
        lines.append(f"- **{d['name']}**{' (' + d['family'] + ')' if d.get('family') else ''}: {d.get('note', '')}. "
                     f"Target region: info['{region.get('key')}'] in {region.get('target')}. {desc}Fine-tune epochs "
                     f"{eps}: {d.get('epochs_reason') or '(no reason given)'}{only}")
    return lines + [""]


def _finetune_section(results: Path, figs: Path, cfg: dict, recs: Dict[tuple, Records]) -> List[str]:
    lines = ["## Fine-tuning: the curves, and does it help?", ""]
    ft = cfg.get("finetune", {})
    for d in cfg.get("datasets", []):
        name = d["name"]
        chosen = {**ft, **(d.get("finetune") or {})}.get("epochs")
        path = results / f"{name}_finetune_curve.json"
        lines += [f"### {name}", ""]
        if path.exists():
            crec = json.loads(path.read_text())
            png = figs / f"{name}_finetune_curve.png"
            plot_finetune_curve(crec, chosen, f"{name}: fine-tune on the first seed's initial set, validated on "
                                f"held-out target-region structures (dashed: the study's {chosen} epochs)", png)
            lines += [f"![{name} fine-tune curve](figures/{png.name})", "",
                      "| protocol | labels | replay | epochs | s / epoch (CPU) | lowest validation loss after | "
                      "within 5 % of it after | split | E MAE pretrained → fine-tuned | F MAE pretrained → fine-tuned |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for protocol, r in sorted(crec.items()):
                best, first = flat_epoch(r["curve"].get("Default", []))
                for split in sorted(r["finetuned_metrics"]):
                    pre, aft = r["pretrained_metrics"][split], r["finetuned_metrics"][split]
                    lines.append(f"| {protocol} | {r['n_labels']} | {r['n_replay']} | {r['epochs']} | "
                                 f"{num(r['cpu_s_per_epoch'], 2)} | {best} | {first} | {split} | "
                                 f"{num(pre['e_mae'])} → {num(aft['e_mae'])} | {num(pre['f_mae'])} → {num(aft['f_mae'])} |")
            lines.append("")
        else:
            lines += ["No fine-tune curve record (run `--curves`).", ""]
        rows = []
        for scen in [s["name"] for s in cfg.get("scenarios", [])]:
            rec = recs.get((name, scen))
            if not rec:
                continue
            for key, label in (("e_mae", "E MAE"), ("f_mae", "F MAE")):
                pre = rec.pretrained_by_seed(rec.primary, key)
                r0 = rec.round0(rec.primary, key)
                d0 = paired_difference(r0, pre)
                rows.append(f"| {scen} | {rec.primary} | {label} | {msd(list(pre.values()))} | {msd(list(r0.values()))} "
                            f"| {ci(d0)} | {side(d0)} |")
            wall, cpu = rec.finetune_times()
            rows.append(f"| {scen} | | fine-tune time, rounds ≥ 1 | | | {msd(wall)} s wall, {msd(cpu)} s CPU | |")
        if rows:
            lines += ["The check, in the study itself: the round-0 fine-tune (study recipe, initial labelled set) "
                      "against the pretrained model, per seed (difference fine-tuned − pretrained, 95 % t-interval over "
                      "seeds; *lower* = fine-tuning helped).", "",
                      "| scenario | split | metric | pretrained | round-0 fine-tune | difference [95 % CI] | |",
                      "|---|---|---|---|---|---|---|"] + rows + [""]
    return lines


def _scenario_section(rec: Records, name: str, scen: str, figs: Path) -> List[str]:
    png = figs / f"{name}_{scen}_learning_curves.png"
    n_seeds = max(len(rec.seeds(m)) for m in rec.methods)
    plot_learning_curves(rec, f"{name}, {scen} pool: {rec.primary}, mean ± sd over {n_seeds} seed(s)", png)
    info = rec.info
    lines = [f"### {name} · {scen}", "",
             f"Pool {info.get('pool_size')} structures ({info.get('pool_target')} target region"
             + (f", {info.get('pool_pretraining_region')} from the pretraining region ({info.get('pretraining_region_source')})"
                if scen == "biased" else "") + f"); primary split {rec.primary}.", "",
             f"![{name} {scen} learning curves](figures/{png.name})", ""]
    lines += ["Final round on the primary split: mean ± sd over seeds; Δ = method − random per seed, mean "
              "[95 % t-interval, n − 1 df]; labels to reach random's final mean error (linear interpolation along "
              "the method's mean curve; % of random's final labels; seeds whose own curve reaches their random "
              "seed's final error).", "",
              "| method | labels | E MAE | ΔE vs random | F MAE | ΔF vs random | labels to random's final E | "
              "labels to random's final F |", "|---|---|---|---|---|---|---|---|"]
    pre_e, pre_f = rec.pretrained(rec.primary, "e_mae"), rec.pretrained(rec.primary, "f_mae")
    lines.append(f"| pretrained, not fine-tuned | – | {msd(pre_e)} | | {msd(pre_f)} | | | |")
    for m in rec.methods:
        fe, ff = rec.final(m, rec.primary, "e_mae"), rec.final(m, rec.primary, "f_mae")
        de = rec.difference(m, "random", "e_mae") if m != "random" else None
        df = rec.difference(m, "random", "f_mae") if m != "random" else None
        lines.append(f"| {m} | {rec.final_labels(m)} | {msd(list(fe.values()))} | {ci(de) if de else ''} | "
                     f"{msd(list(ff.values()))} | {ci(df) if df else ''} | "
                     f"{_reach_text(rec, m, 'e_mae') if m != 'random' else ''} | "
                     f"{_reach_text(rec, m, 'f_mae') if m != 'random' else ''} |")
    falling = _random_last_step(rec)
    if falling:
        lines += ["", falling]
    lines += ["", "Cheap metrics (need no fine-tune; mean ± sd over rounds and seeds; pretrained-model errors of the "
              "picks over those of the pool they were picked from; Spearman over the whole available pool, where the "
              "method scores every structure) and acquisition seconds per round:", "",
              "| method | " + " | ".join(label for _, label in CHEAP) + " | acq. s fresh | acq. s, pool features reused |",
              "|---|" + "---|" * (len(CHEAP) + 2)]
    pool_share = rec.cheap("random", "pool_target_share") or rec.cheap(rec.methods[0], "pool_target_share")
    for m in rec.methods:
        fresh, reuse = rec.acquisition(m)
        lines.append(f"| {m} | " + " | ".join(msd(rec.cheap(m, k), 2) for k, _ in CHEAP)
                     + f" | {msd(fresh)} | {msd(reuse)} |")
    if pool_share:
        lines.append(f"\nTarget share of the available pool: {msd(pool_share, 2)}.")
    others = [s for s in rec.splits() if s != rec.primary]
    if others:
        lines += ["", "Other splits, final round (E MAE / F MAE, mean over seeds):", "",
                  "| method | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
        row = ["pretrained"] + [f"{num(np.mean(rec.pretrained(s, 'e_mae')) if rec.pretrained(s, 'e_mae') else None)} / "
                                f"{num(np.mean(rec.pretrained(s, 'f_mae')) if rec.pretrained(s, 'f_mae') else None)}"
                                for s in others]
        lines.append("| " + " | ".join(row) + " |")
        for m in rec.methods:
            cells = []
            for s in others:
                e, f = rec.final(m, s, "e_mae"), rec.final(m, s, "f_mae")
                cells.append(f"{num(mean_sd(list(e.values()))['mean'])} / {num(mean_sd(list(f.values()))['mean'])}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]


def _random_last_step(rec: Records) -> str:
    """Is random's curve still falling at the end? Its last round's change and its slope over the second
    half of the labels (least squares per seed, rounds with at least half the final labels), paired over seeds."""
    parts = []
    for key, label in (("e_mae", "E"), ("f_mae", "F")):
        last, prev, slopes = rec.final("random", rec.primary, key), {}, []  # seeds that finished every round
        for seed in last:
            rounds = rec.by_method["random"][seed]
            if len(rounds) < 2:
                continue
            prev[seed] = rounds[-2]["metrics"][rec.primary][key]
            late = [r for r in rounds if r["n_labels"] >= rounds[-1]["n_labels"] / 2]
            if len(late) >= 3:
                slopes.append(100 * np.polyfit([r["n_labels"] for r in late], [r["metrics"][rec.primary][key] for r in late], 1)[0])
        if prev:
            slope = f"; slope over the second half {ci(t_interval(slopes))} per 100 labels" if len(slopes) >= 2 else ""
            parts.append(f"{label}: last round {ci(paired_difference(last, prev))}{slope}")
    return ("Random's curve at the end (95 % t-intervals over seeds; negative = still falling): "
            + "; ".join(parts) + ".") if parts else ""


# ---------------------------------------------------------------------- rails
def _rails_section(recs: Dict[tuple, Records], cfg: dict) -> List[str]:
    """Resolving power per scenario and quantity, each method's gap closure where there is power, and whether
    the cheap metrics (no fine-tune) rank the methods as the fine-tuned errors do."""
    rails = cfg.get("rails") or list(ORACLES)
    family = {d["name"]: d.get("family") or "–" for d in cfg.get("datasets", [])}
    have = {k: r for k, r in recs.items() if r and "random" in r.by_method}
    if not have:
        return []
    lines = ["## Rails: can each scenario answer, and how much of the gap does each method close?", "",
             f"Rails: `random` and the oracles {', '.join(f'`{r}`' for r in rails)}, which read the pool's reference "
             "labels (the pretrained model's real per-structure force error): `oracle:top` takes the B largest; "
             "`oracle:diverse` takes a greedy k-centre batch (the model's mean node features, the labelled set as "
             "first centres) among the 3B largest. The best rail is the one with the lower mean final error. A "
             "scenario *has resolving power* for a quantity when best rail − random (paired over seeds, 95 % "
             "t-interval) is below 0; gap closure = (random − method) / (random − best rail) of the final errors, "
             "with Fieller's 95 % interval (– where unbounded). Scenarios without power are listed, and no "
             "conclusion is drawn from them.", "",
             "| scenario | family | quantity | random | oracle:top − random | oracle:diverse − random | best rail | "
             "resolving power |", "|---|---|---|---|---|---|---|---|"]
    power = {}
    for (name, scen), rec in have.items():
        for key, label in (("f_mae", "F MAE"), ("e_mae", "E MAE")):
            got = resolving(rec, rails, key)
            power[(name, scen, key)] = got
            diffs = [ci(rec.difference(r, "random", key)) if r in rec.by_method else "–" for r in ORACLES]
            lines.append(f"| {name} · {scen} | {family.get(name, '–')} | {label} | "
                         f"{msd(list(rec.final('random', rec.primary, key).values()))} | {' | '.join(diffs)} | "
                         f"{got['rail'] or '–'} | {'**yes**' if got['resolves'] else 'no'} |")
    fam_count: Dict[str, int] = {}
    for (name, scen, key), got in power.items():
        if key == "f_mae" and got["resolves"]:
            fam_count[family.get(name, "–")] = fam_count.get(family.get(name, "–"), 0) + 1
    lines += ["", "Scenarios with resolving power for forces, per family: "
              + (", ".join(f"{f} {n}" for f, n in sorted(fam_count.items())) or "none") + ".", ""]
    rows = []
    for (name, scen), rec in have.items():
        for key, label in (("f_mae", "F"), ("e_mae", "E")):
            got = power[(name, scen, key)]
            if not got["resolves"]:
                continue
            rail_mean = rec.final_mean(got["rail"], key)
            for m in rec.methods:
                if is_rail(m):
                    continue
                g = gap_closure(rec, m, got["rail"], key)
                d_rail = rec.difference(m, got["rail"], key)
                beats = side(d_rail) == "lower"
                reach = _reach_text(rec, m, key) if key == "f_mae" else ""
                mean_m = rec.final_mean(m, key)
                rows.append(f"| {name} · {scen} | {label} | {m} | {num(mean_m)} (rail {num(rail_mean)}) | "
                            f"{pct(g['ratio'])} [{pct(g['lo'])}, {pct(g['hi'])}] | "
                            f"{ci(rec.difference(m, 'random', key))} | {reach} | "
                            f"{'**beats every rail**' if beats else ''} |")
    if rows:
        lines += ["Gap closure on the scenarios with resolving power (final errors on the primary split; labels to "
                  "reach random's final mean F error along the method's mean curve, where it has one):", "",
                  "| scenario | quantity | method | final MAE | gap closure [95 % Fieller] | Δ vs random [95 % t] | "
                  "labels to random's final F | |", "|---|---|---|---|---|---|---|---|"] + rows + [""]
    # do the cheap metrics rank methods as the fine-tunes do?
    cheap_keys = (("pick_pool_error_ratio_f", "picks / pool pretrained F error"),
                  ("picks_target_share", "target share of picks"),
                  ("spearman_score_error_f", "Spearman(score, F error)"))
    per_scen, pooled = {k: [] for k, _ in cheap_keys}, {k: ([], []) for k, _ in cheap_keys}
    for (name, scen), rec in have.items():
        rand = rec.final_mean("random", "f_mae")
        for k, _ in cheap_keys:
            xs, ys = [], []
            for m in rec.methods:
                c = rec.cheap(m, k)
                f = rec.final_mean(m, "f_mae")
                if c and np.isfinite(f):
                    xs.append(float(np.mean(c)))
                    ys.append((rand - f) / rand)
            if len(xs) >= 3:
                per_scen[k].append(float(spearmanr(xs, ys).statistic))
                pooled[k][0].extend(xs)
                pooled[k][1].extend(ys)
    lines += ["Do the cheap metrics (no fine-tune) predict the fine-tuned ranking? Spearman between each method's "
              "mean cheap metric and its final F MAE reduction relative to random, (random − method) / random, "
              "within each scenario (median over scenarios) and pooled over methods × scenarios:", "",
              "| cheap metric | median within-scenario Spearman | scenarios | pooled Spearman | pairs |",
              "|---|---|---|---|---|"]
    for k, label in cheap_keys:
        xs, ys = pooled[k]
        rho = float(spearmanr(xs, ys).statistic) if len(xs) >= 3 else float("nan")
        lines.append(f"| {label} | {num(float(np.median(per_scen[k])) if per_scen[k] else None, 2)} | "
                     f"{len(per_scen[k])} | {num(rho, 2)} | {len(xs)} |")
    return lines + [""]


# ---------------------------------------------------------------------- verdicts
def _verdicts(claims: Sequence[Claim], recs: Dict[tuple, Records], source: str) -> List[str]:
    """One numbered item per claim of the config, judged by claims.judge on the records."""
    if source and Path(source).resolve().is_relative_to(REPO):   # the shipped config: its path in the repository
        source = str(Path(source).resolve().relative_to(REPO))
    lines = ["## Verdicts", "",
             f"The claims declared in the study's config ({source or 'its claims: list'}), judged by study/claims.py "
             "from the records: *held* = the 95 % interval over seeds is on the claimed side of 0 (or of the stated "
             "margin); *did not hold* = it is on the other side; *not resolved* = the interval includes it.", ""]
    if not claims:
        return lines + ["The config declares no claims.", ""]
    for i, c in enumerate(claims, 1):
        v = judge(c, recs)
        if v.state is None:
            lines += [f"{i}. {c.text} ({describe(c)}):", ""] + [f"- {t}" for t in v.cells] + [""]
            continue
        lines += [f"{i}. {c.text} ({describe(c)}) — **{v.state}**: " + "; ".join(v.cells) + ".", ""]
        if v.notes:
            lines += ["   Where it was not met, the method with the lowest final error, and why the cheap metrics "
                      "think so (picks' pretrained error over the pool's, target share, Spearman):", ""]
            lines += ["   " + n for n in v.notes] + [""]
    return lines


def _acquisition_section(path: Path) -> List[str]:
    """The picks of each method on biased pools without fine-tuning (the `python -m bench acquisition` record)."""
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    rows = doc["results"]
    lines = ["## Biased pools without fine-tuning: what each method picks", "",
             f"`{doc['command']}` ({doc['timestamp']}); the stage's description is in bench/bench_acquisition.py. "
             "Per dataset and method, mean ± sd over the draws: the pretrained model's mean error on the picks ÷ "
             "the pool's (force, energy), the target-region share of the picks, and Spearman(score, pretrained "
             "force error) over the pool; ΔF vs random = the F ratio minus random's on the same draw (pool, seed "
             "and samples shared), mean [95 % t-interval over the draws]. `oracle` = the B largest real force "
             "errors (the ceiling of the ratio).", ""]
    pools = {}
    for r in rows:
        pools[r["dataset"]] = (r["pool"], r["budget"], r["pool_target_share"])
    lines += [f"- {d}: pool {n} ({share:.0%} target region), budget {b}, {len({r['draw'] for r in rows if r['dataset'] == d})} draws"
              for d, (n, b, share) in pools.items()] + [""]
    lines += ["| dataset | method | kernel | shortlist (× B) | F picks/pool | ΔF vs random | E picks/pool | "
              "target share | Spearman(score, F) |", "|---|---|---|---|---|---|---|---|---|"]
    groups: Dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["method"], r["kernel"] or "-", r.get("shortlist") or "-"), []).append(r)
    for (d, m, k, sl), rs in groups.items():
        cells = [msd([r[key] for r in rs if r[key] is not None], 2)
                 for key in ("f_ratio", "e_ratio", "target_share", "spearman_f")]
        random = {r["draw"]: r["f_ratio"] for r in rows if r["dataset"] == d and r["method"] == "random"}
        delta = "" if m == "random" else ci(paired_difference({r["draw"]: r["f_ratio"] for r in rs}, random), 2)
        lines.append(f"| {d} | {m} | {k} | {sl} | {cells[0]} | {delta} | " + " | ".join(cells[1:]) + " |")
    return lines + [""]


def _evaluate_section(folder: Path) -> List[str]:
    """How good the predicted errors are on each dataset's test split (the `ntkal evaluate` records)."""
    docs = sorted(folder.glob("*/evaluate.json"))
    if not docs:
        return []
    lines = ["## Are the predicted errors right? (`ntkal evaluate` on the test splits)", "",
             "Per record: the posterior fitted on the dataset's labelled train split (and, where `--pretrain` is "
             "given, its pretraining split), the predicted error of each test structure against the pretrained "
             "model's real error: Spearman over structures (atoms), the median of predicted/real (the written "
             "error is calibrated to be the median real error), and over energy rows and force components the "
             "95 % interval's coverage and the miscalibration area (meV/atom, meV/Å). "
             "`error` = the error-aware score (posterior mean of the residuals + variance), `pv` = "
             "the posterior variance alone, both calibrated (docs/design.md, Calibration). Reliability plots: "
             "`results/evaluate/*/evaluate.png`.", "",
             "| record | command | kernel | score | part | n | Spearman | median predicted/real | 95 % coverage | "
             "miscal. area |", "|---|---|---|---|---|---|---|---|---|---|"]
    for path in docs:
        doc = json.loads(path.read_text())
        flags = " ".join(f"--{k} {Path(v).name}" for k, v in doc.get("inputs", {}).items())
        for kernel, by_score in doc["results"].items():
            for score, parts in by_score.items():
                if score == "calibration":
                    continue
                for part, m in parts.items():
                    lines.append(f"| {path.parent.name} | `ntkal evaluate {flags}` | {kernel} | {score} | {part} | "
                                 f"{m['n']} | {_num(m.get('spearman'))} | {_num(m.get('median_ratio'))} | "
                                 f"{_num(m.get('coverage_95'))} | {_num(m.get('miscalibration_area'), '.3f')} |")
    return lines + [""]


def _num(v, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


# ---------------------------------------------------------------------- the document
def write_report(out: Path, claims: Sequence[Claim] = (), source: str = "", docs_name: str = "results.md") -> Path:
    """Write out/<docs_name> and out/figures/*.png from out/results/ alone, judging the config's `claims`
    (declared in `source`) on those records."""
    out = Path(out)
    results = out / "results"
    runs = load_runs(results)
    cfg = json.loads((results / "config.json").read_text()) if (results / "config.json").exists() else {}
    run_info = {}
    for p in sorted(results.glob("run-*.json")):
        run_info.update(json.loads(p.read_text()).get("datasets", {}))
    figs = out / "figures"
    datasets = [d["name"] for d in cfg.get("datasets", [])] or sorted({r["dataset"] for r in runs})
    scenarios = [s["name"] for s in cfg.get("scenarios", [])] or sorted({r["condition"] for r in runs})
    order = [m for s in cfg.get("scenarios", []) for m in s.get("methods", [])]
    recs = {(d, s): Records(runs, d, s, order) for d in datasets for s in scenarios}
    lines = ["# Active-learning study: does NTK acquisition pick better data?", "",
             "Generated by `python -m study --report-only --out DIR` (study/report.py) from the "
             "JSON under `results/`; every number and verdict below is computed from those files.", ""]
    lines += _how_run(results, out)
    lines += _setup(cfg, run_info)
    lines += _finetune_section(results, figs, cfg, recs)
    lines += ["## Results", ""]
    for (name, scen), rec in recs.items():
        lines += _scenario_section(rec, name, scen, figs) if rec else [f"### {name} · {scen}", "", "No records.", ""]
    lines += _rails_section(recs, cfg)
    lines += _verdicts(claims, recs, source)
    lines += _acquisition_section(results / "acquisition.json")
    lines += _evaluate_section(results / "evaluate")
    path = out / docs_name
    path.write_text("\n".join(lines) + "\n")
    return path
