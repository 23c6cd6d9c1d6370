"""Stream CTR rows from CSV/TSV files described by a :class:`TabularSchema`.

Files larger than memory are read in passes, never loaded: (1, chronological split only)
count the lines, (2) count categorical values over the training rows and build the
:class:`Vocabulary`, (3) emit the rows of one split as TorchRec ``Batch`` es. A row's split
depends only on its data-line number (0-based over all files in order, header lines not
counted): ``"random"`` hashes ``(seed, line)`` into train/val/test by ``fractions``, so it
streams; ``"chronological"`` takes the first, next and last ``fractions`` of the lines.
Malformed rows (wrong column count, a non-numeric number or label) are skipped, counted in
``malformed_rows`` and reported as ``MalformedRowWarning`` with ``file:line``; with
``strict=True`` the first one raises ``MalformedRowError``.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from itertools import chain, islice
from operator import itemgetter

import numpy as np
import torch
from torchrec import EmbeddingBagConfig, PoolingType
from torchrec.datasets.utils import Batch

from ..progress import progress
from .common import SPLITS, RowBlock, embedding_bag_configs, rebatch, split_index
from .lines import count_lines, open_text, random_split_codes
from .schema import TabularSchema, log1p_clamped, log_squared_bucket
from .vocab import Vocabulary

SPLIT_MODES = ("random", "chronological")
_SCHEMA_CHECK_LINES = 100  # a file whose first this-many rows all fail is the wrong file/schema
_HASH_BLOCK = 1 << 16


class MalformedRowWarning(UserWarning):
    """A row was skipped because it does not match the schema."""


class MalformedRowError(ValueError):
    """A row does not match the schema and the reader is ``strict``."""


class _Bad(Exception):
    pass


def _getter(idx: list[int]):
    """``parts -> tuple of parts[i] for i in idx`` (itemgetter is C, but returns a scalar for one index)."""
    if not idx:
        return lambda parts: ()
    if len(idx) == 1:
        i = idx[0]
        return lambda parts: (parts[i],)
    return itemgetter(*idx)


def _converts(conv, v: str) -> bool:
    try:
        conv(v) if v else None
        return True
    except ValueError:
        return False


class TabularDataset:
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
        block_rows: int = 8192,
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
        self.max_warnings, self.block_rows = max_warnings, block_rows
        self.malformed_rows: dict[str, int] = {}
        self._warned: set[tuple[str, int]] = set()
        self._header: list[str] | None = None
        self._line_count: int | None = None
        self._bounds: tuple[int, int] | None = None
        self._hash_block = (-1, np.zeros(0, np.uint8))
        self._resolve()
        if isinstance(vocabulary, (str, os.PathLike)):
            vocabulary = Vocabulary.load(vocabulary)
        self._vocab = vocabulary
        if vocabulary is not None:
            self._check_vocabulary(vocabulary)

    # --------------------------------------------------------------------------- layout
    def _read_header(self, path: str) -> list[str]:
        with open_text(path) as f:
            first = f.readline()
        if not first:
            raise ValueError(f"{path} is empty but the schema says line 1 is a header")
        return first.rstrip("\r\n").split(self.schema.delimiter)

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
        self._min_cols = 1 + max([self._label_i, *self._dense_i, *self._cat_i, *(i for i, _ in self._mv)])
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
    def _lines(self) -> Iterator[tuple[str, int, int, str]]:
        """``(path, 1-based file line, 0-based data line over all files, text)``."""
        g = 0
        for path in self.paths:
            with open_text(path) as f:
                lineno = 0
                if self.schema.header:
                    head = f.readline()
                    lineno = 1
                    if head.rstrip("\r\n").split(self.schema.delimiter) != self._header:
                        raise ValueError(
                            f"{path}: header differs from {self.paths[0]}'s; all files need one schema"
                        )
                for text in f:
                    lineno += 1
                    yield path, lineno, g, text
                    g += 1

    def line_count(self) -> int:
        """Data lines over all files (a fast binary pass, cached)."""
        if self._line_count is None:
            self._line_count = sum(count_lines(p, self.schema.header) for p in self.paths)
        return self._line_count

    def _split_of(self, g: int) -> int:
        if self.split_mode == "chronological":
            if self._bounds is None:
                n = self.line_count()
                self._bounds = (int(self.fractions[0] * n), int((self.fractions[0] + self.fractions[1]) * n))
            return 0 if g < self._bounds[0] else 1 if g < self._bounds[1] else 2
        blk = g // _HASH_BLOCK
        if self._hash_block[0] != blk:
            codes = random_split_codes(self.seed, blk * _HASH_BLOCK, _HASH_BLOCK, self.fractions)
            self._hash_block = (blk, codes)
        return int(self._hash_block[1][g - blk * _HASH_BLOCK])

    # ---------------------------------------------------------------------------- rows
    def _parser(self):
        s = self.schema
        delim, ncols, min_cols = s.delimiter, self._ncols, self._min_cols
        label_i, dense_i, cat_i, mv = self._label_i, self._dense_i, self._cat_i, self._mv
        conv, missing, bucketed = (int if s.dense_parse == "int" else float), s.missing_dense, self._bucketed
        kind = "an integer" if s.dense_parse == "int" else "a number"
        get_dense, get_cat = _getter(dense_i), _getter(cat_i)

        def parse(text: str):
            parts = text.rstrip("\r\n").split(delim)
            if (ncols is not None and len(parts) != ncols) or len(parts) < min_cols:
                raise _Bad(
                    f"{len(parts)} columns, expected {ncols if ncols is not None else f'>= {min_cols}'}"
                )
            try:
                label = float(parts[label_i])
            except ValueError:
                raise _Bad(f"label {parts[label_i]!r} is not a number") from None
            try:
                dense = [conv(v) if v else missing for v in get_dense(parts)]
            except ValueError:
                i = next(i for i in dense_i if not _converts(conv, parts[i]))
                raise _Bad(f"column {i + 1} value {parts[i]!r} is not {kind}") from None
            cats = get_cat(parts)
            if bucketed:
                cats = (*(str(log_squared_bucket(x)) for x in dense), *cats)
                dense = []
            return label, dense, cats, [parts[i].split(sep) if parts[i] else [] for i, sep in mv]

        return parse

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

    def _rows(self, wanted: frozenset[int]) -> Iterator[tuple[int, tuple]]:
        """``(split code, parsed row)`` of the valid rows of the wanted splits; counts the bad ones."""
        parse = self._parser()
        bad = [0, 0, 0]
        seen: dict[str, list[int]] = {}
        for path, lineno, g, text in self._lines():
            code = self._split_of(g)
            if code not in wanted:
                continue
            ok_bad = seen.setdefault(path, [0, 0])
            try:
                row = parse(text)
            except _Bad as e:
                bad[code] += 1
                ok_bad[1] += 1
                if ok_bad[0] == 0 and ok_bad[1] >= _SCHEMA_CHECK_LINES:
                    raise ValueError(
                        f"{path}: the first {ok_bad[1]} rows read all fail the schema {self.schema.name!r} "
                        f"(line {lineno}: {e}): is this the right file, delimiter and schema?"
                    ) from None
                self._malformed(path, lineno, str(e))
                continue
            ok_bad[0] += 1
            yield code, row
        for code in wanted:  # only a finished pass knows the count
            self.malformed_rows[SPLITS[code]] = bad[code]

    def _blocks(self, wanted: frozenset[int]) -> Iterator[list[tuple]]:
        rows = (row for _, row in self._rows(wanted))
        while True:
            # Every parsed row allocates a few tuples/lists, and the collections this triggers
            # over a growing block cost as much as the parsing (2x slower). Rows hold no
            # cycles, so pause the collector while filling a block, never across a yield.
            enabled = gc.isenabled()
            gc.disable()
            try:
                block = list(islice(rows, self.block_rows))
            finally:
                if enabled:
                    gc.enable()
            if not block:
                return
            yield block

    # ---------------------------------------------------------------------- vocabulary
    def build_vocabulary(self) -> Vocabulary:
        """Count values over the training rows (one pass) and keep those seen ``min_count`` times."""
        counters = {name: Counter() for name in self.feature_names}
        nc = len(self._cat_names)
        for block in progress(self._blocks(frozenset([0])), "vocabulary pass", unit="block"):
            if nc:
                for name, col in zip(self._cat_names, zip(*(r[2] for r in block))):
                    counters[name].update(col)
            for j, name in enumerate(self._mv_names):
                counters[name].update(chain.from_iterable(r[3][j] for r in block))
        meta = {
            "schema": self.schema.to_dict(),
            "split": self._split_meta(),
            "files": [os.path.basename(p) for p in self.paths],
        }
        return Vocabulary.build(counters, self.min_count, meta)

    @property
    def vocabulary(self) -> Vocabulary:
        """The vocabulary (built from the training split on first use, or the one given)."""
        if self._vocab is None:
            self._vocab = self.build_vocabulary()
        return self._vocab

    def save_vocabulary(self, path: str | os.PathLike) -> None:
        self.vocabulary.save(path)

    @property
    def vocab_sizes(self) -> dict[str, int]:
        """Table rows per feature (kept values + 1 OOV row)."""
        return self.vocabulary.sizes

    def embedding_bag_configs(
        self, dim: int, pooling: PoolingType = PoolingType.SUM
    ) -> list[EmbeddingBagConfig]:
        return embedding_bag_configs(self.vocab_sizes, dim, pooling)

    def train_frequencies(self) -> dict[str, torch.Tensor]:
        """Training count of every id per feature, from the vocabulary (no pass over the data)."""
        return {k: torch.from_numpy(self.vocabulary.frequencies(k)) for k in self.feature_names}

    # -------------------------------------------------------------------------- batches
    def _to_block(self, rows: list[tuple]) -> RowBlock:
        n, vocab = len(rows), self.vocabulary
        labels = np.fromiter((r[0] for r in rows), np.float32, n)
        if self.dense_names:
            dense = log1p_clamped(np.array([r[1] for r in rows], np.float64)).astype(np.float32)
        else:
            dense = np.zeros((n, 0), np.float32)
        lengths, values = [], []
        if self._cat_names:
            ones = np.ones(n, np.int32)
            for name, col in zip(self._cat_names, zip(*(r[2] for r in rows))):
                lengths.append(ones)
                values.append(vocab.lookup(name, col))
        for j, name in enumerate(self._mv_names):
            bags = [r[3][j] for r in rows]
            lengths.append(np.fromiter(map(len, bags), np.int32, n))
            values.append(vocab.lookup(name, chain.from_iterable(bags)))
        return RowBlock(dense, lengths, values, labels)

    def batches(
        self, split: str, batch_size: int, num_rows: int | None = None, drop_last: bool = False
    ) -> Iterator[Batch]:
        """Batches of ``split`` in file order (the first ``num_rows`` valid rows if given)."""
        code = split_index(split)
        _ = self.vocabulary  # build it (a pass over train) before streaming this split

        def blocks() -> Iterator[RowBlock]:
            left = num_rows
            for rows in self._blocks(frozenset([code])):
                if left is not None:
                    if left <= 0:
                        return
                    rows = rows[:left]
                    left -= len(rows)
                yield self._to_block(rows)

        for block in rebatch(blocks(), batch_size, drop_last):
            yield block.to_batch(self.feature_names)

    def scan(self) -> dict[str, dict[str, int]]:
        """One pass over every row: valid and malformed rows per split."""
        rows = [0, 0, 0]
        for code, _ in self._rows(frozenset([0, 1, 2])):
            rows[code] += 1
        return {
            "rows": dict(zip(SPLITS, rows)),
            "malformed": {s: self.malformed_rows.get(s, 0) for s in SPLITS},
        }
