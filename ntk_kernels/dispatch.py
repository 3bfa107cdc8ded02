"""Public entry points: validate arguments once, then run the Triton kernel or the PyTorch reference.

Triton runs when every tensor is on CUDA and ``triton`` imports; otherwise the reference runs. The
environment variable ``NTK_KERNELS_IMPL=reference|triton`` forces a side (``auto`` or unset: choose).
Forcing ``triton`` on CPU tensors only works under ``TRITON_INTERPRET=1`` (that is how CPU tests run
the kernels). Importing this module never imports ``triton``.
"""
from __future__ import annotations

import functools
import os

import torch

from . import reference

ENV_VAR = "NTK_KERNELS_IMPL"
IMPLS = ("reference", "triton")

__all__ = ["impl_for", "tensor_sketch", "segment_quadform", "lcmd_update", "ENV_VAR", "IMPLS"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the ``triton`` package imports (it may still lack a driver: see ``impl_for``)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything else
        return False
    return True


def forced_impl() -> str | None:
    """The side forced by ``NTK_KERNELS_IMPL``, or None when it is unset/``auto``."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in IMPLS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of 'reference', 'triton', 'auto'")
    return value


def impl_for(*tensors) -> str:
    """``"triton"`` or ``"reference"``: which side the public functions use for these tensors.

    ``None`` entries are ignored. Without a forcing env var, Triton needs all tensors on CUDA.
    """
    forced = forced_impl()
    if forced == "reference":
        return "reference"
    if forced == "triton":
        if not triton_available():
            raise ValueError(f"{ENV_VAR}=triton but the triton package cannot be imported")
        return "triton"
    ts = [t for t in tensors if t is not None]
    if ts and all(isinstance(t, torch.Tensor) and t.is_cuda for t in ts) and triton_available():
        return "triton"
    return "reference"


# --------------------------------------------------------------------------------------------------
# Argument checks. The ``check_*_args`` functions look only at shapes/dtypes/devices (no host sync);
# the launchers in ``ntk_kernels.ops`` call them too. ``check_seg`` reads seg's values (one sync).
# --------------------------------------------------------------------------------------------------

def _tensor(name, t, ndim, device=None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


def _float(name, t, dtype=None):
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype} (same as the first input)")


def _n_seg(n_seg):
    if isinstance(n_seg, bool) or not isinstance(n_seg, int) or n_seg < 0:
        raise ValueError(f"n_seg must be a non-negative int, got {n_seg!r}")


def _seg_shape(seg, R, device):
    _tensor("seg", seg, 1, device)
    if seg.dtype != torch.int64:
        raise ValueError(f"seg must be int64, got {seg.dtype}")
    if seg.shape[0] != R:
        raise ValueError(f"seg has {seg.shape[0]} entries but there are {R} rows")


def check_seg(seg: torch.Tensor, n_seg: int) -> None:
    """Raise ``ValueError`` unless seg is sorted non-decreasing with values in ``[0, n_seg)``."""
    if seg.numel() == 0:
        return
    ok = (seg[0] >= 0) & (seg[-1] < n_seg)
    if seg.numel() > 1:
        ok = ok & (seg[1:] >= seg[:-1]).all()
    if bool(ok):
        return
    if seg.numel() > 1 and bool((seg[1:] < seg[:-1]).any()):
        i = int(torch.nonzero(seg[1:] < seg[:-1])[0, 0])
        raise ValueError(
            f"seg must be sorted non-decreasing; seg[{i}]={int(seg[i])} > seg[{i + 1}]={int(seg[i + 1])}"
        )
    raise ValueError(
        f"seg values must lie in [0, n_seg={n_seg}); got min {int(seg.min())}, max {int(seg.max())}"
    )


def check_tensor_sketch_args(x, dy, A, B, seg, n_seg, x2=None, dy2=None) -> None:
    """Shape/dtype/device checks for :func:`tensor_sketch` (no host sync)."""
    _tensor("x", x, 2)
    dev = x.device
    _float("x", x)
    _tensor("dy", dy, 2, dev)
    _tensor("A", A, 2, dev)
    _tensor("B", B, 2, dev)
    for name, t in (("dy", dy), ("A", A), ("B", B)):
        _float(name, t, x.dtype)
    R, d_in = x.shape
    if dy.shape[0] != R:
        raise ValueError(f"x has {R} rows but dy has {dy.shape[0]}")
    if A.shape[0] != d_in:
        raise ValueError(f"A must be [d_in={d_in}, k], got {tuple(A.shape)}")
    if B.shape[0] != dy.shape[1]:
        raise ValueError(f"B must be [d_out={dy.shape[1]}, k], got {tuple(B.shape)}")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"A and B must have the same k, got {A.shape[1]} and {B.shape[1]}")
    if A.shape[1] == 0:
        raise ValueError("k (columns of A and B) must be at least 1")
    if (x2 is None) != (dy2 is None):
        raise ValueError("x2 and dy2 must be given together (two-term variant) or both omitted")
    if x2 is not None:
        for name, t, ref in (("x2", x2, x), ("dy2", dy2, dy)):
            _tensor(name, t, 2, dev)
            _float(name, t, x.dtype)
            if t.shape != ref.shape:
                ref_name = "x" if name == "x2" else "dy"
                raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    _seg_shape(seg, R, dev)
    _n_seg(n_seg)


def check_segment_quadform_args(G, Linv, seg, weight, n_seg) -> None:
    """Shape/dtype/device checks for :func:`segment_quadform` (no host sync)."""
    _tensor("G", G, 2)
    dev = G.device
    _float("G", G)
    _tensor("Linv", Linv, 2, dev)
    _float("Linv", Linv, G.dtype)
    R, k = G.shape
    if k == 0:
        raise ValueError("G must have at least one column")
    if tuple(Linv.shape) != (k, k):
        raise ValueError(f"Linv must be [k, k] = [{k}, {k}], got {tuple(Linv.shape)}")
    _seg_shape(seg, R, dev)
    _tensor("weight", weight, 1, dev)
    _float("weight", weight)
    if weight.shape[0] != R:
        raise ValueError(f"weight has {weight.shape[0]} entries but G has {R} rows")
    _n_seg(n_seg)


def check_lcmd_update_args(psi, c, dmin2, owner, id) -> None:
    """Shape/dtype/device checks for :func:`lcmd_update` (no host sync)."""
    _tensor("psi", psi, 2)
    dev = psi.device
    _float("psi", psi)
    M, k = psi.shape
    _tensor("c", c, 1, dev)
    _float("c", c)
    if c.shape[0] != k:
        raise ValueError(f"c must have k={k} entries (columns of psi), got {c.shape[0]}")
    _tensor("dmin2", dmin2, 1, dev)
    _float("dmin2", dmin2)
    _tensor("owner", owner, 1, dev)
    if owner.dtype != torch.int64:
        raise ValueError(f"owner must be int64, got {owner.dtype}")
    if dmin2.shape[0] != M or owner.shape[0] != M:
        raise ValueError(f"dmin2 and owner must have M={M} entries, got {dmin2.shape[0]} and {owner.shape[0]}")
    if isinstance(id, torch.Tensor) or isinstance(id, bool) or not isinstance(id, int):
        raise ValueError(f"id must be a Python int, got {type(id).__name__}")
    if not (-(2**63) <= id < 2**63):
        raise ValueError(f"id {id} does not fit in int64")
    if not (dmin2.is_contiguous() and owner.is_contiguous()):
        raise ValueError("dmin2 and owner must be contiguous (they are updated in place)")


# --------------------------------------------------------------------------------------------------
# Public functions.
# --------------------------------------------------------------------------------------------------

def tensor_sketch(x, dy, A, B, seg, n_seg, x2=None, dy2=None):
    """Per-segment fused sketch Σ_{i in s} (x_i A) ⊙ (dy_i B) / √k  → ``[n_seg, k]`` (dtype of x).

    With ``x2, dy2`` the second term Σ (x2_i A) ⊙ (dy2_i B) / √k is added (double-backward graphs).
    ``seg`` [R] int64, sorted, values in [0, n_seg); empty segments give zero rows.
    """
    check_tensor_sketch_args(x, dy, A, B, seg, n_seg, x2, dy2)
    check_seg(seg, n_seg)
    if impl_for(x, dy, A, B, seg, x2, dy2) == "triton":
        from .ops.tensor_sketch import tensor_sketch_triton

        return tensor_sketch_triton(x, dy, A, B, seg, n_seg, x2, dy2)
    return reference.tensor_sketch_ref(x, dy, A, B, seg, n_seg, x2, dy2)


def segment_quadform(G, Linv, seg, weight, n_seg):
    """Row quadratic forms ‖Linv g_i‖² (``row_out`` [R]) and their weighted segment sums (``seg_out``).

    Returns ``(seg_out [n_seg], row_out [R])`` in the accumulation dtype (fp64 for fp64 G, else fp32).
    """
    check_segment_quadform_args(G, Linv, seg, weight, n_seg)
    check_seg(seg, n_seg)
    if impl_for(G, Linv, seg, weight) == "triton":
        from .ops.segment_quadform import segment_quadform_triton

        return segment_quadform_triton(G, Linv, seg, weight, n_seg)
    return reference.segment_quadform_ref(G, Linv, seg, weight, n_seg)


def lcmd_update(psi, c, dmin2, owner, id):
    """In place: d2_i = ‖psi_i − c‖²; where d2_i < dmin2_i set dmin2_i = d2_i and owner_i = id.

    Ties (d2 == dmin2) and NaN distances do not update. Returns ``(dmin2, owner)``, the same tensors.
    """
    check_lcmd_update_args(psi, c, dmin2, owner, id)
    if impl_for(psi, c, dmin2, owner) == "triton":
        from .ops.lcmd_update import lcmd_update_triton

        return lcmd_update_triton(psi, c, dmin2, owner, id)
    return reference.lcmd_update_ref(psi, c, dmin2, owner, id)
