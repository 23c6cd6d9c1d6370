"""CSV/TSV text parsed by pyarrow's C++ reader, in segments of whole lines, on worker threads.

A file (plain or ``.gz``) is read as segments of whole lines (about ``segment_bytes`` each);
each segment is parsed by ``pyarrow.csv`` (quoted fields, ``""`` escapes, the delimiter inside
quotes) into binary columns, rows with the wrong column count going to an invalid-row handler
that records their line. Segments are parsed on a thread pool (pyarrow releases the GIL) and
come back in file order, so every row keeps its ``file:line``. Numbers are converted with
``pyarrow.compute`` casts; a segment whose column holds a non-number falls back to a regex
check to find which rows are bad. Lines end at ``\\n`` (``\\r\\n`` too); a quoted field holding
a line break is not supported: it is a ``ValueError`` naming the file and the line where the field
opens. A line longer than ``max_line_bytes`` (:data:`MAX_LINE_BYTES`, 4 MiB) is a ``ValueError``
naming the file, the line, its length and the option (memory stays bounded by
``segment_bytes + max_line_bytes``).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from .lines import MAX_LINE_BYTES, check_line_lengths, opens_quote, quoted_break, read_line

SEGMENT_BYTES = 1 << 20
_INT_RE = r"^[+-]?[0-9]{1,18}$"
_FLOAT_RE = r"(?i)^[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?|inf|infinity|nan)$"

T = TypeVar("T")
R = TypeVar("R")


def require_pyarrow() -> tuple[Any, Any, Any]:
    """``(pyarrow, pyarrow.csv, pyarrow.compute)``, or an ``ImportError`` saying how to install it."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.csv as pcsv
    except ImportError:
        raise ImportError(
            "torchrec_lowprec's CSV/TSV readers parse with pyarrow, which is not installed: "
            "pip install 'torchrec-lowprec[data]' (or pip install pyarrow; a checkout has it from make setup)"
        ) from None
    return pa, pcsv, pc


def open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def split_fields(line: bytes, delimiter: str) -> list[str]:
    """The fields of one line, parsed as the data rows are (quotes understood)."""
    pa, pcsv, _ = require_pyarrow()
    text = line.rstrip(b"\r\n")
    if not text:
        return [""]
    t = pcsv.read_csv(
        pa.BufferReader(text + b"\n"),
        read_options=pcsv.ReadOptions(
            autogenerate_column_names=True, use_threads=False, block_size=max(1 << 20, len(text) + 2)
        ),
        parse_options=pcsv.ParseOptions(delimiter=delimiter),
        convert_options=pcsv.ConvertOptions(
            column_types={}, auto_dict_encode=False, strings_can_be_null=False
        ),
    )
    return [str(c[0].as_py()) if c[0].is_valid else "" for c in t.columns]


@dataclass
class Segment:
    """Whole lines of one file: ``data`` starts at 1-based file line ``first_line`` and data line
    ``first_data`` (0-based over all files, headers not counted) and holds ``num_lines`` lines."""

    path: str
    data: bytes
    first_line: int
    first_data: int
    num_lines: int


