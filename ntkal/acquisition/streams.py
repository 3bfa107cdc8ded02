"""Inputs as streams (docs/design.md, "Pipeline"): a path, structures or precomputed RowBlock chunks, cut into
numbered chunks with every structure checked on the way."""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Set

from ..features.rowblock import RowBlock


@dataclass
class Stream:
    """Structures (a path, a list, an iterator) or precomputed RowBlock chunks, with their count if known."""

    items: Iterable
    total: Optional[int] = None
    path: Optional[Path] = None
    rows: bool = False  # items are RowBlock chunks

    @classmethod
    def of(cls, obj, what: str) -> "Stream":
        from ase import Atoms
        if isinstance(obj, Stream):
            return obj
        if isinstance(obj, RowBlock):
            return cls([obj], len(obj), None, True)
        if isinstance(obj, (str, os.PathLike)):
            from ..io import count_structures, read_structures
            path = Path(obj)
            return cls(read_structures(path), count_structures(path), path)
        if isinstance(obj, Atoms):
            return cls([obj], 1)
        if isinstance(obj, (list, tuple)):
            return cls(list(obj), None if obj and isinstance(obj[0], RowBlock) else len(obj),
                       rows=bool(obj) and isinstance(obj[0], RowBlock))
        if hasattr(obj, "__iter__"):
            it = iter(obj)
            first = next(it, None)
            if first is None:
                return cls([], 0)
            return cls(itertools.chain([first], it), None, rows=isinstance(first, RowBlock))
        raise TypeError(f"{what} must be a path, ase.Atoms, a list or iterator of them, or RowBlocks")


def chunks(src: Stream, size: int, known: Optional[Set[int]] = None, labels: bool = False) -> Iterator:
    """(chunk number, first structure index, chunk) over the stream: structures in chunks of `size`, each
    checked by ntkal.io.check_structure (elements: `known`) on every rank so that counts and errors agree;
    with `labels`, every label must be finite (ntkal.io.check_labels); RowBlock items are chunks as given."""
    if src.rows:
        start = 0
        for c, block in enumerate(src.items):
            yield c, start, block
            start += len(block)
        return
    from ..io import check_labels, check_structure, iter_chunks

    def checked():
        for i, atoms in enumerate(src.items):
            check_structure(atoms, i, src.path, known)
            if labels:
                check_labels(atoms, i, src.path)
            yield atoms
    start = 0
    for c, chunk in enumerate(iter_chunks(checked(), size)):
        yield c, start, chunk
        start += len(chunk)
