"""`ntkal experiment [CONFIG.yaml] [--quick] [--out DIR] [--shard i/n] [--curves] [--report-only]`.

Default: run the study's cells (all, or the i-th of n contiguous blocks with --shard), then write the
report from whatever records are under --out. --curves: the once-per-dataset fine-tune curves instead of
the study. --report-only: regenerate out/results.md and its figures from the records alone.
"""
from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Optional

from .config import load_config
from .report import write_report
from .runner import Runner, parse_shard


def command_line(config: Optional[str], quick: bool, out: Path, shard: Optional[str] = None,
                 curves: bool = False) -> str:
    parts = ["python", "-m", "study"] + ([str(config)] if config else []) + (["--quick"] if quick else [])
    parts += (["--shard", shard] if shard else []) + (["--curves"] if curves else [])
    return shlex.join(parts + ["--out", str(out)])


def run(config: Optional[str], quick: bool, out: Path, log=None, shard: Optional[str] = None,
        curves: bool = False, report_only: bool = False) -> dict:
    """Load and check the config (before anything runs), run what was asked, write out/results.md."""
    cfg = load_config(config, quick=quick)
    out = Path(out)
    say = log or (lambda line: print(f"{time.strftime('%H:%M:%S')} {line}", flush=True))
    summary = None
    if curves:
        from .curves import run_curves
        run_curves(cfg, out, say)
    elif not report_only:
        runner = Runner(cfg, out, say, shard=parse_shard(shard))
        summary = runner.run()
        say(f"shard {summary['shard']}: {summary['wall_s'] / 60:.1f} min, {summary['finetunes']} fine-tunes")
    report = write_report(out)
    say(f"wrote {report}")
    return {"summary": summary, "report": report, "config": cfg}
