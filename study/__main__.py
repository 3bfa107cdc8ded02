"""`python -m study`: the study with sharding, curve calibration and report-only flags."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m study", description=__doc__)
    p.add_argument("config", nargs="?", default=None, help="study YAML (default: the packaged study.yaml)")
    p.add_argument("--quick", action="store_true", help="smoke run: the config's `quick:` sizes")
    p.add_argument("--out", default="ntkal-experiment", help="output directory (default ./ntkal-experiment)")
    p.add_argument("--shard", default=None, help="i/n: run the i-th of n contiguous blocks of cells")
    p.add_argument("--curves", action="store_true", help="run the per-dataset fine-tune curves instead")
    p.add_argument("--report-only", action="store_true", help="only regenerate the report from the records")
    p.add_argument("--plan", action="store_true", help="print cells and fine-tunes per dataset and shard; run nothing")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = p.parse_args(argv)
    import mace  # noqa: F401  (before e3nn)
    import torch
    torch.set_num_threads(max(1, args.threads))
    from ntkal.errors import NtkalError
    from .cli import run
    try:
        if args.plan:
            from .config import load_config
            from .runner import plan_lines
            print("\n".join(plan_lines(load_config(args.config, quick=args.quick))))
            return 0
        run(args.config, args.quick, Path(args.out), shard=args.shard, curves=args.curves,
            report_only=args.report_only)
    except NtkalError as exc:
        print(f"ntkal experiment: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
