"""MACE featurizer: structures -> RowBlocks of embedding, energy-NTK and force-NTK rows (docs/design.md, Features).

The reference path loops over structures with torch.autograd.grad: one backward for the energy
row, one double backward per force row (3N exact rows, or m Rademacher probes). It is slow and
obviously right, works for any parameter, and is the oracle for the fast batched path (fast.py),
which impl="auto" uses whenever it has a rule for every sketched parameter.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import mace  # noqa: F401  (before e3nn: docs/design.md, Imports)
import numpy as np
import torch

from ..errors import InputError, ModelError
from ..options import IMPLS, KERNELS, PARAM_SETS
from .fast import FastRoute, FastTaps, UnsupportedModel, fast_rows
from .memory import MemoryPlan
from .rowblock import EMBEDDING, RowBlock, structure_rows
from .sketch import Sketch

PT_HEAD = "pt_head"  # the pretraining head mace_run_train --multiheads_finetuning adds
log = logging.getLogger("ntkal")


def load_model(model: Union[str, os.PathLike, torch.nn.Module], device="cpu", dtype=torch.float32) -> torch.nn.Module:
    """A private copy of a MACE model (from a path or a module) in `dtype` on `device`, in eval mode."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.exists():
            raise InputError("no such model file", path=path)
        if not path.is_file():
            raise InputError("model path is not a file", path=path)
        try:
            loaded = torch.load(path, map_location=device, weights_only=False)
        except Exception as exc:  # torch raises many types for a non-model file
            raise ModelError(f"{path}: not a MACE model file ({type(exc).__name__}: {str(exc)[:120]})") from None
        if not _is_mace(loaded):
            raise ModelError(f"{path}: not a MACE model file (it holds a {type(loaded).__name__})")
        model = loaded
    elif not isinstance(model, torch.nn.Module) or not _is_mace(model):
        raise ModelError(f"not a MACE model: {type(model).__name__}")
    else:
        model = copy.deepcopy(model)
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def atomic_data(atoms_list: Sequence, z_table, r_max: float, heads, dtype) -> list:
    """MACE's AtomicData of each structure (config_from_atoms -> AtomicData), floats in `dtype`."""
    from mace import data as mace_data
    keys = mace_data.KeySpecification(info_keys={}, arrays_keys={})
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # AtomicData takes positions in the default dtype
    try:
        return [mace_data.AtomicData.from_config(mace_data.config_from_atoms(a, key_specification=keys),
                                                 z_table=z_table, cutoff=r_max, heads=heads) for a in atoms_list]
    finally:
        torch.set_default_dtype(old)


def collate(data_list: Sequence, dtype, device="cpu", head: Optional[int] = None) -> dict:
    """One MACE input batch (a dict) of AtomicData through MACE's DataLoader; every structure on `head`."""
    from mace.tools import torch_geometric
    loader = torch_geometric.dataloader.DataLoader(dataset=list(data_list), batch_size=len(data_list), shuffle=False)
    data = next(iter(loader)).to(device).to_dict()
    out = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in data.items()}
    if head is not None:
        out["head"] = torch.full_like(out["head"], head)
    return out


def _is_mace(obj) -> bool:
    return isinstance(obj, torch.nn.Module) and all(
        hasattr(obj, a) for a in ("atomic_numbers", "r_max", "interactions", "products", "readouts"))


