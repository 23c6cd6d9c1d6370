"""Data for the DLRM example: synthetic CTR (default), Criteo TSV, or any CSV/TSV with a schema.

Every source becomes one stream of row blocks per split, cut into *global* batches of
``--batch-size`` rows; with ``W`` ranks, rank ``r`` keeps rows ``[r*B/W, (r+1)*B/W)`` of each
global batch, so the ranks read disjoint rows and together see the same global batches, in
the same order, as one process does. A position in the stream is ``rows consumed``, which is
what checkpoints record.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torchrec import EmbeddingBagConfig
from torchrec.datasets.utils import Batch

from torchrec_lowprec.data import (
    CachedDataset,
    CriteoDataset,
    RowBlock,
    SyntheticCTR,
    SyntheticCTRConfig,
    TabularDataset,
    TabularSchema,
    rebatch,
)
from torchrec_lowprec.data.cache import open_cached
from torchrec_lowprec.data.prefetch import can_fork, prefetch, prefetch_process
from torchrec_lowprec.data.synthetic import CRITEO_LIKE_VOCAB_SIZES

# The default synthetic set: eight fields from 50k ids down to 20, so one epoch of 500k rows
# trains in seconds on 2 cores while the rare ids of the big fields still matter.
SMALL_VOCABS = (50_000, 20_000, 10_000, 5_000, 2_000, 500, 100, 20)


class DataError(Exception):
    """Bad data arguments or files: the script prints the message and exits non-zero."""


def add_data_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("data")
    g.add_argument(
        "--data",
        default="synthetic",
        help="synthetic | criteo:PATH[,PATH...] | tabular:PATH[,PATH...] (tabular needs --schema)",
    )
    g.add_argument("--schema", help="YAML/JSON TabularSchema for --data tabular:PATH")
    g.add_argument(
        "--strict", action="store_true", help="fail at the first malformed row (default: skip, warn)"
    )
    g.add_argument(
        "--min-count", type=int, default=1, help="tabular/criteo: values seen fewer times -> OOV id"
    )
    g.add_argument("--split", default="random", choices=["random", "chronological"], help="tabular/criteo")
    g.add_argument(
        "--criteo-int-features",
        default="dense",
        choices=["dense", "categorical"],
        help="criteo: integers as dense log(1+x) (DLRM) or bucketed categorical (papers)",
    )
    g.add_argument("--train-rows", type=int, default=500_000, help="synthetic: training rows")
    g.add_argument("--val-rows", type=int, default=50_000, help="synthetic: validation rows")
    g.add_argument("--test-rows", type=int, default=100_000, help="synthetic: test rows")
    g.add_argument(
        "--vocab-sizes",
        default="small",
        help="synthetic: comma-separated rows per field, 'small' (8 fields, 50k..20) or "
        "'criteo' (26 Criteo-like fields, up to 1M)",
    )
    g.add_argument("--zipf", type=float, default=1.1, help="synthetic: Zipf exponent of every field's ids")
    g.add_argument("--num-dense", type=int, default=4, help="synthetic: dense features")
    g.add_argument("--bag-max", type=int, default=1, help="synthetic: ids per bag are 1..bag-max")
    g.add_argument("--data-seed", type=int, default=0, help="synthetic data / tabular split seed")
    g.add_argument(
        "--prefetch",
        type=int,
        default=4,
        help="training batches prepared ahead of the training loop (0: none, read in the loop)",
    )
    g.add_argument(
        "--prefetch-mode",
        choices=["auto", "process", "thread"],
        default="auto",
        help="where --prefetch prepares batches: a forked process (files: parsing then does not share "
        "the GIL with the training loop), a thread, or auto (process for text files read with "
        "--data-cache off where fork exists, thread for synthetic data and the binary cache)",
    )
    g.add_argument(
        "--data-cache",
        default="auto",
        metavar="auto|off|DIR",
        help="tabular/criteo: parse the text once into a binary cache (memory-mapped arrays) and "
        "train from it on later runs; auto: beside the file if that folder is writable, else "
        "~/.cache/torchrec_lowprec/data; DIR: in this folder; off: parse the text every run",
    )
    g.add_argument(
        "--parse-threads",
        type=int,
        default=0,
        help="tabular/criteo: CSV parser threads (0: cores, at most 4)",
    )


def _paths(spec: str) -> list[str]:
    paths = [p for p in spec.split(",") if p]
    if not paths:
        raise DataError(f"--data {spec!r} names no file")
    for p in paths:
        if not os.path.isfile(p):
            raise DataError(f"data file {p} does not exist (or is not a file): check the --data path")
    return paths


def _vocab_sizes(spec: str) -> tuple[int, ...]:
    if spec == "small":
        return SMALL_VOCABS
    if spec == "criteo":
        return CRITEO_LIKE_VOCAB_SIZES
    try:
        sizes = tuple(int(v) for v in spec.split(","))
    except ValueError:
        raise DataError(
            f"--vocab-sizes {spec!r}: expected 'small', 'criteo' or integers like 1000,50"
        ) from None
    if not sizes or min(sizes) < 1:
        raise DataError(f"--vocab-sizes {spec!r}: every field needs >= 1 row")
    return sizes


def batch_to_block(batch: Batch) -> RowBlock:
    """The inverse of ``RowBlock.to_batch`` (numpy views, no copies of the ids)."""
    kjt = batch.sparse_features
    nf = len(kjt.keys())
    lengths = kjt.lengths().view(nf, -1).numpy()
    values = np.split(kjt.values().numpy(), np.cumsum(kjt.length_per_key())[:-1])
    return RowBlock(batch.dense_features.numpy(), list(lengths), values, batch.labels.numpy())


@dataclass
class LocalBatch:
    """One rank's part of a global batch: ``valid`` of its rows are real (the rest is padding)."""

    batch: Batch
    valid: int
    global_rows: int


