"""GPU correctness: the fast featurizer equals the reference on CUDA (float64, relative error <= 1e-9)
on the miniature of every foundation-shaped architecture, Triton sketch included. Prints one JSON line.

`python bench/gpu/check_fast.py [--device cuda]` (bench/gpu/run.sh runs it; --device cpu is the dry run).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mace  # noqa: E402,F401  (before e3nn: docs/design.md, Imports)
import torch  # noqa: E402

import ntkal  # noqa: E402
from bench import archs  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--names", default="mp0-small,mp0-medium,mp0-large,off-small")
    a = p.parse_args(argv)
    out, ok = [], True
    for name in a.names.split(","):
        model = archs.build(archs.miniature(archs.ARCHS[name]), seed=3)
        ats = archs.structures(name, 7, 3, seed=4)
        for kernel, probes in (("energy", None), ("joint", None), ("joint", 3)):
            kw = dict(kernel=kernel, force_probes=probes, sketch_dim=24, seed=1, dtype=torch.float64, device=a.device)
            t0 = time.perf_counter()
            fast, ref = ntkal.MACEFeaturizer(model, impl="fast", **kw), ntkal.MACEFeaturizer(model, impl="reference", **kw)
            x, y = fast(ats).rows, ref(ats).rows
            rel = float(torch.linalg.norm(x - y) / torch.linalg.norm(y))
            ok &= rel <= 1e-9
            out.append({"arch": name, "kernel": kernel, "probes": probes, "rel_err": rel, "impl": fast.impl,
                        "seconds": time.perf_counter() - t0})
    print(json.dumps({"device": a.device, "ok": bool(ok), "cases": out}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
