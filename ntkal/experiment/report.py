"""docs/results.md from the results JSON: per-dataset learning curves (PNG) and tables, the pool-shift
table (mean ± spread over seeds, share of target-region picks), acquisition times, and a check of
each of the paper's claims against the numbers — stated whichever way it comes out.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

METRICS = (("e_mae", "E MAE"), ("e_rmse", "E RMSE"), ("f_mae", "F MAE"), ("f_rmse", "F RMSE"))
ORDER = ("random", "committee", "embedding", "energy", "force", "joint", "top",
         "energy+target", "force+target", "joint+target")
NTK = ("energy", "force", "joint")


def load_runs(results: Path) -> List[dict]:
    """Every method's results JSON under results/<dataset>_<condition>/seed<s>/."""
    runs = []
    for path in sorted(Path(results).glob("*_*/seed*/*.json")):
        if path.name in ("round0.json", "settings.json"):
            continue
        d = json.loads(path.read_text())
        if "method" in d and isinstance(d.get("rounds"), list):
            runs.append(d)
    return runs


def _mean_sd(values):
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _fmt(mean, sd, n, digits=1):
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _methods(runs) -> List[str]:
    present = {r["method"] for r in runs}
    return [m for m in ORDER if m in present] + sorted(present - set(ORDER))


def curves(runs: List[dict], dataset: str, condition: str):
    """{method: {n_labels: {"metrics": {split: {metric: [per seed]}}, "acq": [..], "target_frac": [..]}}}."""
    out: Dict[str, Dict[int, dict]] = defaultdict(dict)
    for run in runs:
        if run["dataset"] != dataset or run["condition"] != condition:
            continue
        rounds = run["rounds"]
        for i, rnd in enumerate(rounds):
            if "metrics" not in rnd:
                continue
            cell = out[run["method"]].setdefault(rnd["n_labels"], {"metrics": defaultdict(lambda: defaultdict(list)),
                                                                  "acq": [], "acq_reuse": [], "target_frac": [],
                                                                  "seeds": []})
            cell["seeds"].append(run["seed"])
            for split, m in rnd["metrics"].items():
                for key, _ in METRICS:
                    cell["metrics"][split][key].append(m[key])
            if i > 0:
                prev = rounds[i - 1]
                cell["acq"].append(prev.get("acquisition_s"))
                if prev.get("acquisition_s") is not None:
                    pool_s = (prev.get("acquisition") or {}).get("features_pool_s", 0.0)
                    cell["acq_reuse"].append(prev["acquisition_s"] - pool_s)
                cum = [rounds[j].get("picks_target_fraction") for j in range(i)]
                if all(c is not None for c in cum):
                    cell["target_frac"].append(float(np.mean(cum)))
    return out


def pretrained(runs: List[dict], dataset: str, condition: str) -> Dict[str, Dict[str, list]]:
    """The pretrained model's own errors (no fine-tune), one value per seed: {split: {metric: [..]}}."""
    out: Dict[str, Dict[str, list]] = defaultdict(lambda: defaultdict(list))
    seen = set()
    for run in runs:
        if run["dataset"] != dataset or run["condition"] != condition or run["seed"] in seen:
            continue
        pm = run["rounds"][0].get("pretrained_metrics")
        if pm:
            seen.add(run["seed"])
            for split, m in pm.items():
                for key, _ in METRICS:
                    out[split][key].append(m[key])
    return out


def _splits(cur, with_regions: bool) -> List[str]:
    names = set()
    for per_n in cur.values():
        for cell in per_n.values():
            names.update(cell["metrics"].keys())
    names = sorted(names, key=lambda s: (s.split(":")[0] != "test_id", s))
    return [s for s in names if with_regions or ":" not in s]


