"""The study's method names: the one list config.py validates against and runner.py dispatches on.

"random"; "<kernel>" (PV shortlist + LCMD on one kernel of the pretrained model: the paper's method);
"top" (top-PV of `selection.top_kernel`, no LCMD: the ablation); "committee" (member disagreement);
"llpr" (PV of the readout parameters alone, the LLPR-style peer); "<kernel>+target" (expected reduction
of a target sample's predictive variance, NTK kernels only); "error:<kernel>" / "error+pretrain:<kernel>"
(the error-aware score, without / with the pretraining sample in the posterior: `ntkal select`'s score);
a suffix on an NTK method changes its pool force rows: "~exact" (exact 3N rows, `ntkal select` as shipped)
or "~probes" (`selection.probe_variant` Rademacher probes) instead of `selection.force_probes`.
Rails, which read the pool's reference labels (no selector can): "oracle:top" (the B largest real force
errors of the pretrained model) and "oracle:diverse" (greedy k-centre on the model's invariant descriptors
among the 3B largest real errors): acquisition.oracle_picks.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from ntkal.options import KERNELS

ORACLES = ("oracle:top", "oracle:diverse")
VARIANTS = ("~probes", "~exact")


def known_methods() -> List[str]:
    """Every method name a study config may list."""
    ntk = ([f"{k}+target" for k in KERNELS[1:]] + [f"error:{k}" for k in KERNELS]
           + [f"error+pretrain:{k}" for k in KERNELS])
    varied = [f"{m}{v}" for v in VARIANTS for m in list(KERNELS[1:]) + ntk if "embedding" not in m]
    return ["random", "committee", "top", "llpr"] + list(ORACLES) + list(KERNELS) + ntk + varied


def is_rail(method: str) -> bool:
    """Random and the oracles: the reference points every scenario reports, not methods a user can run."""
    return method == "random" or method in ORACLES


def pool_rows_variant(method: str) -> Tuple[str, Optional[str]]:
    """('error:joint', 'probes') for 'error:joint~probes', ('joint', 'exact') for 'joint~exact';
    (method, None) otherwise."""
    for v in VARIANTS:
        if method.endswith(v):
            return method[: -len(v)], v[1:]
    return method, None


def parse_method(method: str) -> Tuple[str, Optional[str], bool]:
    """(base, kernel, with_target): 'joint+target' -> ('joint', 'joint', True); 'top' -> ('top', None, False);
    'error+pretrain:force' -> ('error+pretrain', 'force', False); the oracles -> ('oracle', 'top' | 'diverse',
    False). A '~probes' / '~exact' suffix is ignored here (pool_rows_variant reads it)."""
    method, _ = pool_rows_variant(method)
    if ":" in method:
        base, kernel = method.split(":", 1)
        return base, kernel, False
    with_target = method.endswith("+target")
    base = method[: -len("+target")] if with_target else method
    return base, (base if base in KERNELS else None), with_target
