"""`python -m study [CONFIG.yaml] [--quick] [--out DIR] [--shard I/N] [--only NAME,..] [--curves] [--report-only] [--plan]`.

Default: run the study's cells (all, or the I-th of N contiguous blocks with --shard), then write the
report from whatever records are under --out. --curves: the once-per-dataset fine-tune curves instead of
the study. --report-only: regenerate out/results.md and its figures from the records alone. --plan: print
cells and fine-tunes per dataset and shard; run nothing. Rerun the same command to resume.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m study", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None, help="study YAML (default: study/configs/study.yaml)")
    p.add_argument("--quick", action="store_true", help="smoke run: the config's `quick:` sizes")
    p.add_argument("--out", default="study-out", help="output directory (default ./study-out)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--shard", default=None, help="I/N: run the I-th of N disjoint blocks of cells (run N processes)")
    p.add_argument("--only", default=None, help="NAME[,NAME]: run only these datasets' cells (of the shard); a later "
                   "run without it resumes the rest")
    p.add_argument("--curves", action="store_true", help="only the fine-tune validation curves per dataset")
    p.add_argument("--report-only", action="store_true", help="only results.md from the records under --out")
    p.add_argument("--plan", action="store_true", help="print cells and fine-tunes per dataset and shard; run nothing")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run(args, log=None) -> Optional[Path]:
    """Load and check the config (before anything runs), run what was asked, write out/results.md."""
    from .config import load_config
    from .report import write_report
    from .runner import Runner, parse_shard, plan_lines
    cfg = load_config(args.config, quick=args.quick)
    if args.plan:
        print("\n".join(plan_lines(cfg)))
        return None
    out = Path(args.out)
    say = log or (lambda line: print(f"{time.strftime('%H:%M:%S')} {line}", flush=True))
    if args.curves:
        from .curves import run_curves
        run_curves(cfg, out, say)
    elif not args.report_only:
        summary = Runner(cfg, out, say, shard=parse_shard(args.shard), only=args.only).run()
        say(f"shard {summary['shard']}: {summary['wall_s'] / 60:.1f} min, {summary['finetunes']} fine-tunes")
    report = write_report(out, cfg.claims, cfg.source)
    say(f"wrote {report}")
    return report


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import mace  # noqa: F401  (before e3nn)
    import torch

    from ntkal import NtkalError
    torch.set_num_threads(max(1, args.threads))
    try:
        run(args)
    except NtkalError as exc:  # a user error: one line and exit 2 (and the traceback with --debug)
        print(f"python -m study: error: {exc}", file=sys.stderr)
        if args.debug:
            raise
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