def plot_curves(cur, splits: List[str], title: str, path: Path, pre=None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = [m for m in ORDER if m in cur] + sorted(set(cur) - set(ORDER))
    fig, axes = plt.subplots(2, len(splits), figsize=(3.6 * len(splits), 6.0), squeeze=False)
    for c, split in enumerate(splits):
        for r, (key, label) in enumerate((("e_mae", "E MAE (meV/atom)"), ("f_mae", "F MAE (meV/Å)"))):
            ax = axes[r][c]
            for k, m in enumerate(methods):
                ns = sorted(cur[m])
                stats = [_mean_sd(cur[m][n]["metrics"][split][key]) for n in ns]
                mean = np.array([s[0] for s in stats])
                sd = np.array([s[1] for s in stats])
                style = "--" if m in ("random", "committee") else "-"
                ax.plot(ns, mean, style, marker="o", ms=3, color=f"C{k % 10}", label=m)
                if any(s[2] > 1 for s in stats):
                    ax.fill_between(ns, mean - sd, mean + sd, color=f"C{k % 10}", alpha=0.12)
            if pre and split in pre:
                ax.axhline(np.mean(pre[split][key]), color="0.5", ls=":", lw=1, label="pretrained")
            ax.set_title(f"{split}", fontsize=9)
            ax.set_xlabel("labelled structures")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(cur, split: str, pre=None) -> List[str]:
    lines = ["| method | labels | E MAE | E RMSE | F MAE | F RMSE | acquisition s | acq. s, pool features reused |",
             "|---|---|---|---|---|---|---|---|"]
    if pre and split in pre:
        lines.append("| pretrained, not fine-tuned | – | " + " | ".join(_fmt(*_mean_sd(pre[split][k])) for k, _ in METRICS)
                     + " | – | – |")
    for m in [m for m in ORDER if m in cur] + sorted(set(cur) - set(ORDER)):
        for n in sorted(cur[m]):
            cell = cur[m][n]
            if split not in cell["metrics"]:
                continue
            vals = [_fmt(*_mean_sd(cell["metrics"][split][k])) for k, _ in METRICS]
            acq = _fmt(*_mean_sd(cell["acq"]), digits=1) if cell["acq"] else "–"
            reuse = _fmt(*_mean_sd(cell["acq_reuse"]), digits=1) if cell["acq_reuse"] else "–"
            lines.append(f"| {m} | {n} | " + " | ".join(vals) + f" | {acq} | {reuse} |")
    return lines


def final(cur, method: str):
    return cur[method][max(cur[method])] if method in cur and cur[method] else None


def shift_table(cur, splits: List[str]) -> List[str]:
    head = "| method | " + " | ".join(f"{s} E MAE | {s} F MAE" for s in splits) + \
           " | target-region share of picks | acquisition s / round | acq. s, pool features reused |"
    lines = [head, "|" + "---|" * (2 + 2 * len(splits) + 2)]
    for m in [m for m in ORDER if m in cur] + sorted(set(cur) - set(ORDER)):
        cell = final(cur, m)
        vals = []
        for s in splits:
            for k in ("e_mae", "f_mae"):
                vals.append(_fmt(*_mean_sd(cell["metrics"][s][k])) if s in cell["metrics"] else "–")
        tf = _mean_sd(cell["target_frac"])
        share = f"{tf[0]:.2f} ± {tf[1]:.2f}" if tf[2] > 1 else (f"{tf[0]:.2f}" if tf[2] else "–")
        acq_all = [x for n in cur[m] for x in cur[m][n]["acq"] if x is not None]
        reuse = [x for n in cur[m] for x in cur[m][n]["acq_reuse"]]
        lines.append(f"| {m} | " + " | ".join(vals) + f" | {share} | {_fmt(*_mean_sd(acq_all))} | "
                     f"{_fmt(*_mean_sd(reuse))} |")
    return lines


def plot_shift(cur, split: str, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = [m for m in ORDER if m in cur] + sorted(set(cur) - set(ORDER))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label) in zip(axes[:2], (("e_mae", "E MAE (meV/atom)"), ("f_mae", "F MAE (meV/Å)"))):
        for i, m in enumerate(methods):
            vals = final(cur, m)["metrics"].get(split, {}).get(key, [])
            ax.scatter([i] * len(vals), vals, color=f"C{i % 10}", s=18)
            if vals:
                ax.hlines(np.mean(vals), i - 0.3, i + 0.3, color=f"C{i % 10}")
        ax.set_xticks(range(len(methods)), methods, rotation=60, fontsize=8)
        ax.set_ylabel(f"{label}, {split}")
        ax.grid(alpha=0.3, axis="y")
    ax = axes[2]
    for i, m in enumerate(methods):
        vals = final(cur, m)["target_frac"]
        ax.scatter([i] * len(vals), vals, color=f"C{i % 10}", s=18)
        if vals:
            ax.hlines(np.mean(vals), i - 0.3, i + 0.3, color=f"C{i % 10}")
    ax.set_xticks(range(len(methods)), methods, rotation=60, fontsize=8)
    ax.set_ylabel("target-region share of picks")
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- claims
def _final_means(cur, split, key):
    return {m: _mean_sd(final(cur, m)["metrics"][split][key])[0] for m in cur
            if final(cur, m) and split in final(cur, m)["metrics"]}


def claim_joint_best(cur, splits) -> (Optional[bool], str):
    """Claim 1: the joint NTK has the lowest E and F MAE and RMSE on every split (at the final budget)."""
    if "joint" not in cur:
        return None, "no joint runs"
    wins, total, lost = 0, 0, []
    for s in splits:
        for key, label in METRICS:
            means = _final_means(cur, s, key)
            if "joint" not in means:
                continue
            total += 1
            best = min(means, key=means.get)
            if best == "joint":
                wins += 1
            else:
                lost.append(f"{s} {label}: {best} {means[best]:.1f} vs joint {means['joint']:.1f}")
    verdict = wins == total and total > 0
    text = f"joint NTK lowest on {wins} of {total} (split, metric) pairs at the final budget"
    if lost:
        text += "; beaten on " + "; ".join(lost[:6]) + ("; …" if len(lost) > 6 else "")
    return verdict, text


def claim_force_vs_committee(cur, splits, tol: float = 0.05) -> (Optional[bool], str):
    """Claim 2: force NTK within `tol` (relative) of the committee's F and E MAE, at lower acquisition cost."""
    if "force" not in cur or "committee" not in cur:
        return None, "force or committee runs missing"
    parts, ok = [], True
    for s in splits:
        for key in ("e_mae", "f_mae"):
            means = _final_means(cur, s, key)
            if "force" in means and "committee" in means:
                rel = means["force"] / means["committee"] - 1
                ok &= rel <= tol
                parts.append(f"{s} {key.replace('_', ' ').upper()}: force {means['force']:.1f} vs committee "
                             f"{means['committee']:.1f} ({100 * rel:+.0f} %)")
    acq = {m: _mean_sd([x for n in cur[m] for x in cur[m][n]["acq"] if x is not None])[0] for m in ("force", "committee")}
    reuse = {m: _mean_sd([x for n in cur[m] for x in cur[m][n]["acq_reuse"]])[0] for m in ("force", "committee")}
    cheaper = acq["force"] < acq["committee"]
    parts.append(f"acquisition per round: force {acq['force']:.1f} s vs committee {acq['committee']:.1f} s "
                 f"(with the pool's features reused across rounds: force {reuse['force']:.1f} s vs committee "
                 f"{reuse['committee']:.1f} s); the verdict uses the fresh-call times")
    return ok and cheaper, "; ".join(parts)


def claim_shift_robust(cur, split) -> (Optional[bool], str):
    """Claim 3: under pool shift, NTK/embedding methods have a smaller seed spread than the committee."""
    if "committee" not in cur:
        return None, "no committee runs"
    sds = {}
    for m in cur:
        cell = final(cur, m)
        if cell and split in cell["metrics"]:
            sds[m] = {k: _mean_sd(cell["metrics"][split][k])[1] for k in ("e_mae", "f_mae")}
    feats = [m for m in sds if m in ("embedding",) + NTK]
    if not feats:
        return None, "no NTK/embedding runs"
    comp, held = [], []
    for k in ("e_mae", "f_mae"):
        mean_feat = float(np.mean([sds[m][k] for m in feats]))
        held.append(mean_feat < sds["committee"][k])
        comp.append(f"{k.replace('_', ' ').upper()} seed spread (sd) on {split}: committee {sds['committee'][k]:.2f}, "
                    f"embedding/NTK mean {mean_feat:.2f} (" + ", ".join(f"{m} {sds[m][k]:.2f}" for m in feats) + ")")
    verdict = True if all(held) else (False if not any(held) else "partly")
    return verdict, "; ".join(comp)


def _verdict(v) -> str:
    return {True: "**held here**", False: "**did not hold here**", None: "**not tested**",
            "partly": "**held only in part here**"}[v]


def mean_ranks(cur, splits) -> List[str]:
    """Mean rank (1 = lowest error) of each method over every (split, metric) at the final budget."""
    ranks = defaultdict(list)
    for s in splits:
        for key, _ in METRICS:
            means = _final_means(cur, s, key)
            for r, m in enumerate(sorted(means, key=means.get), start=1):
                ranks[m].append(r)
    if not ranks:
        return []
    order = sorted(ranks, key=lambda m: np.mean(ranks[m]))
    return ["Mean rank over every (split, metric) at the final budget (1 = lowest error): "
            + ", ".join(f"{m} {np.mean(ranks[m]):.1f}" for m in order) + ".", ""]


# ---------------------------------------------------------------------- the document
def write_report(out: Path, commands: List[str], docs_name: str = "results.md") -> Path:
    """Write out/<docs_name> and out/figures/*.png from out/results/."""
    out = Path(out)
    results = out / "results"
    runs = load_runs(results)
    run_info = json.loads((results / "run.json").read_text()) if (results / "run.json").exists() else {}
    cfg = json.loads((results / "config.json").read_text()) if (results / "config.json").exists() else {}
    figs = out / "figures"
    lines = ["# Active-learning study: does NTK acquisition pick better data?", ""]
    lines += ["Generated by `ntkal experiment` (ntkal/experiment/report.py) from the JSON under `results/`; "
              "every number below is from those files.", ""]
    lines += ["## How it was run", "", "```"] + commands + ["```", ""]
    if run_info:
        inv = run_info.get("invocations", [])
        total = sum(i.get("wall_s", 0.0) for i in inv) if inv else run_info.get("wall_s", 0.0)
        cpu = sum(i.get("cpu_s", 0.0) for i in inv)
        n_ft = sum(i.get("finetunes", 0) for i in inv) if inv else run_info.get("finetunes", 0)
        ft_s = sum(i.get("finetune_s", 0.0) for i in inv) if inv else run_info.get("finetune_s", 0.0)
        lines += [f"- wall time: {total / 60:.1f} min (process CPU time {cpu / 60:.1f} min), summed over "
                  f"{max(1, len(inv))} invocation(s) of which the results are made (a rerun resumes); "
                  f"{n_ft} fine-tunes took {ft_s / 60:.1f} min of it; machine: " + run_info.get("machine", "?")
                  + " (shared with other jobs: load average 3-6 during the runs)", ""]
    lines += _setup_lines(cfg, results)
    datasets = [d["name"] for d in cfg.get("datasets", [])] or sorted({r["dataset"] for r in runs})
    claims = {}
    for name in datasets:
        cur = curves(runs, name, "natural")
        if not cur:
            lines += [f"## {name}", "", "No results (dataset not run).", ""]
            continue
        splits = _splits(cur, with_regions=False)
        png = figs / f"{name}_learning_curves.png"
        n_seeds = max(len(c["seeds"]) for per in cur.values() for c in per.values())
        pre = pretrained(runs, name, "natural")
        plot_curves(cur, splits, f"{name}: errors vs labels ({n_seeds} seed(s); bands = ±1 sd)", png, pre)
        ds_info = run_info.get("datasets", {}).get(name, {})
        lines += [f"## {name}", ""]
        if ds_info:
            lines += [f"{ds_info.get('note', '')}. Pool {ds_info.get('n_pool')} structures "
                      f"(mean {ds_info.get('mean_atoms_pool', 0):.1f} atoms), train split {ds_info.get('n_train')}, "
                      "tests " + ", ".join(f"{k} {v}" for k, v in ds_info.get("tests", {}).items()) + ".", ""]
        lines += [f"![{name} learning curves](figures/{png.name})", ""]
        lines += ["Energies per atom in meV/atom, forces per component in meV/Å; "
                  f"{'mean ± sd over seeds' if n_seeds > 1 else 'one seed'}. Acquisition s = time to pick the batch "
                  "that led to this labelled set, as a fresh call would spend it (feature methods: featurising pool "
                  "and labelled set + selection; committee: its 3 extra fine-tunes + all members' predictions + "
                  "selection); the last column leaves out the pool featurisation, which the fixed pretrained "
                  "model lets one compute once for the whole campaign.", ""]
        lines += mean_ranks(cur, splits)
        for s in splits:
            lines += [f"### {name} · {s}", ""] + table(cur, s, pre) + [""]
        claims[name] = (cur, splits)
    ps = cfg.get("pool_shift")
    shift = None
    if ps:
        cur = curves(runs, ps["dataset"], "shift")
        if cur:
            splits = _splits(cur, with_regions=True)
            key_split = f"test_id:{ps['target_value']}" if f"test_id:{ps['target_value']}" in splits else splits[0]
            png = figs / f"{ps['dataset']}_pool_shift.png"
            plot_shift(cur, key_split, png, f"{ps['dataset']} pool shift: final round, one dot per seed")
            nat = curves(runs, ps["dataset"], "natural")
            lines += [f"## Pool shift ({ps['dataset']})", "",
                      f"Candidate pool of {ps['pool_size']} with {100 * ps['target_fraction']:.0f} % from the "
                      f"`{ps['region_key']}={ps['target_value']}` region (the dataset's pool has about 50 %); "
                      f"{len(ps['seeds'])} seeds (each: its own pool draw, initial set and fine-tune seed); "
                      f"{ps.get('rounds') or cfg.get('rounds')} round(s) of {ps.get('budget') or cfg.get('budget')} picks. "
                      f"`+target` runs rank by expected reduction of the predictive variance over "
                      f"{ps['target_size']} unlabelled target-region structures held out of the pool and of every test "
                      "split, then pick greedily (`ntkal select --target`). Final round; mean ± sd over seeds.", "",
                      f"![pool shift](figures/{png.name})", ""]
            lines += shift_table(cur, splits) + [""] + mean_ranks(cur, splits)
            if nat:
                lines += [f"Same methods on the unbiased pool (main study, final round) for reference, "
                          f"target-region share of picks: "
                          + ", ".join(f"{m} {np.mean(final(nat, m)['target_frac']):.2f}"
                                      for m in nat if final(nat, m) and final(nat, m)["target_frac"]) + ".", ""]
            lines += [f"### Pool shift · learning curves per split", ""]
            for s in splits:
                lines += [f"#### {s}", ""] + table(cur, s, pretrained(runs, ps["dataset"], "shift")) + [""]
            shift = (cur, key_split)
    lines += ["## The paper's claims, checked here", ""]
    oc = claims.get("oc20")
    v, t = claim_joint_best(*oc) if oc else (None, "no oc20 results")
    lines += [f"1. *Joint energy-force NTK gives the lowest energy and force errors on OC20* — {_verdict(v)}: {t}.", ""]
    tx = claims.get("t1x")
    v, t = claim_force_vs_committee(*tx) if tx else (None, "no t1x results")
    lines += [f"2. *Force NTK stays competitive with committees on reactive molecules at a fraction of the cost* "
              f"(T1x-like; competitive = final E and F MAE within 5 % of the committee's or better) — {_verdict(v)}: {t}.", ""]
    v, t = claim_shift_robust(*shift) if shift else (None, "no pool-shift results")
    lines += [f"3. *Under pool shift, NTK/embedding acquisition is robust while committees vary more* "
              f"(smaller seed spread of the final errors) — {_verdict(v)}: {t}.", ""]
    if shift:
        cur, split = shift
        tgt = [m for m in cur if m.endswith("+target")]
        if tgt:
            share = {m: _mean_sd(final(cur, m)["target_frac"])[0] for m in cur}
            f_mae = _final_means(cur, split, "f_mae")
            e_mae = _final_means(cur, split, "e_mae")
            bits = []
            for m in tgt:
                b = m[: -len("+target")]
                if b in share:
                    bits.append(f"{b}: share {share[b]:.2f} → {share[m]:.2f}, {split} F MAE {f_mae.get(b, float('nan')):.1f} → "
                                f"{f_mae.get(m, float('nan')):.1f}, E MAE {e_mae.get(b, float('nan')):.1f} → "
                                f"{e_mae.get(m, float('nan')):.1f}")
            lines += ["4. *Target-aware acquisition (`--target`) under pool shift* (without → with target): "
                      + "; ".join(bits) + ".", ""]
    notes = results / "notes.md"
    if notes.exists():
        lines += ["## Notes", "", notes.read_text().strip(), ""]
    path = out / docs_name
    path.write_text("\n".join(lines) + "\n")
    return path


def _setup_lines(cfg: dict, results: Path) -> List[str]:
    if not cfg:
        return []
    ft, sel = cfg.get("finetune", {}), cfg.get("selection", {})
    lines = ["## Set-up", "",
             f"- schedule: {cfg.get('initial_size')} initial labels (seeded draw from the train split), "
             f"{cfg.get('rounds')} rounds of {cfg.get('budget')}; main-study seeds {cfg.get('seeds')}.",
             f"- every evaluated model: the pretrained model fine-tuned on that method's labelled set with "
             f"`mace_run_train --foundation_model` ({ft.get('epochs')} epochs, batch {ft.get('batch_size')}, "
             f"lr {ft.get('lr')}, energy/force weights {ft.get('energy_weight')}/{ft.get('forces_weight')}, "
             f"fine-tune seed = study seed, last epoch kept, E0s of the pretrained model).",
             f"- committee: {cfg.get('committee_size')} members (seeds s, s+1000, …) fine-tuned the same way each round; "
             "member s is the round's evaluated model; score = per-atom energy variance + mean force-component "
             "variance (each normalised by its labelled-set mean), top-M shortlist, LCMD on the member-deviation "
             "vectors. Its acquisition time counts the extra members' fine-tunes and all members' predictions.",
             f"- NTK / embedding: features of the ONE pretrained model (sketch k = {sel.get('sketch_dim')}, "
             f"pool force rows by {sel.get('force_probes')} Rademacher probes, labelled rows exact), posterior "
             f"σ² = {sel.get('sigma_e2')}/{sel.get('sigma_f2')}, PV shortlist + LCMD ({sel.get('mode')} mode); "
             f"`top` = top-PV of the {sel.get('top_kernel')} kernel without LCMD. Features are computed once per "
             "structure and reused; the acquisition time charged to a round is what a fresh call would spend "
             "(featurising labelled set + pool, posterior, scoring, selection).",
             ""]
    feats = {}
    for path in sorted(Path(results).glob("*_features.json")):
        feats[path.name[: -len("_features.json")]] = json.loads(path.read_text())
    if feats:
        lines += ["Feature cost measured in this run (seconds, whole run, per featurisation):", "",
                  "| dataset | " + " | ".join(sorted(next(iter(feats.values()))["seconds"])) + " |",
                  "|---|" + "---|" * len(next(iter(feats.values()))["seconds"])]
        for name, f in feats.items():
            lines.append(f"| {name} | " + " | ".join(f"{f['seconds'][k]:.0f} s / {f['structures'][k]} structures"
                                                 for k in sorted(f["seconds"])) + " |")
        lines.append("")
    return lines
