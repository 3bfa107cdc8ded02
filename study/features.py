"""Feature rows of the ONE pretrained model, computed once per structure and reused every round.

The NTK and embedding methods select with the pretrained model's features and the growing labelled
set (the paper's point), so a structure's rows never change during a study: they are cached by
`info["exp_id"]`. Three featurisations are kept (all with sketch seed 0, the study's fixed sketch):
  - "embedding": one mean-node-feature row;
  - "energy":    the energy-NTK row (also the LCMD vector of every NTK kernel);
  - "joint" / "joint_exact": energy + force rows, force rows by Rademacher probes for pool scoring
    (`selection.force_probes`) or exact 3N rows for labelled, target and greedy-candidate structures
    (as `ntkal.select` does). The force kernel is the joint block without its energy row;
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

#: which cached featurisation serves each (kernel, exact?) request
_SOURCE = {("embedding", False): "embedding", ("embedding", True): "embedding",
           ("energy", False): "energy", ("energy", True): "energy",
           ("force", False): "joint", ("force", True): "joint_exact",
           ("joint", False): "joint", ("joint", True): "joint_exact",
           ("readout", False): "readout", ("readout", True): "readout"}


class FeatureStore:
    """Per-structure RowBlocks of one model, computed on first use (chunked) and cached by exp_id."""

    def __init__(self, model_path, sel: SelectionConfig, chunk_size: int = 32):
        base = MACEFeaturizer(str(model_path), kernel="joint", sketch_dim=sel.sketch_dim,
                              force_probes=sel.force_probes, seed=0)
        self.featurizers = {"joint": base, "joint_exact": base.with_kernel("joint", None),
                            "energy": base.with_kernel("energy", None),
                            "embedding": base.with_kernel("embedding", None),
                            "readout": MACEFeaturizer(str(model_path), kernel="energy", sketch_dim=sel.sketch_dim,
                                                      params="readout", seed=0)}
        self._pred: Dict[str, tuple] = {}
        self.chunk_size = int(chunk_size)
        self.cache: Dict[str, Dict[str, RowBlock]] = {k: {} for k in self.featurizers}
        self.cost: Dict[str, Dict[str, float]] = {k: {} for k in self.featurizers}  # seconds per structure
        self.settings = {**base.settings(), "pool_force_probes": sel.force_probes, "labelled_force_rows": "exact"}

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

    def rows(self, kernel: str, structures: Sequence, exact: bool = False) -> Tuple[RowBlock, float]:
        """(RowBlock of `kernel` for the structures in order, seconds a fresh featurisation would take)."""
        source = _SOURCE[(kernel, exact)]
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

    def residuals(self, kernel: str, structures: Sequence, exact: bool):
        """(rows, per-row residuals label − pretrained prediction, seconds): the error-aware score's input."""
        rows, secs = self.rows(kernel, structures, exact)
        e, f = self.predictions(structures)
        fz = self.featurizers["joint"]
        return rows, residual_rows(rows, structures, e, f, lambda a: fz.probe_vectors(a, fz.force_probes)), secs

    def seconds(self) -> Dict[str, float]:
        """Total featurisation seconds spent so far, per featurisation."""
        return {k: float(sum(v.values())) for k, v in self.cost.items()}

    def count(self) -> Dict[str, int]:
        return {k: len(v) for k, v in self.cache.items()}