class MACEFeaturizer:
    """Feature rows of one pretrained MACE model for a list of ase.Atoms (docs/design.md, Features).

    kernel: "embedding" | "energy" | "force" | "joint"; sketch_dim k; params "readout" | "last" |
    "all"; force_probes None (exact 3N force rows) or m (Rademacher probe rows); seed fixes the
    sketch and the probes; probe_seed, if given, the probes instead (new probes, same sketch); impl
    "auto" | "fast" | "reference"; route: how the fast path computes (fast.FastRoute; the same rows on
    every route); head: the head of a multi-head model (None: the fine-tuned one, i.e. the only head
    that is not "pt_head"); memory_gb: a peak-memory budget (process RSS on a CPU, allocated memory on
    a GPU) from which every call sizes its batches (memory.py), None: batches of batch_size.
    """

    def __init__(self, model, kernel: str = "joint", sketch_dim: int = 512, params: str = "all",
                 force_probes: Optional[int] = None, seed: int = 0, impl: str = "auto",
                 dtype=torch.float32, device: Union[str, torch.device] = "cpu", batch_size: int = 32,
                 head: Optional[str] = None, memory_gb: Optional[float] = None,
                 probe_seed: Optional[int] = None, route: FastRoute = FastRoute()):
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if params not in PARAM_SETS:
            raise ValueError(f"params must be one of {PARAM_SETS}, got {params!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if force_probes is not None and int(force_probes) < 1:
            raise ValueError("force_probes must be a positive integer or None")
        if int(sketch_dim) < 1:
            raise ValueError("sketch_dim must be positive")
        if memory_gb is not None and not float(memory_gb) > 0:
            raise ValueError("memory_gb must be positive or None")
        self.kernel, self.params, self.seed = kernel, params, int(seed)
        self._probe_seed = None if probe_seed is None else int(probe_seed)
        self.route = route
        self.sketch_dim = int(sketch_dim)
        self.force_probes = None if force_probes is None else int(force_probes)
        self.dtype, self.device, self.batch_size = dtype, torch.device(device), int(batch_size)
        self.model = load_model(model, self.device, dtype)
        self.model_source = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
        self.atomic_numbers = [int(z) for z in self.model.atomic_numbers]
        self.r_max = float(self.model.r_max)
        self.heads = list(getattr(self.model, "heads", None) or ["Default"])
        self.head = select_head(self.heads, head, self.model_source)
        self.head_index = self.heads.index(self.head)
        self.memory_gb = memory_gb
        self.memory = MemoryPlan(memory_gb, self.device)
        self.requested_impl = impl
        self.sketch = None
        self.coverage = None
        self._taps = None
        self.fallback_reason = None
        if kernel != "embedding":
            self._make_sketch()
        self._z_table = None
        self.row_chunk = 64  # reference path: force rows per vmapped double backward (rows x parameters memory)

    # --- settings -------------------------------------------------------------------------------
    def settings(self) -> dict:
        return {"kernel": self.kernel, "sketch_dim": self.sketch_dim, "params": self.params,
                "force_probes": self.force_probes, "seed": self.seed, "probe_seed": self.probe_seed,
                "impl": self.impl, "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device),
                "coverage": self.coverage, "model": self.model_source, "head": self.head,
                "memory_gb": self.memory_gb, "fallback_reason": self.fallback_reason}

    @property
    def probe_seed(self) -> int:
        return self.seed if self._probe_seed is None else self._probe_seed

    def with_kernel(self, kernel: str, force_probes="same", probe_seed="same") -> "MACEFeaturizer":
        """A shallow copy sharing the model, sketch, fast-path taps and memory plan, with another kernel,
        probe count or probe seed."""
        other = copy.copy(self)
        other.kernel = kernel
        if force_probes != "same":
            other.force_probes = force_probes
        if probe_seed != "same":
            other._probe_seed = None if probe_seed is None else int(probe_seed)
        if other.sketch is None and kernel != "embedding":
            other._make_sketch()
        return other

    def _make_sketch(self):
        """The parameter sketch and, unless impl="reference", the fast path's taps on the model."""
        self.sketch = Sketch.for_model(self.model, self.sketch_dim, self.params, self.seed, self.dtype, self.device)
        self.coverage = self.sketch.coverage
        if self.requested_impl == "reference":
            return
        try:
            self._taps = FastTaps(self.model, self.sketch, self.route)
        except UnsupportedModel as exc:
            if self.requested_impl == "fast":
                raise ValueError(f"impl='fast' cannot handle this model: {exc}") from None
            self.fallback_reason = str(exc)
            log.warning("fast featurizer unavailable for this model (%s); using the reference path (slower)", exc)

    def close(self):
        """Remove the fast path's hooks from the model (shared with with_kernel copies, which then take
        the reference path). Dropping every featurizer that shares them does the same."""
        if self._taps is not None:
            self._taps.close()
        self._taps = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def impl(self) -> str:
        """The path __call__ takes: "fast" or "reference" ("auto": fast whenever every sketched parameter
        has a fast-path rule)."""
        if self._taps is None or not self._taps.alive:
            return "reference"
        return "fast"

    @property
    def psi_dim(self) -> int:
        return self.embedding_dim if self.kernel == "embedding" else self.sketch_dim

    @property
    def embedding_dim(self) -> int:
        return self._invariant_layout()[0] * len(self.model.interactions)

    def _invariant_layout(self):
        """(invariant channels per interaction, lmax) of the node features (mace's extract_invariant takes both)."""
        from e3nn import o3
        irreps_out = o3.Irreps(str(self.model.products[0].linear.irreps_out))
        return irreps_out.dim // (irreps_out.lmax + 1) ** 2, irreps_out.lmax

    def atom_invariants(self, data: dict) -> torch.Tensor:
        """Each atom's invariant node features [atoms, embedding_dim] of one collated batch (no gradients): the
        embedding kernel's rows before their mean over atoms."""
        from mace.modules.utils import extract_invariant
        n_inv, lmax = self._invariant_layout()
        with torch.no_grad():
            out = self.model(data, training=False, compute_force=False)
        return extract_invariant(out["node_feats"], len(self.model.interactions), n_inv, lmax)

    # --- batching -------------------------------------------------------------------------------
    def check_elements(self, atoms_list: Sequence, path=None, start: int = 0):
        """InputError naming the first structure with an element the model does not know (one pass)."""
        known = np.asarray(sorted(self.atomic_numbers))
        if not atoms_list:
            return
        numbers = np.concatenate([np.asarray(a.numbers) for a in atoms_list])
        if np.isin(numbers, known).all():
            return
        from ase.data import chemical_symbols
        for i, atoms in enumerate(atoms_list):
            bad = sorted(set(int(z) for z in atoms.numbers) - set(known.tolist()))
            if bad:
                raise InputError(
                    f"element(s) {', '.join(chemical_symbols[z] for z in bad)} not in the model "
                    f"(it knows {', '.join(chemical_symbols[z] for z in known)})", path=path, index=start + i)

    def atomic_data(self, atoms_list: Sequence) -> list:
        """MACE's AtomicData of each structure (neighbour lists built once per call)."""
        from mace.tools import AtomicNumberTable
        if self._z_table is None:
            self._z_table = AtomicNumberTable(self.atomic_numbers)
        return atomic_data(atoms_list, self._z_table, self.r_max, self.heads, self.dtype)

    def collate(self, data_list: Sequence) -> dict:
        """One input batch of AtomicData, every structure on the featurizer's head."""
        return collate(data_list, self.dtype, self.device, self.head_index)

    def batch(self, atoms_list: Sequence) -> dict:
        """MACE's own data path (config_from_atoms -> AtomicData -> DataLoader), as eval_configs does."""
        return self.collate(self.atomic_data(atoms_list))

    def units(self, data_list: Sequence) -> list:
        """Size of each structure for the memory plan: atoms + edges / avg_num_neighbors."""
        avg = max(float(getattr(self.model.interactions[0], "avg_num_neighbors", 1.0)), 1.0)
        return [int(d.num_nodes) + int(d.edge_index.shape[1]) / avg for d in data_list]

    def _batches(self, key: str, atoms_list, data_list, cap: Optional[int] = None):
        """(indices, collated batch) in input order, sized from the memory budget, each measured."""
        units = self.units(data_list)
        for idx in self.memory.batches(key, list(range(len(atoms_list))), units, cap or self.batch_size):
            with self.memory.measure(key, sum(units[i] for i in idx)):
                yield idx, self.collate([data_list[i] for i in idx])

    # --- features -------------------------------------------------------------------------------
    def __call__(self, atoms_list: Sequence) -> RowBlock:
        atoms_list = list(atoms_list)
        if not atoms_list:
            k = self.psi_dim
            empty = torch.zeros(0, k, dtype=self.dtype, device=self.device)
            return RowBlock(empty, torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int8),
                            torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
        self.check_elements(atoms_list)
        data_list = self.atomic_data(atoms_list)
        if self.kernel == "embedding":
            return self._embedding_rows(atoms_list, data_list)
        if self.impl == "fast":
            return fast_rows(self, atoms_list, data_list)
        return self._reference_rows(atoms_list, data_list)

    def predict(self, atoms_list: Sequence):
        """The model's energies (float64 [n], eV) and forces (list of float64 [N_i, 3], eV/Å) on the
        featurizer's head, dtype and device, in memory-sized batches."""
        atoms_list = list(atoms_list)
        energies, forces = np.zeros(len(atoms_list)), [None] * len(atoms_list)
        if not atoms_list:
            return energies, []
        self.check_elements(atoms_list)
        for idx, data in self._batches("predict", atoms_list, self.atomic_data(atoms_list)):
            out = self.model(data, training=False, compute_force=True)
            e = out["energy"].detach().double().cpu().numpy()
            f = out["forces"].detach().double().cpu().numpy()
            ptr = data["ptr"].cpu().numpy()
            for j, i in enumerate(idx):
                energies[i] = e[j]
                forces[i] = f[ptr[j]:ptr[j + 1]].copy()
        return energies, forces

    def _embedding_rows(self, atoms_list, data_list) -> RowBlock:
        rows = [None] * len(atoms_list)
        for idx, data in self._batches("embedding", atoms_list, data_list):
            inv = self.atom_invariants(data)
            summed = torch.zeros(len(idx), inv.shape[1], dtype=inv.dtype, device=inv.device).index_add_(0, data["batch"], inv)
            counts = (data["ptr"][1:] - data["ptr"][:-1]).to(inv.dtype)
            for j, i in enumerate(idx):
                rows[i] = summed[j] / counts[j]
        rows = torch.stack(rows)
        n = len(atoms_list)
        natoms = torch.tensor([len(a) for a in atoms_list], dtype=torch.int64)
        return RowBlock(rows, torch.arange(n + 1), torch.full((n,), EMBEDDING, dtype=torch.int8), natoms,
                        torch.full((n,), -1, dtype=torch.int64))

    def probe_vectors(self, atoms, m: int) -> torch.Tensor:
        """Rademacher z_j in {-1, +1}^{3N}, fixed by the seed and the structure's content (not its position in a pool)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(f"ntkal-probe:{self.probe_seed}:{m}".encode())
        for arr in (atoms.numbers.astype(np.int64), np.asarray(atoms.positions, dtype=np.float64),
                    np.asarray(atoms.cell[:], dtype=np.float64), np.asarray(atoms.pbc, dtype=np.int8)):
            h.update(np.ascontiguousarray(arr).tobytes())
        gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(h.digest(), "little") & ((1 << 63) - 1))
        z = torch.randint(0, 2, (m, 3 * len(atoms)), generator=gen, dtype=torch.int64) * 2 - 1
        return z.to(device=self.device, dtype=self.dtype)

    def _grads(self, out, params, create_graph=False):
        gs = torch.autograd.grad(out, params, retain_graph=True, create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(p).reshape(1, -1) if g is None else g.reshape(1, -1) for g, p in zip(gs, params)]

    def _row_grads(self, forces, vecs, params):
        """Parameter gradients of the force projections vecs @ F, one row per vector (a vmapped double backward)."""
        gs = torch.autograd.grad(forces, params, grad_outputs=vecs, retain_graph=True,
                                 allow_unused=True, is_grads_batched=True)
        r = vecs.shape[0]
        return [torch.zeros(r, p.numel(), dtype=p.dtype, device=p.device) if g is None else g.reshape(r, -1)
                for g, p in zip(gs, params)]

    def _reference_rows(self, atoms_list, data_list) -> RowBlock:
        params = self.sketch.parameters
        want_forces = self.kernel in ("force", "joint")
        psis, force_rows = [], []
        key = f"reference-rows:{self.kernel}:{self.force_probes}"
        for atoms, d in zip(atoms_list, data_list):
            n_at = len(atoms)
            out = self.model(self.collate([d]), training=want_forces, compute_force=want_forces)
            psis.append(self.sketch.apply(self._grads(out["energy"].sum(), params))[0].detach() / n_at)
            if want_forces:
                forces = out["forces"].reshape(-1)
                if self.force_probes is None:  # rows of the identity: every force component, atom-major
                    vecs, scale = torch.eye(3 * n_at, dtype=self.dtype, device=self.device), 1.0
                else:  # F . z_j for Rademacher z_j
                    vecs = self.probe_vectors(atoms, self.force_probes)
                    scale = 1.0 / math.sqrt(self.force_probes)
                parts = []
                # rows per vmapped double backward: row_chunk, or what the memory budget holds (memory.py)
                for idx in self.memory.batches(key, list(range(vecs.shape[0])), [1.0] * vecs.shape[0], self.row_chunk):
                    with self.memory.measure(key, len(idx)):
                        parts.append(self.sketch.apply(self._row_grads(forces, vecs[idx], params)).detach())
                force_rows.append(torch.cat(parts) * scale)
            # the next structure's forward must not run while this one's double-backward graph is alive:
            # that forward is outside the memory plan's measured blocks (memory.py)
            out = forces = None
        natoms = torch.tensor([len(a) for a in atoms_list], dtype=torch.int64)
        return structure_rows(torch.stack(psis), force_rows if want_forces else None, natoms,
                              self.kernel in ("energy", "joint"), self.force_probes is None)


def select_head(heads: Sequence[str], head: Optional[str], source: str = "model") -> str:
    """The head to use: `head` if given (InputError listing the heads otherwise), else the only head,
    else the only one that is not the pretraining head "pt_head" (ModelError if that is ambiguous)."""
    heads = list(heads)
    if head is not None:
        if head not in heads:
            raise InputError(f"--head {head!r} is not a head of the model (its heads: {', '.join(heads)})", path=source)
        return head
    if len(heads) == 1:
        return heads[0]
    tuned = [h for h in heads if h != PT_HEAD]
    if len(tuned) == 1:
        return tuned[0]
    raise ModelError(f"{source}: the model has heads {', '.join(heads)}; choose one with head=NAME")
