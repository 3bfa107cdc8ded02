"""Streaming structure I/O: extxyz (plain or compressed) and ASE databases in, extxyz and JSON out.

``read`` streams structures and counts them, ``checks`` refuses structures a model cannot use,
``write`` writes extxyz through atomic replacement, ``jsonio`` writes JSON.

Labels follow MACE's conventions (``mace/tools/default_keys.py``): ``info["REF_energy"]``,
``arrays["REF_forces"]``, ``info["REF_stress"]``. Since ASE 3.23 the extxyz reader turns plain
``energy``/``forces``/``stress`` keys into a ``SinglePointCalculator`` instead of ``info``/``arrays``
entries, so plain keys are unsafe; every calculator result ``p`` is moved to ``REF_p`` on reading
(MACE's ``load_from_xyz`` does the same with a warning) and nothing named like a calculator property
is ever written.
"""
from .checks import check_labels, check_structure
from .jsonio import write_json
from .read import (CALCULATOR_KEYS, COMPRESSION_SUFFIXES, DB_SUFFIXES, EXTXYZ_SUFFIXES, count_structures,
                   iter_chunks, normalize_labels, read_structures, survey)
from .write import atomic_output, check_extxyz_name, check_output_path, writable_folder, write_extxyz

__all__ = ["EXTXYZ_SUFFIXES", "COMPRESSION_SUFFIXES", "DB_SUFFIXES", "CALCULATOR_KEYS", "read_structures",
           "count_structures", "normalize_labels", "check_structure", "check_labels", "survey", "iter_chunks", "check_output_path",
           "check_extxyz_name", "writable_folder", "atomic_output", "write_extxyz", "write_json"]
