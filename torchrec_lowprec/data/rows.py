"""Parsed CSV/TSV segments as columns: what :class:`~.tabular.TabularDataset` passes between its
parser threads, its split filter, its vocabulary counting and its batch building."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .arrow_csv import Segment, require_pyarrow


@dataclass
class Parsed:
    """One parsed segment. Per line of the segment: ``codes`` (split). Per table row (a line with
    the right column count): ``offsets`` (its line in the segment), ``good`` (passed every check),
    ``labels``, ``dense`` (raw numbers, missing filled), ``cats`` (dictionary-encoded: ``(indices,
    dictionary)``, a null entry for an empty field), ``mvs`` (arrow binary columns and separators);
    ``cat_ids``: per categorical column, the vocabulary id of each row (when the vocabulary was
    known at parse time; ``cats`` is then empty). ``bad_offsets`` / ``bad_reasons``: the malformed lines."""

    segment: Segment
    codes: np.ndarray
    offsets: np.ndarray
    good: np.ndarray
    bad_offsets: np.ndarray
    bad_reasons: list[str]
    labels: np.ndarray
    dense: np.ndarray
    cats: list[tuple[np.ndarray, Any]]
    mvs: list[tuple[Any, str]]
    cat_ids: list[np.ndarray] | None = None


class Rows:
    """Rows ``rows`` (table rows of ``parsed``) as columns.

    Example::

        r = Rows(parsed, np.flatnonzero(parsed.good))
        r.labels(), r.dense(), r.cats(), r.bags(0)
    """

    def __init__(self, parsed: Parsed, rows: np.ndarray) -> None:
        self.parsed, self.rows = parsed, rows
        self._all = len(rows) == len(parsed.offsets)
        self._take = None

    def __len__(self) -> int:
        return len(self.rows)

    def _select(self, col):
        if self._all:
            return col
        if self._take is None:
            pa, _, _ = require_pyarrow()
            self._take = pa.array(self.rows, pa.int64())
        return col.take(self._take)

    def codes(self) -> np.ndarray:
        return self.parsed.codes[self.parsed.offsets[self.rows]]

    def labels(self) -> np.ndarray:
        return self.parsed.labels[self.rows]

    def dense(self) -> np.ndarray:
        return self.parsed.dense[self.rows]

    def cats(self) -> list[tuple[np.ndarray, Any]]:
        """Single-valued categorical columns as ``(indices into dictionary, dictionary)`` (the
        vocabulary pass; empty when the parser looked the ids up)."""
        if self._all:
            return self.parsed.cats
        return [(idx[self.rows], d) for idx, d in self.parsed.cats]

    def cat_ids(self) -> list[np.ndarray] | None:
        """Vocabulary ids of the categorical columns (int64), if the parser looked them up."""
        if self.parsed.cat_ids is None:
            return None
        return self.parsed.cat_ids if self._all else [ids[self.rows] for ids in self.parsed.cat_ids]

    def bags(self, j: int) -> tuple[np.ndarray, Any]:
        """Multi-valued column ``j``: per-row lengths (int32) and the values, flat (an empty field
        is an empty bag)."""
        _, _, pc = require_pyarrow()
        col, sep = self.parsed.mvs[j]
        lists = pc.split_pattern(self._select(col), sep)
        lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
        return lengths.astype(np.int32), pc.list_flatten(lists)


class ValueCounts:
    """Occurrences of each distinct value over many arrow columns, counted by pyarrow.

    Example::

        vc = ValueCounts(); vc.add(pa.array([b"a", b"b", b"a"])); values, counts = vc.result()
    """

    _MERGE_EVERY = 16

    def __init__(self) -> None:
        self._parts: list[tuple[Any, Any]] = []

    def add(self, col) -> None:
        """Count the values of an arrow column (null = the empty value)."""
        self.add_encoded(*encode(col))

    def add_encoded(self, indices: np.ndarray, dictionary) -> None:
        """Count ``dictionary[indices]`` (numpy bincount over the indices)."""
        _, _, pc = require_pyarrow()
        counts = np.bincount(indices, minlength=len(dictionary))
        nz = np.flatnonzero(counts)
        values = pc.fill_null(dictionary, b"")
        self._parts.append((values.take(nz) if len(nz) < len(values) else values, counts[nz]))
        if len(self._parts) >= self._MERGE_EVERY:
            self._parts = [self._merged()]

    def _merged(self) -> tuple[Any, Any]:
        pa, _, _ = require_pyarrow()
        if len(self._parts) == 1:
            return self._parts[0]
        table = pa.table(
            {
                "v": pa.chunked_array([v for v, _ in self._parts], pa.binary()),
                "c": pa.chunked_array([pa.array(c, pa.int64()) for _, c in self._parts], pa.int64()),
            }
        )
        agg = table.group_by("v", use_threads=False).aggregate([("c", "sum")])
        return agg.column("v").combine_chunks(), agg.column("c_sum").combine_chunks()

    def result(self) -> tuple[Any, np.ndarray]:
        """``(distinct values (arrow binary), their counts (int64))``."""
        pa, _, _ = require_pyarrow()
        if not self._parts:
            return pa.array([], pa.binary()), np.zeros(0, np.int64)
        values, counts = self._merged()
        return values, np.asarray(counts, np.int64)


def encode(col) -> tuple[np.ndarray, Any]:
    """``(indices int32, dictionary)`` of an arrow binary column; a null is one dictionary entry."""
    pa, _, pc = require_pyarrow()
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    enc = pc.dictionary_encode(col.cast(pa.binary()), null_encoding="encode")
    return enc.indices.to_numpy(zero_copy_only=False), enc.dictionary


def bucket_tokens(x: np.ndarray) -> tuple[np.ndarray, Any]:
    """:func:`~.schema.log_squared_bucket` of every number as tokens (``b"11"``), encoded as
    ``(indices, dictionary)``."""
    pa, _, _ = require_pyarrow()
    x = np.asarray(x, np.float64)
    big = x > 2
    out = np.floor(x)
    out[big] = np.floor(np.log(x[big]) ** 2)
    uniq, inv = np.unique(out.astype(np.int64), return_inverse=True)
    return inv.astype(np.int32), pa.array(uniq).cast(pa.string()).cast(pa.binary())
