"""`ntkal experiment [CONFIG.yaml] [--quick] [--out DIR]`: run the study, then write its report."""
from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Optional

from .config import load_config
from .report import write_report
from .runner import Runner


def command_line(config: Optional[str], quick: bool, out: Path) -> str:
    parts = ["ntkal", "experiment"] + ([str(config)] if config else []) + (["--quick"] if quick else [])
    return shlex.join(parts + ["--out", str(out)])


def run(config: Optional[str], quick: bool, out: Path, log=None) -> dict:
    """Load and check the config (before anything runs), run every cell, write out/results.md."""
    cfg = load_config(config, quick=quick)
    out = Path(out)
    say = log or (lambda line: print(f"{time.strftime('%H:%M:%S')} {line}", flush=True))
    summary = Runner(cfg, out, say).run()
    cmd = command_line(config, quick, out)
    report = write_report(out, [f"OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 10 {cmd}"])
    say(f"wrote {report} ({summary['wall_s'] / 60:.1f} min, {summary['finetunes']} fine-tunes)")
    return {"summary": summary, "report": report, "config": cfg}
