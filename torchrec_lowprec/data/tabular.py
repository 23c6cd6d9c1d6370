"""Stream CTR rows from CSV/TSV files described by a :class:`TabularSchema`.

Files larger than memory are read in passes, never loaded: (1, chronological split only)
count the lines, (2) count categorical values over the training rows and build the
:class:`Vocabulary`, (3) emit the rows of one split as TorchRec ``Batch`` es. A row's split
depends only on its data-line number (0-based over all files in order, header lines not
counted): ``"random"`` hashes ``(seed, line)`` into train/val/test by ``fractions``, so it
streams; ``"chronological"`` takes the first, next and last ``fractions`` of the lines.
Files are parsed by pyarrow (:mod:`.arrow_csv`: quoted fields, segments of whole lines on
``workers`` threads, in order); values are checked, counted and looked up with pyarrow/numpy.
Malformed rows (wrong column count; a label that is not a number, not finite or outside
[0, 1]; a dense value that is not a number or not finite) are skipped, counted in
``malformed_rows`` and reported as ``MalformedRowWarning`` with ``file:line``; with
``strict=True`` the first one raises ``MalformedRowError``. A quoted field holding a line break,
and a line longer than ``max_line_bytes`` (4 MiB), are errors naming ``file:line``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from functools import partial

import numpy as np

from .._deprecation import warn_deprecated
from ..progress import progress
from .arrow_csv import (
    SEGMENT_BYTES,
    Segment,
    default_workers,
    open_binary,
    ordered_map,
    parse_segment,
    require_pyarrow,
    segments,
    split_fields,
    text,
    to_numbers,
)
from .common import SPLITS, RowBlock, VocabularyTables, split_index
from .lines import MAX_LINE_BYTES, count_lines, random_split_codes, read_line
from .rows import Parsed as _Parsed
from .rows import Rows as _Rows
from .rows import ValueCounts as _ValueCounts
from .rows import bucket_tokens as _bucket_tokens
from .rows import encode as _encode
from .schema import TabularSchema, log1p_clamped
from .vocab import Vocabulary

SPLIT_MODES = ("random", "chronological")
_SCHEMA_CHECK_LINES = 100  # a file whose first this-many rows all fail is the wrong file/schema


class MalformedRowWarning(UserWarning):
    """A row was skipped because it does not match the schema."""


class MalformedRowError(ValueError):
    """A row does not match the schema and the reader is ``strict``."""


class TabularDataset(VocabularyTables):
    """CTR batches from delimited text files, with train-only vocabularies and streaming splits.

    Example::

        schema = TabularSchema(label="click", categorical=("site_id", "C1"), multi_valued={"tags": "|"})
        data = TabularDataset(["train.csv"], schema, min_count=5, seed=0)
        data.save_vocabulary("vocab.json")       # serving/eval reuse it: vocabulary="vocab.json"
        for batch in data.batches("train", batch_size=4096):
            ...
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        schema: TabularSchema,
        *,
        min_count: int = 1,
        split: str = "random",
        fractions: Sequence[float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        strict: bool = False,
        vocabulary: Vocabulary | str | os.PathLike | None = None,
        max_warnings: int = 20,
        workers: int | None = None,
        segment_bytes: int = SEGMENT_BYTES,
        block_rows: int | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [os.fspath(p) for p in paths]
        if not self.paths:
            raise ValueError("TabularDataset needs at least one file")
        for p in self.paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"data file {p} does not exist (or is not a file): check the path")
        if split not in SPLIT_MODES:
            raise ValueError(f"split must be one of {SPLIT_MODES}, got {split!r}")
        fractions = tuple(float(f) for f in fractions)
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
            raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        self.schema, self.min_count, self.split_mode = schema, min_count, split
        self.fractions, self.seed, self.strict = fractions, seed, strict
        if min(segment_bytes, max_line_bytes, 1 if workers is None else workers) < 1:
            raise ValueError(
                f"segment_bytes, max_line_bytes, workers must be >= 1: {segment_bytes, max_line_bytes, workers}"
            )
        require_pyarrow()  # an ImportError saying how to install it, before any file is read
        if block_rows is not None:
            warn_deprecated("TabularDataset(block_rows=...) (no longer used)", "segment_bytes=")
        self.max_warnings, self.segment_bytes = max_warnings, segment_bytes
        self.max_line_bytes = max_line_bytes  # longest line read; longer ones are an error
        self.workers = workers or default_workers()
        self.malformed_rows: dict[str, int] = {}
        self._warned: set[tuple[str, int]] = set()
        self._header: list[str] | None = None
        self._line_count: int | None = None
        self._bounds: tuple[int, int] | None = None
        self._resolve()
        if isinstance(vocabulary, (str, os.PathLike)):
            vocabulary = Vocabulary.load(vocabulary)
        self._vocab = vocabulary
        if vocabulary is not None:
            self._check_vocabulary(vocabulary)

    # --------------------------------------------------------------------------- layout
    def _read_header(self, path: str) -> list[str]:
        with open_binary(path) as f:
            first = read_line(f, path, 1, self.max_line_bytes)
        if not first:
            raise ValueError(f"{path} is empty but the schema says line 1 is a header")
        return split_fields(first, self.schema.delimiter)

    def _first_row_columns(self) -> int | None:
        """Columns of the first non-empty line (a headerless file whose schema names no columns)."""
        for path in self.paths:
            with open_binary(path) as f:
                n = 1
                while line := read_line(f, path, n, self.max_line_bytes):
                    if line.strip(b"\r\n"):
                        return len(split_fields(line, self.schema.delimiter))
                    n += 1
        return None

    def _resolve(self) -> None:
        s = self.schema
        names = s.columns
        if s.header:
            self._header = self._read_header(self.paths[0])
            names = tuple(self._header)
        self._ncols = len(names) if names is not None else None

        def index(col, role: str) -> int:
            if isinstance(col, int):
                if col < 0 or (self._ncols is not None and col >= self._ncols):
                    raise ValueError(
                        f"{self.paths[0]}: {role} column index {col} is outside the {self._ncols} columns"
                    )
                return col
            if names is None or col not in names:
                where = "header" if s.header else "schema's `columns`"
                raise ValueError(
                    f"{self.paths[0]}: {role} column {col!r} is not in the {where} {list(names or [])}: "
                    "fix the schema's column names (or its delimiter / header setting)"
                )
            return names.index(col)

        def name(col) -> str:
            if isinstance(col, str):
                return col
            return names[col] if names is not None else f"c{col}"

        self._label_i = index(s.label, "label")
        self._dense_i = [index(c, "dense") for c in s.dense]
        self._cat_i = [index(c, "categorical") for c in s.categorical]
        self._mv = [(index(c, "multi_valued"), sep) for c, sep in s.multi_valued.items()]
        self._used = [self._label_i, *self._dense_i, *self._cat_i, *(i for i, _ in self._mv)]
        if self._ncols is None:  # every row must have the first row's column count
            self._ncols = max(self._first_row_columns() or 0, 1 + max(self._used))
        dense_names = [name(c) for c in s.dense]
        self._bucketed = s.int_features == "categorical"
        self.dense_names = [] if self._bucketed else dense_names
        self._cat_names = (dense_names if self._bucketed else []) + [name(c) for c in s.categorical]
        self._mv_names = [name(c) for c in s.multi_valued]
        self.feature_names = self._cat_names + self._mv_names
        if len(set(self.feature_names)) != len(self.feature_names):
            raise ValueError(f"feature names are not unique: {self.feature_names}")

    def _check_vocabulary(self, vocab: Vocabulary) -> None:
        if vocab.feature_names != self.feature_names:
            raise ValueError(
                f"the vocabulary's features {vocab.feature_names} are not this schema's {self.feature_names}: "
                "build the vocabulary with the same schema (and int_features mode)"
            )
        built_with = vocab.meta.get("split")
        if built_with is not None and built_with != self._split_meta():
            warnings.warn(
                f"vocabulary was built with split settings {built_with}, this reader uses "
                f"{self._split_meta()}: its 'train' rows differ, so val/test may leak into it",
                stacklevel=3,
            )

    def _split_meta(self) -> dict:
        return {"mode": self.split_mode, "fractions": list(self.fractions), "seed": self.seed}

    @property
    def num_dense(self) -> int:
        return len(self.dense_names)

    # ---------------------------------------------------------------------------- lines
    def line_count(self) -> int:
        """Data lines over all files (a fast binary pass, cached)."""
        if self._line_count is None:
            self._line_count = sum(count_lines(p, self.schema.header) for p in self.paths)
        return self._line_count

    def _codes(self, first: int, count: int) -> np.ndarray:
        """Split codes (0 train, 1 val, 2 test) of data lines ``first .. first + count - 1``."""
        if self.split_mode == "chronological":
            if self._bounds is None:
                n = self.line_count()
                self._bounds = (int(self.fractions[0] * n), int((self.fractions[0] + self.fractions[1]) * n))
            g = np.arange(first, first + count, dtype=np.int64)
            return ((g >= self._bounds[0]).astype(np.uint8) + (g >= self._bounds[1])).astype(np.uint8)
        return random_split_codes(self.seed, first, count, self.fractions)

    def _check_header(self, path: str, line: bytes) -> None:
        if split_fields(line, self.schema.delimiter) != self._header:
            raise ValueError(f"{path}: header differs from {self.paths[0]}'s; all files need one schema")

    # ---------------------------------------------------------------------------- rows
    def _parse(self, seg: Segment, wanted: np.ndarray) -> _Parsed:
        """Parse and check one segment (runs on a parser thread): every line's split, the bad
        lines with their reasons, and the good rows' label, dense numbers and categorical columns."""
        s = self.schema
        p = parse_segment(seg, self._ncols, s.delimiter, self._used)
        codes = self._codes(seg.first_data, seg.num_lines)
        t, offsets = p.table, p.offsets
        keep = np.isin(codes[offsets], wanted)
        if not keep.all():  # rows of other splits: not converted, not checked
            pa, _, _ = require_pyarrow()
            t, offsets = t.filter(pa.array(keep)), offsets[keep]
        n = t.num_rows
        reason: dict[int, str] = {}
        col = lambda i: t.column(f"c{i}")  # noqa: E731
        y, ybad, yempty = to_numbers(col(self._label_i), "float")
        for r in np.flatnonzero(ybad | yempty):
            reason[r] = f"label {text(col(self._label_i), r)!r} is not a number"
        with np.errstate(invalid="ignore"):
            for r in np.flatnonzero(~(ybad | yempty) & ~((y >= 0) & (y <= 1))):
                what = "not finite" if not np.isfinite(y[r]) else "outside [0, 1]"
                reason[r] = f"label {text(col(self._label_i), r)!r} is {what}"
        kind = "an integer" if s.dense_parse == "int" else "a number"
        dense = np.empty((n, len(self._dense_i)), np.float64)
        for j, i in enumerate(self._dense_i):
            v, bad, empty = to_numbers(col(i), s.dense_parse)
            for r in np.flatnonzero(bad):
                reason.setdefault(r, f"column {i + 1} value {text(col(i), r)!r} is not {kind}")
            for r in np.flatnonzero(~np.isfinite(v) & ~bad & ~empty):
                reason.setdefault(r, f"column {i + 1} value {text(col(i), r)!r} is not finite")
            v[empty] = s.missing_dense
            dense[:, j] = v
        good = np.ones(n, bool)
        if reason:
            good[list(reason)] = False
        bad_rows = sorted(reason)
        bad_off = np.concatenate([p.bad_offsets, offsets[bad_rows]]).astype(np.int64)
        bad_why = p.bad_reasons + [reason[r] for r in bad_rows]
        order = np.argsort(bad_off, kind="stable")
        buckets = (
            [_bucket_tokens(np.nan_to_num(dense[:, j])) for j in range(dense.shape[1])]
            if self._bucketed
            else []
        )
        if self._bucketed:
            dense = dense[:, :0]
        vocab, cats, cat_ids = self._vocab, [], None
        if vocab is None:  # the vocabulary pass counts distinct values
            cats = buckets + [_encode(col(i)) for i in self._cat_i]
        else:  # the batch passes look ids up here, on the parser thread, by hashing every value
            names = iter(self._cat_names)
            cat_ids = [vocab.dictionary_ids(next(names), d)[idx] for idx, d in buckets]
            cat_ids += [vocab.dictionary_ids(next(names), col(i)) for i in self._cat_i]
        return _Parsed(
            seg,
            codes,
            offsets,
            good,
            bad_off[order],
            [bad_why[k] for k in order],
            y.astype(np.float32),
            dense,
            cats,
            [(col(i), sep) for i, sep in self._mv],
            cat_ids,
        )

    def _segments(self, wanted: np.ndarray) -> Iterator[_Parsed]:
        self._codes(0, 0)  # the chronological bounds, before parser threads need them
        s = self.schema
        segs = segments(self.paths, s.header, self.segment_bytes, self._check_header, self.max_line_bytes)
        return ordered_map(partial(self._parse, wanted=wanted), segs, self.workers)

    def _rows(self, wanted: frozenset[int]) -> Iterator[_Rows]:
        """The valid rows of the wanted splits, a segment at a time; counts and reports the bad ones."""
        bad = np.zeros(3, np.int64)
        seen: dict[str, list[int]] = {}  # path -> [good rows, bad rows before the first good one]
        want = np.array(sorted(wanted), np.uint8)
        for ps in self._segments(want):
            seg = ps.segment
            bad_codes = ps.codes[ps.bad_offsets]
            in_wanted = np.isin(bad_codes, want)
            bad += np.bincount(bad_codes[in_wanted], minlength=3)
            if self.strict or len(self._warned) < self.max_warnings:
                for off, why in zip(ps.bad_offsets[in_wanted], np.asarray(ps.bad_reasons, object)[in_wanted]):
                    self._malformed(seg.path, seg.first_line + int(off), why)
            ok_bad = seen.setdefault(seg.path, [0, 0])
            good_off = ps.offsets[ps.good]
            if ok_bad[0] == 0:
                first_good = good_off[0] if len(good_off) else seg.num_lines
                before = ps.bad_offsets[ps.bad_offsets < first_good]
                if ok_bad[1] + len(before) >= _SCHEMA_CHECK_LINES:
                    k = _SCHEMA_CHECK_LINES - ok_bad[1] - 1
                    raise ValueError(
                        f"{seg.path}: the first {_SCHEMA_CHECK_LINES} rows read all fail the schema "
                        f"{self.schema.name!r} (line {seg.first_line + int(before[k])}: "
                        f"{ps.bad_reasons[k]}): is this the right file, delimiter and schema?"
                    )
                ok_bad[1] += len(before)
            ok_bad[0] += len(good_off)
            rows = np.flatnonzero(ps.good)
            if len(rows):
                yield _Rows(ps, rows)
        for code in wanted:  # only a finished pass knows the count
            self.malformed_rows[SPLITS[code]] = int(bad[code])

    def pass_state(self) -> dict:
        """What a pass over the rows records (malformed-row counts, the lines already reported),
        for :meth:`merge_pass_state` in another process (a forked data loader)."""
        return {"malformed_rows": dict(self.malformed_rows), "warned": set(self._warned)}

    def merge_pass_state(self, state: dict) -> None:
        """Take the counts and reported lines of a pass made in another process."""
        self.malformed_rows.update(state["malformed_rows"])
        self._warned |= state["warned"]

    def _malformed(self, path: str, lineno: int, reason: str) -> None:
        msg = f"{path}:{lineno}: malformed row ({reason})"
        if self.strict:
            raise MalformedRowError(msg + "; strict=True stops here (strict=False skips such rows)")
        msg += ", skipped"
        if (path, lineno) in self._warned or len(self._warned) >= self.max_warnings:
            return
        # Each pass re-reads the same bad lines: report each once, and at most max_warnings.
        self._warned.add((path, lineno))
        if len(self._warned) == self.max_warnings:
            msg += f"; further malformed rows are counted in malformed_rows but not reported (max_warnings={self.max_warnings})"
        warnings.warn(msg, MalformedRowWarning, stacklevel=4)

    # ---------------------------------------------------------------------- vocabulary
    def build_vocabulary(self) -> Vocabulary:
        """Count values over the training rows (one pass, counted by pyarrow) and keep those seen
        ``min_count`` times."""
        counts = {name: _ValueCounts() for name in self.feature_names}
        for rows in progress(self._rows(frozenset([0])), "vocabulary pass", unit="segment"):
            for name, (idx, dictionary) in zip(self._cat_names, rows.cats()):
                counts[name].add_encoded(idx, dictionary)
            for j, name in enumerate(self._mv_names):
                counts[name].add(rows.bags(j)[1])
        meta = {
            "schema": self.schema.to_dict(),
            "split": self._split_meta(),
            "files": [os.path.basename(p) for p in self.paths],
        }
        return Vocabulary.from_value_counts({k: c.result() for k, c in counts.items()}, self.min_count, meta)

    @property
    def vocabulary(self) -> Vocabulary:
        """The vocabulary (built from the training split on first use, or the one given)."""
        if self._vocab is None:
            self._vocab = self.build_vocabulary()
        return self._vocab

    def save_vocabulary(self, path: str | os.PathLike) -> None:
        self.vocabulary.save(path)

    # -------------------------------------------------------------------------- batches
    def _to_block(self, rows: _Rows) -> RowBlock:
        vocab = self.vocabulary
        n = len(rows)
        dense = (
            log1p_clamped(rows.dense()).astype(np.float32)
            if self.dense_names
            else np.zeros((n, 0), np.float32)
        )
        lengths, values = [], []
        if self._cat_names:
            ones = np.ones(n, np.int32)
            ids = rows.cat_ids()
            cats = rows.cats() if ids is None else None
            for k, name in enumerate(self._cat_names):
                lengths.append(ones)
                values.append(ids[k] if cats is None else vocab.dictionary_ids(name, cats[k][1])[cats[k][0]])
        for j, name in enumerate(self._mv_names):
            lens, flat = rows.bags(j)
            lengths.append(lens)
            values.append(vocab.lookup_arrow(name, flat))
        return RowBlock(dense, lengths, values, rows.labels())

    def blocks(self, split: str, num_rows: int | None = None) -> Iterator[RowBlock]:
        """Row blocks of ``split`` in file order (of any sizes; the first ``num_rows`` valid rows if given)."""
        code = split_index(split)
        self.vocabulary.prepare()  # build it (a pass over train) before streaming this split
        left = num_rows
        for rows in self._rows(frozenset([code])):
            block = self._to_block(rows)
            if left is not None:
                if left <= 0:
                    return
                block = block.slice(0, min(left, len(block))) if left < len(block) else block
                left -= len(block)
            yield block

    def blocks_with_splits(self) -> Iterator[tuple[RowBlock, np.ndarray]]:
        """Every split's rows in one pass, in file order: row blocks and each row's split code
        (0 train, 1 val, 2 test), for :mod:`.cache`."""
        self.vocabulary.prepare()
        for rows in self._rows(frozenset([0, 1, 2])):
            yield self._to_block(rows), rows.codes()

    def scan(self) -> dict[str, dict[str, int]]:
        """One pass over every row: valid and malformed rows per split."""
        rows = np.zeros(3, np.int64)
        for r in self._rows(frozenset([0, 1, 2])):
            rows += np.bincount(r.codes(), minlength=3)
        rows = rows.tolist()
        return {
            "rows": dict(zip(SPLITS, rows)),
            "malformed": {s: self.malformed_rows.get(s, 0) for s in SPLITS},
        }
