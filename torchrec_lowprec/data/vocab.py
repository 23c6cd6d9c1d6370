"""Per-feature vocabularies: raw string value -> id, with one out-of-vocabulary id per feature.

Built from training rows only. Id 0 is the OOV id (values seen fewer than ``min_count``
times, or never); ids ``1..n`` are the kept values by decreasing training count (ties by
value), so an id's rank is its popularity. Saved as versioned JSON, written atomically.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from itertools import repeat
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .arrow_csv import HashTable

from .common import atomic_write_bytes

OOV_ID = 0
VOCAB_FORMAT = "torchrec_lowprec.vocabulary"
VOCAB_VERSION = 1


class Vocabulary:
    """Value -> id maps for several categorical features, with their training counts.

    Example::

        vocab = Vocabulary.build({"site": Counter({"a": 5, "b": 1})}, min_count=2)
        vocab.lookup("site", ["a", "b", "zzz"])  # array([1, 0, 0])
        vocab.save("vocab.json"); same = Vocabulary.load("vocab.json")
    """

    def __init__(
        self,
        tokens: Mapping[str, list[str]],
        counts: Mapping[str, list[int]],
        oov_counts: Mapping[str, int],
        min_count: int,
        meta: dict | None = None,
    ) -> None:
        self.tokens = {k: list(v) for k, v in tokens.items()}
        self.counts = {k: [int(c) for c in counts[k]] for k in self.tokens}
        self.oov_counts = {k: int(oov_counts.get(k, 0)) for k in self.tokens}
        self.min_count = int(min_count)
        self.meta = dict(meta or {})
        self._maps: dict[str, dict[str, int]] = {}  # built on first lookup()
        self._hashes: dict[str, HashTable | None] = {}  # for dictionary_ids()

    @classmethod
    def build(
        cls, counters: Mapping[str, Counter], min_count: int = 1, meta: dict | None = None
    ) -> Vocabulary:
        """Keep values with ``count >= min_count``, ordered by decreasing count then value."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        tokens, counts, oov = {}, {}, {}
        for name, counter in counters.items():
            kept = sorted(
                ((t, c) for t, c in counter.items() if c >= min_count), key=lambda tc: (-tc[1], tc[0])
            )
            tokens[name] = [t for t, _ in kept]
            counts[name] = [c for _, c in kept]
            oov[name] = sum(counter.values()) - sum(counts[name])
        return cls(tokens, counts, oov, min_count, meta)

    @classmethod
    def from_value_counts(
        cls, value_counts: Mapping[str, tuple], min_count: int = 1, meta: dict | None = None
    ) -> Vocabulary:
        """:meth:`build` from ``{feature: (values, counts)}`` arrow/numpy arrays (values distinct,
        binary or string): the sort and the ``min_count`` cut are vectorised."""
        from .arrow_csv import require_pyarrow

        pa, _, pc = require_pyarrow()
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        tokens, counts, oov = {}, {}, {}
        for name, (values, cnt) in value_counts.items():
            cnt = np.asarray(cnt, np.int64)
            keep = np.flatnonzero(cnt >= min_count)
            table = pa.table({"v": pa.array(values).cast(pa.binary()).take(keep), "c": cnt[keep]})
            # Decreasing count, ties by value: bytewise order of UTF-8 is str order.
            order = pc.sort_indices(table, sort_keys=[("c", "descending"), ("v", "ascending")])
            table = table.take(order)
            try:
                tokens[name] = table.column("v").cast(pa.string()).to_pylist()
            except pa.ArrowInvalid:  # not UTF-8: decode as the old reader did
                tokens[name] = [b.decode("utf-8", "replace") for b in table.column("v").to_pylist()]
            counts[name] = table.column("c").to_numpy().tolist()
            oov[name] = int(cnt.sum()) - int(np.sum(counts[name]))
        return cls(tokens, counts, oov, min_count, meta)

    @property
    def feature_names(self) -> list[str]:
        return list(self.tokens)

    def size(self, feature: str) -> int:
        """Rows a table for ``feature`` needs: kept values + the OOV id."""
        return len(self.tokens[feature]) + 1

    @property
    def sizes(self) -> dict[str, int]:
        return {k: self.size(k) for k in self.tokens}

    def lookup(self, feature: str, values: Iterable[str]) -> np.ndarray:
        """Ids (int64) of ``values``; unknown values get :data:`OOV_ID`."""
        if feature not in self._maps:
            self._maps[feature] = {t: i + 1 for i, t in enumerate(self.tokens[feature])}
        m = self._maps[feature]
        return np.fromiter(map(m.get, values, repeat(OOV_ID)), dtype=np.int64)

    def lookup_arrow(self, feature: str, values) -> np.ndarray:
        """Ids (int64) of an arrow binary/string array (nulls are the empty value), vectorised
        (see :meth:`dictionary_ids`)."""
        return self.dictionary_ids(feature, values)

    def dictionary_ids(self, feature: str, dictionary) -> np.ndarray:
        """Ids (int64) of the values of ``dictionary`` (an arrow binary array, e.g. a dictionary's
        distinct values; null = the empty value).

        Values are matched to the tokens by a 64-bit hash, with numpy (the tokens' hashes are
        checked to be distinct; an unseen value takes a token's id only if their hashes collide,
        odds about ``size / 2**64``).
        """
        from .arrow_csv import hash_binary, require_pyarrow

        pa, _, _ = require_pyarrow()
        index = self._hash_index(feature)
        if index is None:  # two tokens share a hash: match them exactly, per value
            raw = dictionary.cast(pa.binary()).to_pylist()
            return self.lookup(feature, (b.decode("utf-8", "replace") if b else "" for b in raw))
        return index.get(hash_binary(dictionary), OOV_ID)

    def prepare(self) -> None:
        """Build every feature's hash index now (before threads call :meth:`dictionary_ids`)."""
        for k in self.tokens:
            self._hash_index(k)

    def _hash_index(self, feature: str) -> HashTable | None:
        """Token hash -> id (``None`` if two tokens' hashes collide); cached."""
        if feature not in self._hashes:
            from .arrow_csv import HashTable, hash_binary, require_pyarrow

            pa, _, _ = require_pyarrow()
            h = hash_binary(pa.array(self.tokens[feature], pa.string()))
            unique = len(np.unique(h)) == len(h)
            self._hashes[feature] = HashTable(h, np.arange(1, len(h) + 1)) if unique else None
        return self._hashes[feature]

    def frequencies(self, feature: str) -> np.ndarray:
        """Training count of every id (index 0 = all OOV occurrences), int64 ``[size]``."""
        return np.array([self.oov_counts[feature], *self.counts[feature]], dtype=np.int64)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Vocabulary)
            and self.tokens == other.tokens
            and self.counts == other.counts
            and self.oov_counts == other.oov_counts
            and self.min_count == other.min_count
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON through a temp file and a rename, so a reader never sees half a file."""
        doc = {
            "format": VOCAB_FORMAT,
            "version": VOCAB_VERSION,
            "oov_id": OOV_ID,
            "min_count": self.min_count,
            "meta": self.meta,
            "features": {
                k: {"tokens": self.tokens[k], "counts": self.counts[k], "oov_count": self.oov_counts[k]}
                for k in self.tokens
            },
        }
        atomic_write_bytes(path, json.dumps(doc, separators=(",", ":")).encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        """Read a file written by :meth:`save` (checks the format name and version)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"vocabulary file {path} does not exist: build it from the training split and save it"
            )
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a vocabulary file (invalid JSON: {e})") from None
        if not isinstance(doc, dict) or doc.get("format") != VOCAB_FORMAT:
            raise ValueError(f"{path} is not a {VOCAB_FORMAT} file")
        if doc.get("version") != VOCAB_VERSION:
            raise ValueError(
                f"{path} has vocabulary format version {doc.get('version')}, this code reads "
                f"version {VOCAB_VERSION}: rebuild the vocabulary"
            )
        feats = doc["features"]
        return cls(
            {k: v["tokens"] for k, v in feats.items()},
            {k: v["counts"] for k, v in feats.items()},
            {k: v["oov_count"] for k, v in feats.items()},
            doc["min_count"],
            doc.get("meta"),
        )
