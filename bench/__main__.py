"""`python -m bench {select,features,end2end,kernels,acquisition,md,calibration} [options] [--json PATH]`.

Each stage prints a markdown table to stdout and, with --json, writes a JSON record (command, machine,
versions, timestamp, results). See bench/RESULTS.md for the measured figures and docs/design.md, Measuring.
"""
from __future__ import annotations

import argparse
import os
import sys

import mace  # noqa: E402,F401  (before e3nn: docs/design.md, Imports)

from . import bench_acquisition, bench_calibration, bench_end2end, bench_features, bench_kernels, bench_md, bench_select, utils  # noqa: E402

STAGES = {"select": bench_select, "features": bench_features, "end2end": bench_end2end, "kernels": bench_kernels,
          "acquisition": bench_acquisition, "md": bench_md,
          "calibration": bench_calibration}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    for name, mod in STAGES.items():
        p = sub.add_parser(name, help=(mod.__doc__ or "").splitlines()[0], description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_args(p)
        p.add_argument("--json", default=None, help="write the JSON record here")
        p.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads here and in child processes (OMP_NUM_THREADS); default: torch's")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    mod = STAGES[a.stage]
    if a.threads:
        import torch
        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # children (bench cases, ntkal score) inherit it
        torch.set_num_threads(a.threads)
    load0 = utils.load_average()
    doc = mod.run(a, argv)
    doc["machine"]["load_avg_at_start"] = load0
    print(mod.table(doc))
    if a.json:
        utils.write_json(a.json, doc)
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
