"""One calculator step's rows with the probe double backwards vmapped vs a loop, by structure size:
`python -m bench.probe_vmap`. What fast.VMAP_MAX_ATOMS_CPU is set from.

For each shipped dataset and supercell: the joint kernel's rows and outputs of one structure
(features.fast.rows_and_outputs, k = 512, 8 probes, float64, 1 thread), vmap=True and vmap=False taking turns on
the same slightly moved copies; median seconds of each after the first round and their ratio.
"""
from __future__ import annotations

import argparse
import sys
import time

import mace  # noqa: F401  (before e3nn: docs/design.md, Imports)
import numpy as np
import torch

CASES = "si:1,1,1;si:2,1,1;si:2,2,1;si:2,2,2;oc20:1,1,1;oc20:2,1,1;oc20:2,2,1"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.probe_vmap", description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=CASES, help="dataset:supercell;... (si: an 8-atom test cell, oc20: a "
                                                   "13-14-atom test slab)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import ntkal
    from ntkal.features.fast import rows_and_outputs

    from . import bench_md, utils
    rows = []
    for case in a.cases.split(";"):
        ds, rep = case.split(":")
        model, start, _, _ = bench_md.setup(ds, 1, 0, quick=True)
        atoms = start.repeat([int(x) for x in rep.split(",")])
        fz = ntkal.MACEFeaturizer(str(model), kernel="joint", sketch_dim=512, force_probes=a.probes,
                                  dtype=torch.float64)
        times = {True: [], False: []}
        for r in range(a.rounds):
            moved = atoms.copy()
            moved.positions += np.random.default_rng(r).normal(scale=0.01, size=moved.positions.shape)
            for vmap in ((True, False) if r % 2 == 0 else (False, True)):
                t = time.perf_counter()
                rows_and_outputs(fz, [moved], False, vmap=vmap)
                times[vmap].append(time.perf_counter() - t)
        vm, lp = float(np.median(times[True][1:])), float(np.median(times[False][1:]))
        rows.append({"dataset": ds, "supercell": rep, "atoms": len(atoms), "vmapped_s": vm, "loop_s": lp,
                     "vmapped_over_loop": vm / lp, "times": {"vmapped": times[True], "loop": times[False]}})
        print(f"{ds} {rep} ({len(atoms)} atoms): vmapped {vm:.3f} s, loop {lp:.3f} s, ratio {vm / lp:.2f}",
              flush=True)
    doc = utils.record("probe_vmap", sys.argv[1:] if argv is None else argv, rows, prog="python -m bench.probe_vmap")
    print(utils.markdown_table(rows, ["dataset", "supercell", "atoms", "vmapped_s", "loop_s", "vmapped_over_loop"]))
    if a.json:
        utils.write_json(a.json, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
