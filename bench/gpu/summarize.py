"""One table from a bench/gpu/run.sh output folder: the card, and where each GPU goal stands.

`python bench/gpu/summarize.py OUT` reads OUT/{kernels,features,features80,select,calculator*}.json
and OUT/steps.log (whatever is there) and writes OUT/summary.md.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _load(out: Path, name: str):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _case(doc, name):
    return next((r for r in (doc or {}).get("results", []) if r.get("case") == name), {})


def main(out: str) -> int:
    out = Path(out)
    log = (out / "steps.log").read_text() if (out / "steps.log").exists() else ""
    card = re.findall(r"^GPU 0: .*$|cuda (True|False) (.*)$", log, flags=re.M)
    lines = ["# GPU run summary", "", f"card / torch: {card[-1] if card else 'not recorded'}", "",
             "steps (name, exit code): " + ", ".join(f"{n} {rc}" for n, rc in re.findall(r"^== (\w+): rc=(\d+)", log,
                                                                                       flags=re.M)), "",
             "| goal | measured | status |", "|---|---|---|"]
    kern = _load(out, "kernels")
    for r in (kern or {}).get("results", []):
        x = r.get("ref_over_triton")
        lines.append(f"| Triton {r['op']} ≥ 2× its reference ({r['shape']}) | "
                     f"{'-' if x is None else f'{x:.2f}×'} (Triton {r.get('triton_ms')} ms) | "
                     f"{'-' if x is None else ('met' if x >= 2 else 'missed')} |")
    feat = _load(out, "features")
    for kind in ("energy", "probes", "exact"):
        fast, ref = _case(feat, f"{kind} fast"), _case(feat, f"{kind} reference")
        if fast.get("time_s") and ref.get("time_s"):
            x = ref["time_s"] / fast["time_s"]
            lines.append(f"| fast featurizer ≥ 20× the reference ({kind}, {feat['settings']['arch']}) | {x:.1f}× "
                         f"(fast {fast['time_s']:.3g} s, {fast.get('over_floor', float('nan')):.2f}× the plain call) | "
                         f"{'met' if x >= 20 else 'missed'} |")
    f80 = _case(_load(out, "features80"), "energy fast")
    if f80.get("hours_for_pool_target"):
        mins = 60 * f80["hours_for_pool_target"]
        lines.append(f"| 200k structures of ~{f80.get('natoms_mean', 80):.0f} atoms through the energy NTK ≤ 30 min "
                     f"(measured batch × 200k / batch size) | {mins:.1f} min | {'met' if mins <= 30 else 'missed'} |")
    for r in (_load(out, "select") or {}).get("results", []):
        lines.append(f"| select at 200k, n_train {r.get('n_train')} (PV + shortlist + LCMD) | {r.get('ntkal_s')} s | - |")
    for path in sorted(out.glob("calculator*.json")):
        doc = json.loads(path.read_text())
        r, arch = doc["ratio_to_mace"], doc.get("arch")
        goals = (("energy", 1.5), ("joint", 12.0 if arch == "mp0-medium" else 4.0))
        status = [f"{k} {'met' if r[k] <= goal else 'missed'}" for k, goal in goals]
        extra = doc.get("cuda_step_extra_mib") or {}
        notes = (f"; a step's CUDA memory above what is held: plain {extra['mace']:.0f}, "
                 f"joint {extra['joint']:.0f} MiB" if extra else "")
        for name, p in (doc.get("profile") or {}).items():
            notes += (f"; profiled {name}: {p['wall_ms_per_step']:.1f} ms a step, kernels {p['kernel_ms_per_step']:.1f} ms, "
                      f"{p['launches_per_step']:.0f} launches")
        for kernel, part in (doc.get("median_part_s") or {}).items():
            notes += (f"; {kernel}: model call with rows {1e3 * part['features_and_model']:.1f} ms, posterior "
                      f"{1e3 * part['posterior_error']:.1f} ms")
        lines.append(f"| MD step with the error ÷ a MACECalculator step ({arch or doc.get('dataset')}, "
                     f"{doc['natoms']} atoms, {doc.get('dtype')}; energy ≤ {goals[0][1]}×, "
                     f"joint 8 probes ≤ {goals[1][1]}×) | energy "
                     f"{r['energy']:.2f}×, joint {r['joint']:.2f}× (plain {1e3 * doc['median_step_s']['mace']:.1f} ms"
                     f"{notes}) | {', '.join(status)} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