def segments(
    paths: Iterable[str],
    header: bool,
    segment_bytes: int = SEGMENT_BYTES,
    on_header: Callable | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Iterator[Segment]:
    """The files' lines as :class:`Segment` s, in order; ``on_header(path, line)`` sees each header.
    A line over ``max_line_bytes`` is a :func:`line_too_long` error."""
    g = 0
    for path in paths:
        with open_binary(path) as f:
            line = 1
            if header:
                head = read_line(f, path, 1, max_line_bytes)
                if on_header is not None:
                    on_header(path, head)
                line = 2
            while buf := f.read(segment_bytes):
                if not buf.endswith(b"\n"):  # finish the last line, reading at most the limit
                    have = len(buf) - 1 - buf.rfind(b"\n")
                    buf += f.readline(max(max_line_bytes - have, 0) + 2)
                check_line_lengths(buf, path, line, max_line_bytes, f)
                n = buf.count(b"\n") + (not buf.endswith(b"\n"))
                yield Segment(path, buf, line, g, n)
                line += n
                g += n


@dataclass
class ParsedSegment:
    """A parsed :class:`Segment`: ``table`` (binary columns ``c<i>``, nulls for empty fields) holds
    the rows with the right column count, ``offsets`` their line within the segment (0-based);
    ``bad_offsets`` / ``bad_reasons`` are the other lines."""

    segment: Segment
    table: Any
    offsets: np.ndarray
    bad_offsets: np.ndarray
    bad_reasons: list[str]


def parse_segment(seg: Segment, num_columns: int, delimiter: str, columns: list[int]) -> ParsedSegment:
    """Parse ``seg`` into binary columns ``columns`` (0-based indices) of ``num_columns``."""
    pa, pcsv, _ = require_pyarrow()
    bad: list[tuple[int, str]] = []

    def invalid(row) -> str:
        # use_threads=False: pyarrow then knows each row's physical line (1-based in the segment).
        bad.append((row.number - 1, f"{row.actual_columns} columns, expected {row.expected_columns}"))
        return "skip"

    names = [f"c{i}" for i in range(num_columns)]
    wanted = [names[i] for i in sorted(set(columns))]
    last = seg.data.rfind(b"\n", 0, len(seg.data) - 1) + 1
    if opens_quote(seg.data[last:], delimiter):  # the field would go on in the next segment
        raise quoted_break(seg.path, seg.first_line + seg.num_lines - 1)
    # One block for the whole segment: a long line never straddles pyarrow's block boundaries.
    block = max(1 << 22, len(seg.data) + 1)
    table = pcsv.read_csv(
        pa.BufferReader(seg.data),
        read_options=pcsv.ReadOptions(column_names=names, use_threads=False, block_size=block),
        parse_options=pcsv.ParseOptions(
            delimiter=delimiter, invalid_row_handler=invalid, ignore_empty_lines=False
        ),
        convert_options=pcsv.ConvertOptions(
            column_types={n: pa.binary() for n in wanted},
            include_columns=wanted,
            strings_can_be_null=True,
            null_values=[""],  # only an empty field; pyarrow's default list also has "nan", "NULL", "NA"
        ),
    )
    bad.sort()
    bad_offsets = np.array([b for b, _ in bad], np.int64)
    keep = np.ones(seg.num_lines, bool)
    keep[bad_offsets] = False
    offsets = np.flatnonzero(keep)
    if len(offsets) != table.num_rows:  # a row spans lines: find where its quoted field opens
        lines = seg.data.split(b"\n")
        opener = next((i for i, ln in enumerate(lines) if opens_quote(ln, delimiter)), None)
        if opener is None:
            raise ValueError(
                f"{seg.path}:{seg.first_line}-{seg.first_line + seg.num_lines - 1}: {table.num_rows} rows "
                f"parsed from {len(offsets)} good lines (a quoted field with a line break? not supported)"
            )
        raise quoted_break(seg.path, seg.first_line + opener)
    return ParsedSegment(seg, table, offsets, bad_offsets, [r for _, r in bad])


def to_numbers(col, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values float64, bad, empty)`` of a binary column: ``kind`` ``"int"`` or ``"float"``.

    ``bad`` marks fields that are not an integer (a number); empty fields are ``empty`` and NaN.
    """
    pa, _, pc = require_pyarrow()
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    s = col.view(pa.string())
    target = pa.int64() if kind == "int" else pa.float64()
    empty = s.is_null().to_numpy(zero_copy_only=False)
    try:
        values = pc.cast(s, target)
        bad = np.zeros(len(s), bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        ok = pc.fill_null(pc.match_substring_regex(s, _INT_RE if kind == "int" else _FLOAT_RE), True)
        masked = pc.if_else(ok, s, pa.scalar(None, pa.string()))
        try:
            values = pc.cast(masked, target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # the regex let something through
            py = [_py_number(v, kind) for v in masked.to_pylist()]
            ok = pa.array([v is not None or m is None for v, m in zip(py, masked.to_pylist())])
            values = pa.array(py, target)
        bad = ~ok.to_numpy(zero_copy_only=False)
    out = values.to_numpy(zero_copy_only=False).astype(np.float64)
    if values.null_count:
        out[empty | bad] = np.nan
    return out, bad, empty


def _py_number(v: str | None, kind: str) -> int | float | None:
    if v is None:
        return None
    try:
        return int(v) if kind == "int" else float(v)
    except (ValueError, OverflowError):
        return None


def text(col, i: int) -> str:
    """Field ``i`` of a binary column as text (for messages)."""
    v = col[i].as_py()
    return "" if v is None else v.decode("utf-8", "replace")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, results in order, at most ``2 * workers`` ahead."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="csv-parse") as pool:
        pending = []
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > 2 * workers:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for f in pending:
                f.cancel()


def default_workers() -> int:
    """Parser threads: the usable cores, at most 4."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(4, n))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_FNV_BASIS = np.uint64(0xCBF29CE484222325)


def hash_binary(col) -> np.ndarray:
    """A non-zero 64-bit hash of every value of a binary/string array (nulls hash as the empty
    value), with numpy over the array's buffers: 8 bytes at a time (a multiply-xorshift per word,
    the length mixed in, splitmix64's finalizer)."""
    pa, _, pc = require_pyarrow()
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.type != pa.binary():
        col = col.cast(pa.binary())
    if col.null_count:
        col = pc.fill_null(col, b"")
    n = len(col)
    if n == 0:
        return np.zeros(0, np.uint64)
    _, obuf, dbuf = col.buffers()
    offsets = np.frombuffer(obuf, np.int32)[col.offset : col.offset + n + 1].astype(np.int64)
    data = np.frombuffer(dbuf, np.uint8) if dbuf is not None else np.zeros(0, np.uint8)
    data = np.concatenate([data[: offsets[-1]], np.zeros(8, np.uint8)])  # reads past a value stay inside
    starts, lens = offsets[:-1], np.diff(offsets)
    lane = np.arange(8)
    with np.errstate(over="ignore"):
        h = lens.astype(np.uint64) * _GOLDEN + _FNV_BASIS
        rows = None
        for k in range(0, int(lens.max()), 8):
            if k:
                rows = np.flatnonzero(lens > k) if rows is None else rows[lens[rows] > k]
            s0, ln = (starts, lens) if rows is None else (starts[rows], lens[rows])
            b = data[s0[:, None] + (k + lane)]
            b[(k + lane)[None, :] >= ln[:, None]] = 0
            w = b.view(np.uint64).ravel()
            x = (h if rows is None else h[rows]) ^ w
            x *= _GOLDEN
            x ^= x >> np.uint64(32)
            if rows is None:
                h = x
            else:
                h[rows] = x
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    h[h == 0] = 1  # 0 marks an empty HashTable slot
    return h


class HashTable:
    """An open-addressing (linear probing) table of distinct non-zero uint64 keys -> int64 values,
    built and probed with numpy (one random access per key in the common case).

    Example::

        t = HashTable(np.array([5, 9], np.uint64), np.array([1, 2]))
        t.get(np.array([9, 7], np.uint64), default=0)  # array([2, 0])
    """

    def __init__(self, keys: np.ndarray, values: np.ndarray) -> None:
        keys = np.asarray(keys, np.uint64)
        size = 1 << max(4, int(2 * len(keys)).bit_length())  # load factor <= 1/2
        self.mask = np.uint64(size - 1)
        self.keys = np.zeros(size, np.uint64)  # 0 = empty
        self.values = np.zeros(size, np.int64)
        self._slots: np.ndarray | None = None
        pending = np.arange(len(keys))
        pos = keys & self.mask
        while len(pending):
            p = pos[pending]
            free = self.keys[p] == 0
            # Among the keys aiming at one free slot, the first takes it; the rest probe on.
            _, first = np.unique(p[free], return_index=True)
            placed = pending[free][first]
            self.keys[pos[placed]] = keys[placed]
            self.values[pos[placed]] = values[placed]
            done = np.zeros(len(keys), bool)
            done[placed] = True
            pending = pending[~done[pending]]
            moved = pending[self.keys[pos[pending]] != 0]
            pos[moved] = (pos[moved] + np.uint64(1)) & self.mask

    def get(self, keys: np.ndarray, default: int) -> np.ndarray:
        """The value of each key (``default`` for keys not in the table)."""
        keys = np.asarray(keys, np.uint64)
        if self._slots is None:  # key and value side by side: one gather reads both
            self._slots = np.stack([self.keys, self.values.view(np.uint64)], axis=1)
        pos = keys & self.mask
        slot = self._slots[pos]
        hit = slot[:, 0] == keys
        out = np.where(hit, slot[:, 1].view(np.int64), default)
        pending = np.flatnonzero(~hit & (slot[:, 0] != 0))  # probe on: the slot holds another key
        pos = pos[pending]
        while len(pending):
            pos = (pos + np.uint64(1)) & self.mask
            slot = self._slots[pos]
            hit = slot[:, 0] == keys[pending]
            out[pending[hit]] = slot[hit, 1].view(np.int64)
            go_on = ~hit & (slot[:, 0] != 0)
            pending, pos = pending[go_on], pos[go_on]
        return out
