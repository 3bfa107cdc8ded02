"""The study's method names: the one list config.py validates against and runner.py dispatches on.

"random"; "<kernel>" (PV shortlist + LCMD on one kernel of the pretrained model: the paper's method);
"top" (top-PV of `selection.top_kernel`, no LCMD: the ablation); "committee" (member disagreement);
"llpr" (PV of the readout parameters alone, the LLPR-style peer); "<kernel>+target" (expected reduction
of a target sample's predictive variance, NTK kernels only); "error:<kernel>" / "error+pretrain:<kernel>"
(the error-aware score, without / with the pretraining sample in the posterior).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from ntkal.options import KERNELS


def known_methods() -> List[str]:
    """Every method name a study config may list."""
    return (["random", "committee", "top", "llpr"] + list(KERNELS) + [f"{k}+target" for k in KERNELS[1:]]
            + [f"error:{k}" for k in KERNELS] + [f"error+pretrain:{k}" for k in KERNELS])


def parse_method(method: str) -> Tuple[str, Optional[str], bool]:
    """(base, kernel, with_target): 'joint+target' -> ('joint', 'joint', True); 'top' -> ('top', None, False);
    'error+pretrain:force' -> ('error+pretrain', 'force', False)."""
    if ":" in method:
        base, kernel = method.split(":", 1)
        return base, kernel, False
    with_target = method.endswith("+target")
    base = method[: -len("+target")] if with_target else method
    return base, (base if base in KERNELS else None), with_target