class DataSource:
    """One data set (synthetic or tabular) as per-rank batch streams."""

    def __init__(
        self,
        name: str,
        source: SyntheticCTR | TabularDataset | CachedDataset,
        cache: bool = False,
        prefetch: int = 4,
        prefetch_mode: str = "auto",
    ) -> None:
        self.name = name
        self.prefetch = prefetch  # training batches made ahead of the loop (0: inline)
        if prefetch_mode == "auto":
            # Parsing text wants its own interpreter; slicing memory-mapped arrays is cheaper than
            # pickling its blocks through a pipe (3.4M vs 1.3M rows/s on 2 cores).
            parses = isinstance(source, TabularDataset)
            prefetch_mode = "process" if parses and can_fork() else "thread"
        if prefetch_mode == "process" and not can_fork():
            raise DataError("--prefetch-mode process needs fork (Linux/macOS); use --prefetch-mode thread")
        self.prefetch_mode = prefetch_mode
        # Synthetic chunks kept after their first generation (about 300 bytes per row with 26
        # one-hot fields), for callers that train many models on one data set.
        self._cache: dict[tuple[str, int], RowBlock] | None = {} if cache else None
        self.source = source
        self.keys = list(source.feature_names)
        # DLRM needs at least one dense input; a categorical-only file gets a constant 1.
        self.num_dense_in = max(1, source.num_dense)

    @property
    def is_synthetic(self) -> bool:
        return isinstance(self.source, SyntheticCTR)

    def embedding_bag_configs(self, dim: int) -> list[EmbeddingBagConfig]:
        return self.source.embedding_bag_configs(dim)

    def split_rows(self, split: str) -> int | None:
        """Rows of ``split`` if known without a pass over the files."""
        return self.source.split_rows(split) if self.is_synthetic else None

    def malformed_rows(self) -> dict[str, int]:
        return {} if self.is_synthetic else dict(self.source.malformed_rows)

    def bayes(self, split: str) -> dict[str, float] | None:
        """The planted model's AUC / log-loss on ``split`` (synthetic data only)."""
        if not self.is_synthetic or self.source.split_rows(split) == 0:
            return None
        m = self.source.bayes_metrics(split)
        return {"auc": m["auc"], "logloss": m["logloss"], "positive_rate": m["positive_rate"]}

    def blocks(self, split: str, start_row: int = 0) -> Iterator[RowBlock]:
        """Row blocks of ``split`` from row ``start_row`` on."""
        if self.is_synthetic:
            data: SyntheticCTR = self.source
            chunk = data.config.chunk_rows
            for k in range(start_row // chunk, data.num_chunks(split)):
                block = self._chunk(split, k)
                skip = start_row - k * chunk
                yield block.slice(skip, len(block)) if skip > 0 else block
            return
        skip = start_row
        for block in self.source.blocks(split):
            if skip >= len(block):
                skip -= len(block)
                continue
            yield block.slice(skip, len(block)) if skip else block
            skip = 0

    def _chunk(self, split: str, k: int) -> RowBlock:
        if self._cache is None:
            return self.source.chunk(split, k)[0]
        if (split, k) not in self._cache:
            self._cache[(split, k)] = self.source.chunk(split, k)[0]
        return self._cache[(split, k)]

    def _to_batch(self, block: RowBlock) -> Batch:
        if block.dense.shape[1] == 0:
            block = RowBlock(np.ones((len(block), 1), np.float32), block.lengths, block.values, block.labels)
        return block.to_batch(self.keys)

    def train_batches(
        self, batch_size: int, rank: int, world: int, start_row: int = 0
    ) -> Iterator[LocalBatch]:
        """This rank's slices of the global training batches, from ``start_row`` on.

        With several ranks a final global batch is cut to a multiple of ``world`` rows (at
        most ``world - 1`` rows unused) so that every rank steps the same number of times.
        """

        def blocks() -> Iterator[tuple[RowBlock, int, int]]:
            for block in rebatch(self.blocks("train", start_row), batch_size):
                m = len(block) // world
                if m == 0:
                    return
                yield block.slice(rank * m, (rank + 1) * m), m, len(block)

        def local(items: Iterator[tuple[RowBlock, int, int]]) -> Iterator[LocalBatch]:
            for block, m, n in items:
                yield LocalBatch(self._to_batch(block), m, n)

        if not self.prefetch:
            return local(blocks())
        if self.prefetch_mode == "process":
            # Reading, parsing and batching run in a forked process; its pass's malformed-row
            # counts come back at the end. The KJT is built here (tensors stay in this process).
            src = self.source
            state = (src.pass_state, src.merge_pass_state) if not self.is_synthetic else (None, None)
            return local(prefetch_process(blocks, self.prefetch, *state))
        # ... or on a background thread, ahead of the training step.
        return prefetch(local(blocks()), self.prefetch)

    def eval_batches(self, split: str, batch_size: int, rank: int, world: int, max_rows: int | None = None):
        """This rank's slices of every global batch of ``split``; ranks' slices are padded to one
        size (sharded lookups exchange equal batches) and ``valid`` says how many rows are real."""
        left = max_rows
        for block in rebatch(self.blocks(split), batch_size):
            if left is not None:
                if left <= 0:
                    return
                if len(block) > left:
                    block = block.slice(0, left)
                left -= len(block)
            m = -(-len(block) // world)
            lo, hi = min(rank * m, len(block)), min((rank + 1) * m, len(block))
            part = block.slice(lo, hi)
            valid = hi - lo
            if valid < m:
                pad = block.slice(0, 1)
                part = RowBlock.concat([part] + [pad] * (m - valid)) if valid else RowBlock.concat([pad] * m)
            yield LocalBatch(self._to_batch(part), valid, len(block))


def open_data(args: argparse.Namespace, cache: bool = False) -> DataSource:
    """The data set the arguments name; ``DataError`` with one clear message if it cannot be opened.

    ``cache`` keeps generated synthetic rows in memory (see :class:`DataSource`).
    """
    spec: str = args.data
    kind, _, rest = spec.partition(":")
    if kind == "synthetic":
        cfg = SyntheticCTRConfig(
            vocab_sizes=_vocab_sizes(args.vocab_sizes),
            zipf_exponents=args.zipf,
            bag_max=args.bag_max,
            num_dense=args.num_dense,
            train_rows=args.train_rows,
            val_rows=args.val_rows,
            test_rows=args.test_rows,
            seed=args.data_seed,
        )
        return DataSource(
            "synthetic", SyntheticCTR(cfg), cache=cache, prefetch=_prefetch(args), prefetch_mode=_mode(args)
        )
    common = dict(
        min_count=args.min_count,
        split=args.split,
        seed=args.data_seed,
        strict=args.strict,
        workers=getattr(args, "parse_threads", 0) or None,
    )
    try:
        if kind == "criteo":
            src = CriteoDataset(_paths(rest), int_features=args.criteo_int_features, **common)
        elif kind == "tabular":
            if not args.schema:
                raise DataError("--data tabular:PATH needs --schema SCHEMA.yaml (a TabularSchema)")
            schema = TabularSchema.from_file(args.schema)
            src = TabularDataset(_paths(rest), schema, **common)
        else:
            raise DataError(f"--data {spec!r}: expected synthetic, criteo:PATH or tabular:PATH")
        where = getattr(args, "data_cache", "off")
        if where != "off" and not src.schema.multi_valued:
            src = open_cached(src, None if where == "auto" else where)  # converts once (both passes)
        else:  # a pass over the training rows (schema errors surface here), id lookup tables
            src.vocabulary.prepare()
    except (FileNotFoundError, ValueError, ImportError, OSError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(str(e)) from None
    return DataSource(kind, src, prefetch=_prefetch(args), prefetch_mode=_mode(args))


def _mode(args: argparse.Namespace) -> str:
    return getattr(args, "prefetch_mode", "auto")


def _prefetch(args: argparse.Namespace) -> int:
    depth = getattr(args, "prefetch", 4)
    if depth < 0:
        raise DataError(f"--prefetch {depth}: expected 0 (off) or a positive number of batches")
    return depth
