"""Shared helpers for the Triton launchers: interpreter detection, dtype mapping, block-size choice.

Block sizes differ by mode: on a GPU they are sized for registers; under ``TRITON_INTERPRET=1`` the
cost is per program and per loop iteration, not per element, so the blocks are as large as possible.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

def is_interpreter() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def acc_tl_dtype(dtype: torch.dtype):
    """The Triton dtype of ``ntk_kernels.reference.acc_dtype``: fp64 for fp64 inputs, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def pow2_at_least(n: int, lo: int = 1, hi: int | None = None) -> int:
    """Next power of two >= ``n``, clamped to ``[lo, hi]``."""
    b = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return b if hi is None else min(b, hi)


def check_launchable(device: torch.device) -> None:
    """Raise ``ValueError`` when a kernel cannot run on ``device`` (CPU tensors need the interpreter)."""
    if device.type != "cuda" and not is_interpreter():
        raise ValueError(
            f"Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 to run them on CPU "
            "through the interpreter, or use the reference implementation"
        )


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along its last dim (kernels take the row stride as an argument)."""
    if t.dim() >= 1 and t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def csr_offsets(seg: torch.Tensor, n_seg: int) -> torch.Tensor:
    """CSR offsets of a sorted segment-id vector: rows of segment s are ``ptr[s]:ptr[s+1]``.

    Built with ``searchsorted`` (no host sync); int64 so offsets cannot overflow.
    """
    bounds = torch.arange(n_seg + 1, device=seg.device, dtype=seg.dtype)
    return torch.searchsorted(seg, bounds, right=False).to(torch.int64)


# --------------------------------------------------------------------------------------------------
# Block-size choice. Every helper returns a dict of constexpr meta-parameters plus ``num_warps``.
# --------------------------------------------------------------------------------------------------

def tensor_sketch_settings(d_in: int, d_out: int, k: int, rows_per_seg: float, dtype: torch.dtype) -> dict:
    """Blocks for ``tensor_sketch``: BLOCK_R rows x BLOCK_K sketch columns, BLOCK_S segments a program.

    BLOCK_S = 1 reduces a program's rows with ``tl.sum``; BLOCK_S >= 16 packs several short segments
    into one program and reduces them with a one-hot ``tl.dot`` (deterministic, no atomics).
    """
    d_max = max(d_in, d_out)
    if is_interpreter():
        block_r = 128
        block_k = pow2_at_least(k, 16, 512)
        block_d = pow2_at_least(d_max, 16, 512)
        num_warps = 4
    else:
        wide = dtype == torch.float64
        block_r = 32 if wide else 64
        block_k = pow2_at_least(k, 16, 32 if wide else 64)
        block_d = pow2_at_least(d_max, 16, 32)
        num_warps = 4
    block_s = 1
    if rows_per_seg * 16 <= block_r:  # short segments: pack 16..64 of them per program
        block_s = pow2_at_least(int(block_r // max(rows_per_seg, 1.0)), 16, 64)
    return dict(BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_D=block_d, BLOCK_S=block_s, num_warps=num_warps,
                PRECISION="ieee")  # plain fp32 products (docs/design.md, Kernels); bench kernels also times "tf32x3"


def segment_quadform_settings(k: int, dtype: torch.dtype) -> dict:
    """Blocks for ``segment_quadform``: BLOCK_R rows, BLOCK_J output columns, BLOCK_L reduction cols."""
    if is_interpreter():
        b = pow2_at_least(k, 16, 512)
        return dict(BLOCK_R=128, BLOCK_J=b, BLOCK_L=b, num_warps=4, PRECISION="ieee")
    wide = dtype == torch.float64
    return dict(
        BLOCK_R=32 if wide else 64,
        BLOCK_J=pow2_at_least(k, 16, 32 if wide else 64),
        BLOCK_L=pow2_at_least(k, 16, 32),
        num_warps=4,
        PRECISION="ieee",  # plain fp32 products (docs/design.md, Kernels); bench kernels also times "tf32x3"
    )


def segment_sum_settings(rows_per_seg: float) -> dict:
    """Blocks for the deterministic CSR segment sum of a per-row vector."""
    if is_interpreter():
        block_r, max_s = 1024, 128
    else:
        block_r, max_s = 128, 32  # the [BLOCK_S, BLOCK_R] select tile stays at <= 32 registers a thread
    block_s = pow2_at_least(int(block_r // max(rows_per_seg, 1.0)), 1, max_s)
    return dict(BLOCK_R=block_r, BLOCK_S=block_s, num_warps=4)


def lcmd_update_settings(k: int, dtype: torch.dtype) -> dict:
    """Blocks for ``lcmd_update``: BLOCK_M rows x BLOCK_K columns of psi per loop iteration."""
    if is_interpreter():
        return dict(BLOCK_M=256, BLOCK_K=pow2_at_least(k, 16, 1024), num_warps=4)
    wide = dtype == torch.float64
    return dict(BLOCK_M=32 if wide else 64, BLOCK_K=pow2_at_least(k, 16, 64 if wide else 128), num_warps=4)
