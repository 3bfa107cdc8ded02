"""Model-agnostic tensor ops for ntkal: Triton kernels with pure-PyTorch references.

``tensor_sketch``, ``segment_quadform`` and ``lcmd_update`` pick Triton for CUDA tensors and the
reference otherwise (``NTK_KERNELS_IMPL=reference|triton`` forces a side; see ``dispatch``).
Importing this package does not import triton.
"""
from .dispatch import impl_for, lcmd_update, segment_quadform, tensor_sketch
from .reference import lcmd_update_ref, segment_quadform_ref, tensor_sketch_ref

__all__ = [
    "impl_for",
    "tensor_sketch",
    "segment_quadform",
    "lcmd_update",
    "tensor_sketch_ref",
    "segment_quadform_ref",
    "lcmd_update_ref",
]
