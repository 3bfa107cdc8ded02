"""Public entry points: validate arguments once (``ntk_kernels.checks``), then run the Triton kernel or
the PyTorch reference.

Triton runs when every tensor is on CUDA and ``triton`` imports; otherwise the reference runs. The
environment variable ``NTK_KERNELS_IMPL=reference|triton`` forces a side (``auto`` or unset: choose).
Forcing ``triton`` on CPU tensors only works under ``TRITON_INTERPRET=1`` (that is how CPU tests run
the kernels). Importing this module never imports ``triton``.
"""
from __future__ import annotations

import functools
import os

import torch

from . import checks, reference

ENV_VAR = "NTK_KERNELS_IMPL"
IMPLS = ("reference", "triton")

__all__ = ["impl_for", "tensor_sketch", "segment_quadform", "lcmd_update", "ENV_VAR", "IMPLS"]


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
# Public functions.
# --------------------------------------------------------------------------------------------------

def _resolve_segments(seg, ptr, n_seg, R, device):
    """(seg on ``device``, ptr or None) after the value checks: check_seg reads seg (a host sync on a
    GPU); a given ptr is checked where it lives and seg is rebuilt from it without a sync."""
    if ptr is None:
        checks.check_seg(seg, n_seg)
        return seg, None
    checks.check_ptr(ptr, n_seg, R)
    ptr = ptr.to(device=device, non_blocking=True)
    seg = torch.repeat_interleave(torch.arange(n_seg, device=device), ptr[1:] - ptr[:-1], output_size=R)
    return seg, ptr


def tensor_sketch(x, dy, A, B, seg, n_seg, x2=None, dy2=None, *, ptr=None):
    """Per-segment fused sketch Σ_{i in s} (x_i A) ⊙ (dy_i B) / √k  → ``[n_seg, k]`` (dtype of x).

    With ``x2, dy2`` the second term Σ (x2_i A) ⊙ (dy2_i B) / √k is added (double-backward graphs).
    Segments: ``seg`` [R] int64, sorted, values in [0, n_seg), or instead (``seg=None``) ``ptr``
    [n_seg + 1] int64 CSR offsets (rows of segment s are ptr[s]:ptr[s+1]); a CPU ``ptr`` is checked
    without a device sync. Empty segments give zero rows.
    """
    checks.check_tensor_sketch_args(x, dy, A, B, seg, n_seg, x2, dy2, ptr)
    seg, ptr = _resolve_segments(seg, ptr, n_seg, x.shape[0], x.device)
    if impl_for(x, dy, A, B, seg, x2, dy2) == "triton":
        from .ops.tensor_sketch import tensor_sketch_triton

        return tensor_sketch_triton(x, dy, A, B, seg, n_seg, x2, dy2, ptr)
    return reference.tensor_sketch_ref(x, dy, A, B, seg, n_seg, x2, dy2)


def segment_quadform(G, Linv, seg, weight, n_seg, *, ptr=None):
    """Row quadratic forms ‖Linv g_i‖² (``row_out`` [R]) and their weighted segment sums (``seg_out``).

    Returns ``(seg_out [n_seg], row_out [R])`` in the accumulation dtype (fp64 for fp64 G, else fp32).
    Segments as in :func:`tensor_sketch`: ``seg``, or ``seg=None`` and CSR offsets ``ptr``.
    """
    checks.check_segment_quadform_args(G, Linv, seg, weight, n_seg, ptr)
    seg, ptr = _resolve_segments(seg, ptr, n_seg, G.shape[0], G.device)
    if impl_for(G, Linv, seg, weight) == "triton":
        from .ops.segment_quadform import segment_quadform_triton

        return segment_quadform_triton(G, Linv, seg, weight, n_seg, ptr)
    return reference.segment_quadform_ref(G, Linv, seg, weight, n_seg)


def lcmd_update(psi, c, dmin2, owner, id):
    """In place: d2_i = ‖psi_i − c‖²; where d2_i < dmin2_i set dmin2_i = d2_i and owner_i = id.

    Ties (d2 == dmin2) and NaN distances do not update. Returns ``(dmin2, owner)``, the same tensors.
    """
    checks.check_lcmd_update_args(psi, c, dmin2, owner, id)
    if impl_for(psi, c, dmin2, owner) == "triton":
        from .ops.lcmd_update import lcmd_update_triton

        return lcmd_update_triton(psi, c, dmin2, owner, id)
    return reference.lcmd_update_ref(psi, c, dmin2, owner, id)
