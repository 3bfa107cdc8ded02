"""What ran where, for reports, benchmark records and experiment results: package versions and the
machine (CPU model, cores, torch threads)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

PACKAGES = ("ntkal", "torch", "triton", "mace-torch", "e3nn", "ase", "numpy", "bmdal-reg")


def versions(packages=PACKAGES) -> dict[str, str | None]:
    """Python, platform and the installed version of each package (None where it is missing)."""
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_summary() -> str:
    """One line: CPU model, core count, torch version and threads (the box timings come from)."""
    import torch

    return (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch thread(s)")
