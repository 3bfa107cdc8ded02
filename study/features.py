"""Feature rows of the ONE pretrained model, computed once per structure and reused every round.

The NTK and embedding methods select with the pretrained model's features and the growing labelled
set (the paper's point), so a structure's rows never change during a study: they are cached by
`info["exp_id"]`. Three featurisations are kept (all with sketch seed 0, the study's fixed sketch):
  - "embedding": one mean-node-feature row;
  - "energy":    the energy-NTK row (also the LCMD vector of every NTK kernel);
  - "joint" / "joint_exact" / "joint_probes": energy + force rows; pool rows as `selection.force_probes`
    says (null: exact 3N rows, `ntkal select` as shipped), exact rows for labelled, target and
    greedy-candidate structures (as `ntkal.select` does), and `selection.probe_variant` Rademacher probes
    for the "~probes" methods' pools. The force kernel is the joint block without its energy row;
  - "readout": the energy row of the readout parameters alone (params="readout"), the last-layer
    posterior of the LLPR-style baseline.
The pretrained model's predictions (energy, forces) are cached the same way: the residuals of the
error-aware score and the cheap metrics (pretrained error of picks vs pool) use them.
The seconds each structure's featurisation took are recorded, so a round's acquisition time can be
charged what a fresh `ntkal.select` call would spend on the same structures.
"""
from __future__ import annotations

import time
from typing import Dict, Sequence, Tuple

import numpy as np

from ntkal import ENERGY, FORCE, MACEFeaturizer, RowBlock
from ntkal.acquisition.residuals import residual_rows

from .config import SelectionConfig

#: which cached featurisation serves each kernel's pool rows (force rows: the joint block's)
_SOURCE = {"embedding": "embedding", "energy": "energy", "force": "joint", "joint": "joint", "readout": "readout"}


class FeatureStore:
    """Per-structure RowBlocks of one model, computed on first use (chunked) and cached by exp_id."""

    def __init__(self, model_path, sel: SelectionConfig, chunk_size: int = 32):
        base = MACEFeaturizer(str(model_path), kernel="joint", sketch_dim=sel.sketch_dim,
                              force_probes=sel.force_probes, seed=0)
        self.featurizers = {"joint": base, "joint_exact": base.with_kernel("joint", None),
                            "joint_probes": base.with_kernel("joint", sel.probe_variant),
                            "energy": base.with_kernel("energy", None),
                            "embedding": base.with_kernel("embedding", None),
                            "readout": MACEFeaturizer(str(model_path), kernel="energy", sketch_dim=sel.sketch_dim,
                                                      params="readout", seed=0)}
        self._pred: Dict[str, tuple] = {}
        self.chunk_size = int(chunk_size)
        self.cache: Dict[str, Dict[str, RowBlock]] = {k: {} for k in self.featurizers}
        self.cost: Dict[str, Dict[str, float]] = {k: {} for k in self.featurizers}  # seconds per structure
        if sel.force_probes is None:     # exact pool rows: one featurisation serves pool and labelled set
            self.cache["joint_exact"], self.cost["joint_exact"] = self.cache["joint"], self.cost["joint"]
        self.settings = {**base.settings(), "pool_force_probes": sel.force_probes, "labelled_force_rows": "exact",
                         "probes_variant_force_probes": sel.probe_variant}

    @staticmethod
    def source(kernel: str, exact: bool = False, probes: bool = False) -> str:
        """The cached featurisation serving `kernel`: exact force rows, the probes variant's, or the pool's."""
        src = _SOURCE[kernel]
        if src == "joint" and exact:
            return "joint_exact"
        return "joint_probes" if src == "joint" and probes else src

    def _fill(self, source: str, structures: Sequence) -> None:
        todo = [a for a in structures if a.info["exp_id"] not in self.cache[source]]
        fz = self.featurizers[source]
        for start in range(0, len(todo), self.chunk_size):
            chunk = todo[start:start + self.chunk_size]
            t0 = time.perf_counter()
            block = fz(chunk)
            per = (time.perf_counter() - t0) / len(chunk)
            for i, a in enumerate(chunk):
                self.cache[source][a.info["exp_id"]] = block.select([i])
                self.cost[source][a.info["exp_id"]] = per

    def rows(self, kernel: str, structures: Sequence, exact: bool = False, probes: bool = False) -> Tuple[RowBlock, float]:
        """(RowBlock of `kernel` for the structures in order, seconds a fresh featurisation would take)."""
        source = self.source(kernel, exact, probes)
        self._fill(source, structures)
        ids = [a.info["exp_id"] for a in structures]
        block = RowBlock.cat([self.cache[source][i] for i in ids])
        if kernel == "force":
            block = block.only((FORCE,))
        elif kernel in ("energy", "readout"):
            block = block.only((ENERGY,))
        return block, float(sum(self.cost[source][i] for i in ids))

    def predictions(self, structures: Sequence):
        """(energies [n], forces list) of the pretrained model, cached per structure."""
        todo = [a for a in structures if a.info["exp_id"] not in self._pred]
        for start in range(0, len(todo), self.chunk_size):
            chunk = todo[start:start + self.chunk_size]
            e, f = self.featurizers["joint"].predict(chunk)
            self._pred.update({a.info["exp_id"]: (float(ei), fi) for a, ei, fi in zip(chunk, e, f)})
        got = [self._pred[a.info["exp_id"]] for a in structures]
        return np.array([g[0] for g in got]), [g[1] for g in got]

    def residuals(self, kernel: str, structures: Sequence, exact: bool, probes: bool = False):
        """(rows, per-row residuals label − pretrained prediction, seconds): the error-aware score's input."""
        rows, secs = self.rows(kernel, structures, exact, probes)
        e, f = self.predictions(structures)
        fz = self.featurizers[self.source("joint", exact, probes)]
        return rows, residual_rows(rows, structures, e, f, lambda a: fz.probe_vectors(a, fz.force_probes)), secs

    def _own(self) -> list:
        """The featurisations with caches of their own (joint_exact shares joint's when pools are exact)."""
        return [k for k in self.cache if not (k == "joint_exact" and self.cache[k] is self.cache["joint"])]

    def seconds(self) -> Dict[str, float]:
        """Total featurisation seconds spent so far, per featurisation."""
        return {k: float(sum(self.cost[k].values())) for k in self._own()}

    def count(self) -> Dict[str, int]:
        return {k: len(self.cache[k]) for k in self._own()}
