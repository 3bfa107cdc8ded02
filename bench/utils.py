"""Shared benchmark harness: machine/version record, timers, peak memory, child processes, tables, JSON.

Conventions: ratios are measured in one run on one machine; absolute times count only
from a GPU, with the card named. Triton is timed only when CUDA is available (the interpreter's speed
means nothing), with ``triton.testing.do_bench`` and after a correctness check against the reference.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from ntkal.io.jsonio import json_default as _jsonable  # noqa: F401  (bench_select's children print with it)
from ntkal.io.jsonio import write_json as _write_json
from ntkal.provenance import cpu_model, versions

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


# --------------------------------------------------------------------------------------------------
# what ran where
# --------------------------------------------------------------------------------------------------

def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "gpu": gpu, "platform": platform.platform(), "load_avg_1_5_15": load_average()}


def record(stage: str, argv: Sequence[str], results: list, prog: str = "python -m bench", **extra) -> dict:
    """The JSON document of one stage: command (`prog` and its arguments), time, machine, versions, results."""
    return {"stage": stage, "command": " ".join([prog, *(shlex.quote(a) for a in argv)]),
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "versions": versions(), **extra, "results": results}


def write_json(path, doc: dict) -> None:
    """The record as JSON (parent folders created; unknown objects as str, NaN kept)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, doc, default=str, allow_nan=True)


# --------------------------------------------------------------------------------------------------
# timing and memory
# --------------------------------------------------------------------------------------------------

def timeit(fn: Callable, repeat: int = 5, warmup: int = 1, min_time: float = 0.0) -> dict:
    """Wall-clock seconds of fn(): median/min/max over `repeat` runs after `warmup` runs (CPU timer)."""
    for _ in range(warmup):
        fn()
    times = []
    t_start = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - t_start) < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def do_bench_ms(fn: Callable, warmup: int = 25, rep: int = 100) -> dict:
    """GPU timing with triton.testing.do_bench (quantiles 0.5, 0.2, 0.8), in ms. CUDA only."""
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("do_bench needs a GPU (the Triton interpreter cannot be timed)")
    from triton.testing import do_bench
    q50, q20, q80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": q50, "p20_ms": q20, "p80_ms": q80}


from ntkal.features.memory import reset_peak_rss, status_bytes  # noqa: E402,F401  (one /proc reader, one reset)


def rss_mib() -> Optional[float]:
    v = status_bytes("VmRSS")
    return None if v is None else v / 2**20


def peak_rss_mib() -> Optional[float]:
    """Peak RSS of this process since start or since the last reset_peak_rss() (VmHWM)."""
    v = status_bytes("VmHWM")
    if v is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return v / 2**20


def run_child(argv: Sequence[str], timeout: Optional[float] = None, env: Optional[dict] = None,
              cwd=None) -> dict:
    """Run a command in a fresh process: wall time, exit code, output, and ITS OWN peak RSS.

    os.wait4's ru_maxrss counts the forked copy of THIS process before exec (Linux folds the old memory
    map's high-water mark, i.e. this process's peak, into it), so it is used only where it exceeds this
    process's peak RSS (VmHWM) at the start;
    otherwise, and where it is lower, the child's VmRSS sampled every 10 ms (50 ms after 30 s) after its
    exec (Popen returns after the exec), which also sees a peak the child reset (ntkal.features.memory).
    stdout/stderr go to files (no pipe deadlock with a blocking wait4); stdout is read back afterwards.
    """
    import tempfile
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    # bench/ and study/ are not installed: a child script imports them from the repository
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="ntkal-bench-") as tmp:
        out_p, err_p = Path(tmp) / "out", Path(tmp) / "err"
        with open(out_p, "w") as fo, open(err_p, "w") as fe:
            own_kib = max(status_bytes("VmHWM") or 0, status_bytes("VmRSS") or 0) / 1024
            t0 = time.perf_counter()
            proc = subprocess.Popen(list(argv), stdout=fo, stderr=fe, env=full_env, cwd=cwd)
            deadline = None if timeout is None else t0 + timeout
            timed_out, sampled = False, 0
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid == proc.pid:
                    break
                sampled = max(sampled, (status_bytes("VmRSS", proc.pid) or 0) // 1024)
                if deadline is not None and time.perf_counter() > deadline:
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    timed_out = True
                    break
                time.sleep(0.01 if time.perf_counter() - t0 < 30 else 0.05)  # the sampling costs ~1 ms of CPU
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
        out, err = out_p.read_text(), err_p.read_text()
    return {"argv": list(argv), "rc": proc.returncode, "wall_s": wall, "timed_out": timed_out,
            "stdout": out, "stderr": err,
            "child_peak_rss_mib": max(usage.ru_maxrss if usage.ru_maxrss > own_kib + 2048 else 0, sampled) / 1024}


def last_json_line(text: str) -> Optional[dict]:
    """The last stdout line that parses as a JSON object (children print their result that way)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def tail(text: str, n: int = 1500) -> str:
    return text[-n:]


# --------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------

def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1e5 or a < 1e-3:
            return f"{v:.{digits}g}"
        return f"{v:.{digits}g}" if a < 100 else f"{v:,.0f}"
    return str(v)


def markdown_table(rows: List[dict], columns: Sequence[str], headers: Optional[Sequence[str]] = None) -> str:
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def header(doc: dict) -> str:
    m = doc["machine"]
    v = doc["versions"]
    gpu = m["gpu"] or "no GPU"
    return (f"### {doc['stage']}\n\n`{doc['command']}`  \n{doc['timestamp']} · {m['cpu']} · {m['cores']} cores "
            f"(torch threads {m['torch_threads']}) · {gpu} · load avg (1/5/15 min) at start "
            f"{m.get('load_avg_at_start')}, at end {m['load_avg_1_5_15']}  \n"
            f"ntkal {v['ntkal']} · torch {v['torch']} · triton {v['triton']} · mace-torch {v['mace-torch']}\n")
