"""Foundation-shaped MACE models with random weights (no downloads), their miniatures, and test structures.

`model(name)` builds ScaleShiftMACE with mace-torch's own classes and the published hyper-parameters of
MACE-MP-0 small / medium / large and MACE-OFF23 small (what could not be confirmed offline is marked
"assumed" below), saves it once under the cache folder ($NTKAL_CACHE, else ~/.cache/ntkal; never the
repository) and loads it from there afterwards. `model(name, mini=True)` is the miniature: the same
block types, element table, max_ell and correlation with 4 channels, so it runs in seconds.
`structures(name, n_atoms, count)` gives rattled Cu(111) slabs with a CO adsorbate (MP archs) or
clusters of organic molecules (OFF archs) of about n_atoms atoms. `multihead_model(...)` runs
`mace_run_train --multiheads_finetuning True` on a tiny foundation model and returns the model file it
writes (heads ["pt_head", HEAD]).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import List, Sequence

import numpy as np

MP_ZS = list(range(1, 90))  # MACE-MP-0: H..Ac, 89 elements
OFF_ZS = [1, 6, 7, 8, 9, 15, 16, 17, 35, 53]  # MACE-OFF23: H C N O F P S Cl Br I


@dataclass(frozen=True)
class Arch:
    """ScaleShiftMACE hyper-parameters (mace_run_train's names where they exist)."""

    hidden_irreps: str
    atomic_numbers: Sequence[int]
    r_max: float
    kind: str  # "slab" (MP archs: Cu(111)+CO structures) or "organic" (OFF archs: molecule clusters)
    max_ell: int = 3
    correlation: int = 3
    num_interactions: int = 2
    num_radial_basis: int = 10
    num_cutoff_basis: int = 5
    radial_MLP: Sequence[int] = (64, 64, 64)
    MLP_irreps: str = "16x0e"
    avg_num_neighbors: float = 61.96  # assumed for MP-0 (the brief's "~61"); it only scales the messages
    use_reduced_cg: bool = False  # mace_run_train's default, with which MP-0 / OFF23 were trained
    interaction: str = "RealAgnosticResidualInteractionBlock"
    notes: str = ""


# MP-0 small / medium / large: MACE-MP paper and mace's foundations_models.py file names ("128-L0",
# "128-L1", ...); medium has 4,688,656 parameters as built here (published: 4.69M).
ARCHS = {
    "mp0-small": Arch("128x0e", MP_ZS, 6.0, "slab"),
    "mp0-medium": Arch("128x0e+128x1o", MP_ZS, 6.0, "slab"),
    "mp0-large": Arch("128x0e+128x1o+128x2e", MP_ZS, 6.0, "slab"),
    # MACE-OFF23 small: 96 channels, L=0; r_max 4.5 and num_radial_basis 8 (mace's default) are assumed.
    "off-small": Arch("96x0e", OFF_ZS, 4.5, "organic", num_radial_basis=8, avg_num_neighbors=20.0,
                      notes="r_max, num_radial_basis and avg_num_neighbors assumed"),
    # not a foundation model: the shipped demo model's width (16x0e+16x1o) on the MP element table
    "tiny": Arch("16x0e+16x1o", MP_ZS, 5.0, "slab", max_ell=2, correlation=2, num_radial_basis=8,
                 radial_MLP=(16, 16, 16), MLP_irreps="8x0e", avg_num_neighbors=40.0),
}


def miniature(arch: Arch) -> Arch:
    """Same block types, elements, max_ell, correlation and radial basis; 4 channels per irrep."""
    from e3nn import o3
    hidden = "+".join(f"4x{ir}" for _, ir in o3.Irreps(arch.hidden_irreps))
    return replace(arch, hidden_irreps=hidden, radial_MLP=(8, 8, 8), MLP_irreps="4x0e", avg_num_neighbors=8.0)


def cache_dir() -> Path:
    """$NTKAL_CACHE/archs, else ~/.cache/ntkal/archs (never inside the repository)."""
    root = os.environ.get("NTKAL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ntkal")
    return Path(root) / "archs"


def build(arch: Arch, seed: int = 0):
    """A fresh ScaleShiftMACE of `arch` in float64 with random weights (seeded)."""
    import mace  # noqa: F401  (before e3nn)
    import torch
    from e3nn import o3
    from mace import modules
    zs = list(arch.atomic_numbers)
    rng = np.random.default_rng(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(seed)
    try:
        model = modules.ScaleShiftMACE(
            r_max=arch.r_max, num_bessel=arch.num_radial_basis, num_polynomial_cutoff=arch.num_cutoff_basis,
            max_ell=arch.max_ell, interaction_cls=modules.interaction_classes[arch.interaction],
            interaction_cls_first=modules.interaction_classes[arch.interaction],
            num_interactions=arch.num_interactions, num_elements=len(zs), hidden_irreps=o3.Irreps(arch.hidden_irreps),
            MLP_irreps=o3.Irreps(arch.MLP_irreps), atomic_energies=-rng.uniform(1.0, 8.0, len(zs)),
            avg_num_neighbors=arch.avg_num_neighbors, atomic_numbers=zs, correlation=arch.correlation,
            gate=torch.nn.functional.silu, radial_MLP=list(arch.radial_MLP), use_reduced_cg=arch.use_reduced_cg,
            atomic_inter_scale=0.8, atomic_inter_shift=0.1)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def _key(arch: Arch, seed: int) -> str:
    spec = json.dumps(asdict(arch), sort_keys=True, default=list) + f"|seed={seed}"
    return hashlib.blake2b(spec.encode(), digest_size=6).hexdigest()


def model_path(name: str, mini: bool = False, seed: int = 0) -> Path:
    """The cached model file of arch `name` (built and saved on first use)."""
    import torch
    if name not in ARCHS:
        raise KeyError(f"unknown arch {name!r}; one of {', '.join(ARCHS)}")
    arch = miniature(ARCHS[name]) if mini else ARCHS[name]
    path = cache_dir() / f"{name}{'-mini' if mini else ''}-{_key(arch, seed)}.model"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(build(arch, seed), tmp)
        os.replace(tmp, path)  # atomic: concurrent builders never see a half-written file
    return path


def model(name: str, mini: bool = False, seed: int = 0):
    """The model of arch `name` (float64, eval mode), from the cache."""
    import torch
    return torch.load(model_path(name, mini, seed), map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------------------------------
# structures
# --------------------------------------------------------------------------------------------------

def slab(n_atoms: int, seed: int = 0, rattle: float = 0.05):
    """A rattled Cu(111) slab (3-4 layers, a x b surface cell) with CO on top, as close to n_atoms as possible."""
    from ase.build import add_adsorbate, fcc111, molecule
    best = None
    for layers in (4, 3, 2):
        for a in range(1, 9):
            for b in range(a, 9):
                n = a * b * layers + 2
                score = (abs(n - n_atoms), layers != 4, b - a)
                if best is None or score < best[0]:
                    best = (score, a, b, layers)
    _, a, b, layers = best
    s = fcc111("Cu", size=(a, b, layers), vacuum=6.0)
    add_adsorbate(s, molecule("CO"), 1.85, "ontop", mol_index=1)
    s.center(vacuum=6.0, axis=2)
    rng = np.random.default_rng(seed)
    s.positions += rng.normal(scale=rattle, size=s.positions.shape)
    return s


ORGANICS = ("CH3CH2OH", "C6H6", "CH3COOH", "CH3NO2", "CH3SH", "CH3Cl", "PH3", "HCN", "CH3CONH2", "C5H5N",
            "H2O", "CF4", "C4H4S", "CH3CH2NH2")


def organic_cluster(n_atoms: int, seed: int = 0, spacing: float = 4.5):
    """Randomly oriented molecules (MACE-OFF elements) on a jittered grid until >= n_atoms atoms; no PBC."""
    from ase import Atoms
    from ase.build import molecule
    rng = np.random.default_rng(seed)
    out = Atoms()
    i = 0
    while len(out) < n_atoms:
        m = molecule(ORGANICS[rng.integers(len(ORGANICS))])
        if len(out) + len(m) > n_atoms + 3 and len(out) > 0:
            m = molecule("H2O")
        m.rotate(rng.uniform(0, 360), rng.normal(size=3) + 1e-3, center="COP")
        cell = np.array([i % 3, (i // 3) % 3, i // 9], dtype=float)
        m.translate(cell * spacing + rng.uniform(-0.3, 0.3, 3) - m.get_center_of_mass())
        out += m
        i += 1
    out.center(vacuum=5.0)
    out.pbc = False
    out.positions += rng.normal(scale=0.03, size=out.positions.shape)
    return out


def structures(name: str, n_atoms: int, count: int, seed: int = 0) -> List:
    """`count` structures of about n_atoms atoms for arch `name` (rattled slabs or organic clusters)."""
    kind = ARCHS[name].kind
    make = slab if kind == "slab" else organic_cluster
    return [make(n_atoms, seed=seed * 1000 + i) for i in range(count)]


# --------------------------------------------------------------------------------------------------
# a real multi-head model, as mace_run_train --multiheads_finetuning writes it
# --------------------------------------------------------------------------------------------------

@dataclass
class MultiheadResult:
    path: Path
    heads: List[str]
    command: List[str] = field(default_factory=list)


def multihead_model(foundation, workdir, head: str = "Default", seed: int = 1, n_train: int = 8,
                    extra_args: Sequence[str] = ("--force_mh_ft_lr=True", "--lr=0.01"),
                    timeout: float = 300.0) -> MultiheadResult:
    """Fine-tune `foundation` (a model or a path) for one epoch with mace_run_train
    --multiheads_finetuning True and a local --pt_train_file; returns the multi-head model file it wrote.

    Labels are random (the model's weights, not its accuracy, are what the tests need). extra_args
    default to a learning rate of 0.01 without mace's multi-head EMA, so that one epoch moves the
    heads' readouts apart visibly. Takes ~10 s on a ~20k-parameter foundation model on one CPU core.
    """
    import ase.io
    import torch
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if isinstance(foundation, (str, os.PathLike)):
        fpath = Path(foundation).resolve()
        fmodel = torch.load(fpath, map_location="cpu", weights_only=False)
    else:
        fmodel, fpath = foundation, workdir / "foundation.model"
        torch.save(foundation, fpath)
    zs = [int(z) for z in fmodel.atomic_numbers]
    e0 = fmodel.atomic_energies_fn.atomic_energies.detach().double().reshape(-1, len(zs))[0].tolist()
    rng = np.random.default_rng(seed)
    files = {}
    for tag in ("pt", "ft"):
        ats = _labelled(zs, n_train, rng)
        files[tag] = workdir / f"{tag}.xyz"
        ase.io.write(files[tag], ats, format="extxyz")
    exe = shutil.which("mace_run_train") or str(Path(sys.executable).parent / "mace_run_train")
    heads_yaml = None
    if head != "Default":  # the fine-tuning head's name comes from --heads
        heads_yaml = "{'%s': {'train_file': '%s'}}" % (head, files["ft"])
    cmd = [exe, "--name=mh", f"--work_dir={workdir}", f"--train_file={files['ft']}", "--valid_fraction=0.25",
           "--energy_key=REF_energy", "--forces_key=REF_forces", f"--foundation_model={fpath}",
           "--multiheads_finetuning=True", f"--pt_train_file={files['pt']}", "--foundation_model_elements=True",
           "--model=ScaleShiftMACE", "--device=cpu", "--default_dtype=float64", "--batch_size=4",
           "--max_num_epochs=1", f"--seed={seed}", "--plot=False", "--num_workers=0", "--pin_memory=False",
           "--save_cpu", "--E0s={" + ", ".join(f"{z}: {e}" for z, e in zip(zs, e0)) + "}"]
    if heads_yaml is not None:
        cmd.append(f"--heads={heads_yaml}")
    cmd.extend(extra_args)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        log.seek(0)
        text = log.read()
    path = workdir / "mh.model"
    if proc.returncode != 0 or not path.exists():
        raise RuntimeError(f"mace_run_train failed (exit {proc.returncode}):\n{text[-3000:]}")
    heads = list(torch.load(path, map_location="cpu", weights_only=False).heads)
    return MultiheadResult(path, heads, cmd)


def _labelled(zs, n, rng):
    """n small random structures of the model's elements with random REF_energy / REF_forces."""
    from ase import Atoms
    out = []
    for _ in range(n):
        k = int(rng.integers(3, 7))
        numbers = rng.choice(zs, size=k)
        pos = rng.uniform(0, 3.0, size=(k, 3))
        pos += np.arange(k)[:, None] * np.array([1.1, 0.0, 0.0])  # no two atoms on top of each other
        a = Atoms(numbers=numbers, positions=pos, cell=[10.0, 10.0, 10.0], pbc=False)
        a.info["REF_energy"] = float(rng.normal())
        a.arrays["REF_forces"] = rng.normal(scale=0.1, size=(k, 3))
        out.append(a)
    return out
