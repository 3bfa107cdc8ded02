"""Cost of an ntkal.Calculator step as a ratio to a plain MACECalculator step (same model, dtype, structure,
one run, steps interleaved so both see the same machine load): `python -m bench.calculator_cost`.

Each step moves the atoms a little (so neither calculator reuses its last result) and asks for energy,
forces and, for 3-D periodic cells (si; not oc20's slabs), stress. Prints the median step time of each
calculator and the ratios, and for the error steps their two parts (the model call with its feature rows, the
posterior's scoring); on CUDA also each step's memory above what is held. The posterior is fitted on a few
shipped training structures, or with --arch (a foundation architecture with random weights) on EMT-labelled
slabs (its quality does not change the cost).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import mace  # noqa: F401  (before e3nn: docs/design.md, Imports)
import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.calculator_cost", description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="si", help="shipped model and pool: si, oc20 or t1x")
    ap.add_argument("--arch", default=None, help="instead of --dataset: a foundation architecture of bench/archs.py "
                    "(random weights), e.g. mp0-medium, on a Cu slab with CO of about --n-atoms atoms; its posterior "
                    "from EMT-labelled slabs as `python -m bench md` fits it")
    ap.add_argument("--n-atoms", type=int, default=64, help="atoms of the --arch structure (about)")
    ap.add_argument("--index", type=int, default=406, help="pool structure (si 406: 16 atoms)")
    ap.add_argument("--repeat", default="1,1,1", help="supercell of the structure, e.g. 2,2,2")
    ap.add_argument("--sketch-dim", type=int, default=512)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--n-train", type=int, default=20)
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both calculators)")
    ap.add_argument("--profile", type=int, default=0, help="after the timing, profile this many more steps of the "
                    "plain, energy and joint calculators (torch.profiler): per step the device kernels' time, kernel "
                    "launches and the ops with the most CPU time (does a GPU step wait on the CPU?)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import ntkal
    from mace.calculators import MACECalculator
    from ntkal.calculator import Calculator
    from ntkal.data import dataset_files
    dtype = getattr(torch, a.dtype)
    if a.arch:
        from .bench_md import setup
        model, atoms, train, _ = setup(a.arch, a.n_atoms, pretrain_size=0)
    else:
        files = dataset_files(a.dataset)
        model = files["model"]
        train = list(ntkal.io.read_structures(files["train"]))[:a.n_train]
        atoms = list(ntkal.io.read_structures(files["pool"]))[a.index].repeat([int(x) for x in a.repeat.split(",")])
    calcs = {"mace": MACECalculator(model_paths=str(model), device=a.device, default_dtype=a.dtype)}
    for kernel in ("energy", "joint"):
        fz = ntkal.MACEFeaturizer(model, kernel=kernel, sketch_dim=a.sketch_dim, force_probes=a.probes,
                                  dtype=dtype, device=a.device)
        post = ntkal.fit(fz, train, train_force_probes=a.probes)
        calcs[kernel] = Calculator(fz, post, force_probes=a.probes)
        calcs[f"{kernel}, error_every=10"] = Calculator(fz, post, force_probes=a.probes, error_every=10)
    stress = bool(np.all(atoms.pbc)) and atoms.cell.rank == 3
    rng = np.random.default_rng(0)
    times = {name: [] for name in calcs}
    cuda = a.device == "cuda"
    parts = _PartTimer({k: c for k, c in calcs.items() if k in ("energy", "joint")}, cuda)
    extra = {name: 0.0 for name in calcs}  # CUDA: most memory a step allocated above what was held before it
    with parts:
        for step in range(a.steps + 3):
            moved = atoms.copy()
            moved.positions += rng.normal(scale=0.01, size=moved.positions.shape)
            for name, calc in calcs.items():
                x = moved.copy()
                x.calc = calc
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    held = torch.cuda.memory_allocated()
                t = time.perf_counter()
                x.get_potential_energy()
                x.get_forces()
                if stress:
                    x.get_stress()
                if step >= 3:  # warm-up
                    times[name].append(time.perf_counter() - t)
                if cuda:
                    extra[name] = max(extra[name], (torch.cuda.max_memory_allocated() - held) / 2**20)
    split = parts.medians(warmup=3)
    profiled = {name: _profile(calcs[name], atoms, rng, stress, a.profile, cuda)
                for name in ("mace", "energy", "joint")} if a.profile else None
    base = statistics.median(times["mace"])
    median = {k: statistics.median(v) for k, v in times.items()}
    ratio = {k: m / base for k, m in median.items()}
    from . import utils
    out = utils.record("calculator_cost", sys.argv[1:] if argv is None else argv,
                       [{"calculator": k, "median_step_s": median[k], "ratio_to_mace": ratio[k],
                         "cuda_step_extra_mib": extra[k] if cuda else None,
                         "median_part_s": split.get(k)} for k in times],
                       prog="python -m bench.calculator_cost", dataset=None if a.arch else a.dataset, arch=a.arch,
                       index=a.index, natoms=len(atoms),
                       n_params=sum(p.numel() for p in calcs["mace"].models[0].parameters()),
                       sketch_dim=a.sketch_dim, probes=a.probes, dtype=a.dtype, threads=a.threads, device=a.device,
                       gpu=torch.cuda.get_device_name(0) if a.device == "cuda" else None,
                       median_step_s=median, ratio_to_mace=ratio,
                       cuda_step_extra_mib=extra if cuda else None, median_part_s=split, profile=profiled,
                       cuda_allocated_mib=torch.cuda.memory_allocated() / 2**20 if cuda else None)
    print(f"{a.arch or f'{a.dataset} pool {a.index}'}: {len(atoms)} atoms, k={a.sketch_dim}, {a.probes} probes, "
          f"{a.dtype}, {a.device}, {a.threads} thread(s), {a.steps} steps")
    for k in times:
        print(f"{k:>24}: {1e3 * median[k]:8.2f} ms  x{ratio[k]:.2f}"
              + (f"  (a step's CUDA memory above what is held: {extra[k]:.1f} MiB)" if cuda else "")
              + "".join(f"; {part} {1e3 * v:.2f} ms" for part, v in (split.get(k) or {}).items()))
    for k, p in (profiled or {}).items():
        print(f"{k:>24}: profiled {p['wall_ms_per_step']:.2f} ms a step, device kernels {p['kernel_ms_per_step']:.2f} ms,"
              f" {p['launches_per_step']:.0f} launches; most CPU: "
              + ", ".join(f"{n} {ms:.2f} ms" for n, ms in p["top_cpu_ms_per_step"][:5]))
    if a.json:
        utils.write_json(a.json, out)
    return 0


def _profile(calc, atoms, rng, stress: bool, steps: int, cuda: bool) -> dict:
    """torch.profiler over `steps` more steps of one calculator: per step its wall time, the device kernels' own
    time (0 on a CPU), kernel launches and the 10 ops with the most self CPU time. Kernel time well under the wall
    time means the step waits on Python and launches, not on the card."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            x = atoms.copy()
            x.positions += rng.normal(scale=0.01, size=x.positions.shape)
            x.calc = calc
            x.get_potential_energy()
            x.get_forces()
            if stress:
                x.get_stress()
        wall = time.perf_counter() - t
    ev = prof.key_averages()
    launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    top = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    return {"steps": steps, "wall_ms_per_step": 1e3 * wall / steps,
            "kernel_ms_per_step": sum(e.self_device_time_total for e in ev) / 1e3 / steps,
            "launches_per_step": launches / steps,
            "top_cpu_ms_per_step": [(e.key, e.self_cpu_time_total / 1e3 / steps) for e in top]}


