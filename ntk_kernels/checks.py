"""Argument checks of the public ops, run once per call by ``ntk_kernels.dispatch``.

The ``check_*_args`` functions look only at shapes, dtypes and devices (no host sync). ``check_seg``
and ``check_ptr`` read values: one host sync when the tensor is on a GPU, none for a CPU ``ptr``.
"""
from __future__ import annotations

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def _segments(seg, ptr, R, device):
    """Shape checks of the segment description: ``seg`` [R] or ``ptr`` [n_seg + 1], not both."""
    if (seg is None) == (ptr is None):
        raise ValueError("give seg (segment id per row) or ptr (CSR offsets), not both" if ptr is not None
                         else "seg is required (or ptr, the CSR offsets)")
    if seg is not None:
        _tensor("seg", seg, 1, device)
        if seg.dtype != torch.int64:
            raise ValueError(f"seg must be int64, got {seg.dtype}")
        if seg.shape[0] != R:
            raise ValueError(f"seg has {seg.shape[0]} entries but there are {R} rows")
    else:
        _tensor("ptr", ptr, 1)  # any device: a CPU ptr is checked without a device sync
        if ptr.dtype != torch.int64:
            raise ValueError(f"ptr must be int64, got {ptr.dtype}")


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


def check_ptr(ptr: torch.Tensor, n_seg: int, R: int) -> None:
    """Raise ``ValueError`` unless ptr is CSR offsets of R rows in n_seg segments: n_seg + 1 entries,
    non-decreasing from 0 to R."""
    if ptr.shape[0] != n_seg + 1:
        raise ValueError(f"ptr must have n_seg + 1 = {n_seg + 1} entries, got {ptr.shape[0]}")
    if int(ptr[0]) != 0 or int(ptr[-1]) != R or bool((ptr[1:] < ptr[:-1]).any()):
        raise ValueError(f"ptr must be non-decreasing from 0 to the number of rows ({R}); "
                         f"got {ptr[0].item()} .. {ptr[-1].item()}")


def check_tensor_sketch_args(x, dy, A, B, seg, n_seg, x2=None, dy2=None, ptr=None) -> None:
    """Shape/dtype/device checks for :func:`ntk_kernels.tensor_sketch` (no host sync)."""
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
    _segments(seg, ptr, R, dev)
    _n_seg(n_seg)


def check_segment_quadform_args(G, Linv, seg, weight, n_seg, ptr=None) -> None:
    """Shape/dtype/device checks for :func:`ntk_kernels.segment_quadform` (no host sync)."""
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
    _segments(seg, ptr, R, dev)
    _tensor("weight", weight, 1, dev)
    _float("weight", weight)
    if weight.shape[0] != R:
        raise ValueError(f"weight has {weight.shape[0]} entries but G has {R} rows")
    _n_seg(n_seg)


def check_lcmd_update_args(psi, c, dmin2, owner, id) -> None:
    """Shape/dtype/device checks for :func:`ntk_kernels.lcmd_update` (no host sync)."""
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
