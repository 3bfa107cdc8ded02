"""Triton launchers, one module per op (importing this package imports triton).

Importing ``ntk_kernels.ops.<op>`` directly bypasses the dispatcher and its argument checks: the tests
use this to run the kernels under ``TRITON_INTERPRET=1`` on CPU tensors.
"""
from .lcmd_update import lcmd_update_triton
from .segment_quadform import segment_quadform_triton
from .tensor_sketch import tensor_sketch_triton

__all__ = ["tensor_sketch_triton", "segment_quadform_triton", "lcmd_update_triton"]