class _PartTimer:
    """The two parts of each error step of the watched calculators: the model call with its feature rows
    (features.fast.rows_and_outputs) and the posterior's scoring of those rows (Calculator._errors), synchronised
    on CUDA. A context: features.fast.rows_and_outputs is wrapped inside it and restored after."""

    PARTS = ("features_and_model", "posterior_error")

    def __init__(self, calcs: dict, cuda: bool):
        self.calcs, self.cuda, self.current = calcs, cuda, None
        self.times = {name: {p: [] for p in self.PARTS} for name in calcs}

    def _timed(self, fn, part):
        import torch

        def run(*args, **kw):
            if self.cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            res = fn(*args, **kw)
            if self.cuda:
                torch.cuda.synchronize()
            if self.current is not None:
                self.times[self.current][part].append(time.perf_counter() - t)
            return res
        return run

    def _watched(self, name, calculate):
        def run(*args, **kw):
            self.current = name
            try:
                return calculate(*args, **kw)
            finally:
                self.current = None
        return run

    def __enter__(self):
        from ntkal.features import fast
        self._fast, self._orig = fast, fast.rows_and_outputs
        fast.rows_and_outputs = self._timed(fast.rows_and_outputs, "features_and_model")  # imported per call
        for name, calc in self.calcs.items():
            calc._errors = self._timed(calc._errors, "posterior_error")
            calc.calculate = self._watched(name, calc.calculate)
        return self

    def __exit__(self, *exc):
        self._fast.rows_and_outputs = self._orig
        return False

    def medians(self, warmup: int) -> dict:
        return {name: {p: statistics.median(v[warmup:]) for p, v in got.items() if len(v) > warmup}
                for name, got in self.times.items() if all(len(v) > warmup for v in got.values())}


if __name__ == "__main__":
    raise SystemExit(main())
