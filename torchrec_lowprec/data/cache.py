"""A binary columnar cache of a :class:`TabularDataset`: parse the text once, train from mmap.

The first :func:`open_cached` of a file set runs the vocabulary pass and one conversion pass
and writes, per split, memory-mapped ``.npy`` arrays (``labels`` float32 ``[N]``, ``dense``
float32 ``[N, D]``, ``cats`` int32/int64 ``[N, F]``: the vocabulary ids), the vocabulary and a
JSON manifest into one folder, ``<first file>.<settings hash>.npycache``. Later opens check the
manifest and read the arrays with no parsing; the rows, their order and the batches are those
of the text reader, bit for bit (tests/data/test_data_cache.py).

* **Key.** The folder name hashes the settings that change the rows (files' real paths,
  schema, ``min_count``, split mode, fractions, seed, ``max_line_bytes``, a given vocabulary);
  the manifest records them and each file's size and mtime. A changed file (a stale cache) is
  rebuilt; a manifest that does not parse, names other settings, or arrays whose size or
  header differ from the manifest's, are never read: the cache is rebuilt with a
  :class:`CacheWarning`. The array *contents* are not checksummed (that would read them all
  at every open); the vocabulary is (sha256).
* **Atomic.** The conversion writes into ``.tmp-<name>-*`` and renames the finished folder
  (manifest last) into place, holding a lock file (``flock``) so concurrent opens convert
  once; a killed conversion leaves only a temporary folder, removed by the next conversion.
* **Malformed rows.** The manifest keeps the counts per split and the reported messages; a
  cached pass reports the same numbers and re-issues the messages.
  Multi-valued features are not cached (:class:`CacheError`).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterator

import numpy as np

from ..files import unwritable_reason
from ..progress import note, progress
from .common import SPLITS, RowBlock, VocabularyTables, split_index
from .tabular import MalformedRowError, MalformedRowWarning, TabularDataset
from .vocab import Vocabulary

CACHE_FORMAT = "torchrec_lowprec-data-cache"
CACHE_VERSION = 1
MANIFEST = "manifest.json"
VOCAB_FILE = "vocab.json"
BLOCK_ROWS = 16384  # rows per block read from the arrays (batches are cut from blocks)
_HEADER_BYTES = 128  # every .npy header is padded to this, so it can be rewritten in place
ARRAYS = ("labels", "dense", "cats")


class CacheWarning(UserWarning):
    """A data cache could not be used as it is (corrupt, mismatched) and is rebuilt."""


class CacheError(ValueError):
    """A data set cannot be cached, or its cache folder cannot be used."""


def default_cache_root(paths: list[str]) -> str:
    """The folder of the first file if writable, else ``~/.cache/torchrec_lowprec/data``."""
    folder = os.path.dirname(os.path.abspath(paths[0]))
    if unwritable_reason(os.path.join(folder, ".probe")) is None:
        return folder
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "torchrec_lowprec", "data")


def cache_settings(ds: TabularDataset) -> dict:
    """What the produced rows depend on, besides the files' contents (the cache key)."""
    vocab = None
    if ds._vocab is not None:  # a vocabulary given to the reader (not built from the files)
        v = ds._vocab
        doc = json.dumps([v.tokens, v.counts, v.oov_counts, v.min_count], sort_keys=True)
        vocab = hashlib.sha256(doc.encode()).hexdigest()
    return {
        "paths": [os.path.realpath(p) for p in ds.paths],
        "schema": ds.schema.to_dict(),
        "min_count": ds.min_count,
        "split": ds.split_mode,
        "fractions": list(ds.fractions),
        "seed": ds.seed,
        "max_line_bytes": ds.max_line_bytes,
        "vocabulary": vocab,
    }


def file_stats(paths: list[str]) -> list[dict]:
    return [
        {"path": os.path.realpath(p), "size": (st := os.stat(p)).st_size, "mtime_ns": st.st_mtime_ns}
        for p in paths
    ]


def entry_name(ds: TabularDataset, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    more = f"+{len(ds.paths) - 1}" if len(ds.paths) > 1 else ""
    return f"{os.path.basename(ds.paths[0])}{more}.{digest}.npycache"


# ------------------------------------------------------------------------------- .npy files
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    body = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    body = body.ljust(_HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")


class _NpyAppender:
    """An ``.npy`` file written row block by row block; the header gets the row count at the end."""

    def __init__(self, path: str, dtype, width: int | None) -> None:
        self.path, self.dtype, self.width, self.rows = path, np.dtype(dtype), width, 0
        self.f = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self.f.write(_npy_header(self.dtype, (0,) if width is None else (0, width)))

    def append(self, a: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(a, dtype=self.dtype).tobytes())
        self.rows += len(a)

    def finish(self) -> dict:
        shape = (self.rows,) if self.width is None else (self.rows, self.width)
        self.f.seek(0)
        self.f.write(_npy_header(self.dtype, shape))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"shape": list(shape), "dtype": self.dtype.str, "bytes": os.path.getsize(self.path)}


# ------------------------------------------------------------------------------- the folder
@contextlib.contextmanager
def _locked(root: str, name: str):
    with open(os.path.join(root, f".{name}.lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_entry(entry: str, settings: dict, stats: list[dict]) -> tuple[dict | None, str | None]:
    """``(manifest, None)`` if the folder ``entry`` is a complete cache of these settings and
    files, else ``(None, why)`` (``why`` starts with "missing" or "stale" for a normal rebuild)."""
    path = os.path.join(entry, MANIFEST)
    if not os.path.isdir(entry):
        return None, "missing"
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"has no readable manifest ({e})"
    if not isinstance(m, dict) or m.get("format") != CACHE_FORMAT or m.get("version") != CACHE_VERSION:
        return None, f"has a manifest of another format/version ({path})"
    if m.get("settings") != settings:
        return None, "was built with other settings (its manifest's settings differ)"
    if m.get("files") != stats:
        return None, "stale: the data file(s) changed since it was built (size or mtime)"
    try:
        for split in SPLITS:
            for name in ARRAYS:
                spec = m["arrays"][split][name]
                p = os.path.join(entry, split, f"{name}.npy")
                if os.path.getsize(p) != spec["bytes"]:
                    return None, f"has a truncated or resized array {p}"
                a = np.load(p, mmap_mode="r")
                if list(a.shape) != spec["shape"] or a.dtype.str != spec["dtype"]:
                    return None, f"has an array {p} whose header differs from the manifest"
        if _sha256(os.path.join(entry, VOCAB_FILE)) != m["vocabulary_sha256"]:
            return None, "has a vocabulary that differs from the manifest's checksum"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"is incomplete or corrupt ({type(e).__name__}: {e})"
    return m, None


def _convert(ds: TabularDataset, tmp: str, settings: dict, stats: list[dict]) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MalformedRowWarning)
        vocab = ds.vocabulary  # the vocabulary pass (its own progress bar)
        vocab.prepare()
        big = max(vocab.sizes.values(), default=0) >= 2**31
        cat_dtype = np.int64 if big else np.int32
        out: dict[str, dict[str, _NpyAppender]] = {}
        for split in SPLITS:
            os.makedirs(os.path.join(tmp, split))
            specs = {"labels": (np.float32, None), "dense": (np.float32, ds.num_dense)}
            specs["cats"] = (cat_dtype, len(ds.feature_names))
            out[split] = {n: _NpyAppender(os.path.join(tmp, split, f"{n}.npy"), *t) for n, t in specs.items()}
        for block, codes in progress(ds.blocks_with_splits(), "data cache: converting", unit="segment"):
            for code, split in enumerate(SPLITS):
                rows = np.flatnonzero(codes == code)
                if not len(rows):
                    continue
                w = out[split]
                w["labels"].append(block.labels[rows])
                w["dense"].append(block.dense[rows])
                cats = np.stack(block.values, axis=1) if block.values else np.zeros((len(block), 0))
                w["cats"].append(cats[rows])
    messages = [str(w.message) for w in caught if issubclass(w.category, MalformedRowWarning)]
    for w in caught:  # shown as the text reader shows them
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    arrays = {s: {n: a.finish() for n, a in out[s].items()} for s in SPLITS}
    vocab.save(os.path.join(tmp, VOCAB_FILE))
    manifest = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "settings": settings,
        "files": stats,
        "feature_names": ds.feature_names,
        "dense_names": ds.dense_names,
        "rows": {s: arrays[s]["labels"]["shape"][0] for s in SPLITS},
        "malformed_rows": {s: ds.malformed_rows.get(s, 0) for s in SPLITS},
        "malformed_messages": messages,
        "arrays": arrays,
        "vocabulary_sha256": _sha256(os.path.join(tmp, VOCAB_FILE)),
    }
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def open_cached(ds: TabularDataset, cache_dir: str | os.PathLike | None = None) -> CachedDataset:
    """``ds`` from its binary cache in ``cache_dir`` (default :func:`default_cache_root`),
    converting the text first if there is no valid cache. Raises :class:`CacheError` for a
    schema with multi-valued features or a cache folder that cannot be used."""
    if ds.schema.multi_valued:
        raise CacheError("multi-valued features are not cached: read this schema's files as text")
    root = os.path.abspath(os.fspath(cache_dir)) if cache_dir is not None else default_cache_root(ds.paths)
    if os.path.exists(root) and not os.path.isdir(root):
        raise CacheError(f"data cache folder {root} is a file, not a folder")
    os.makedirs(root, exist_ok=True)
    settings, stats = cache_settings(ds), file_stats(ds.paths)
    name = entry_name(ds, settings)
    entry = os.path.join(root, name)
    with _locked(root, name):
        manifest, why = check_entry(entry, settings, stats)
        if manifest is None:
            if why.startswith("stale"):
                note(f"data cache {entry} is {why}: rebuilding it")
            elif why != "missing":
                warnings.warn(
                    f"data cache {entry} {why}: not read, rebuilding it", CacheWarning, stacklevel=2
                )
            for old in glob.glob(os.path.join(root, f".tmp-{name}-*")):  # killed conversions
                shutil.rmtree(old, ignore_errors=True)
            tmp = tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-")
            try:
                note(f"converting {', '.join(ds.paths)} to the binary cache {entry} (once)")
                manifest = _convert(ds, tmp, settings, stats)
                if os.path.lexists(entry):
                    gone = tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-old-")
                    os.replace(entry, os.path.join(gone, "entry"))
                    shutil.rmtree(gone, ignore_errors=True)
                os.replace(tmp, entry)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return CachedDataset(entry, manifest, strict=ds.strict, source=ds)


class CachedDataset(VocabularyTables):
    """The rows of a :class:`TabularDataset` from its binary cache (see :func:`open_cached`):
    the same ``blocks`` / ``batches`` / vocabulary API, batches sliced from memory-mapped arrays."""

    def __init__(self, entry: str, manifest: dict, strict: bool = False, source=None) -> None:
        self.cache_dir, self.manifest, self.strict = entry, manifest, strict
        self.paths = list(source.paths) if source is not None else [f["path"] for f in manifest["files"]]
        self.schema = source.schema if source is not None else None
        self.feature_names = list(manifest["feature_names"])
        self.dense_names = list(manifest["dense_names"])
        self.malformed_rows: dict[str, int] = {}
        self._vocab = Vocabulary.load(os.path.join(entry, VOCAB_FILE))
        self._arrays: dict[str, dict[str, np.ndarray]] = {}
        if strict and (messages := manifest["malformed_messages"]):
            raise MalformedRowError(messages[0].removesuffix(", skipped") + "; strict=True stops here")

    @property
    def num_dense(self) -> int:
        return len(self.dense_names)

    @property
    def vocabulary(self) -> Vocabulary:
        return self._vocab

    def save_vocabulary(self, path: str | os.PathLike) -> None:
        self._vocab.save(path)

    def split_rows(self, split: str) -> int:
        return int(self.manifest["rows"][SPLITS[split_index(split)]])

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        """``labels``, ``dense``, ``cats`` of ``split``, memory-mapped read-only."""
        if split not in self._arrays:
            d = os.path.join(self.cache_dir, split)
            self._arrays[split] = {n: np.load(os.path.join(d, f"{n}.npy"), mmap_mode="r") for n in ARRAYS}
        return self._arrays[split]

    def blocks(self, split: str, num_rows: int | None = None) -> Iterator[RowBlock]:
        """Row blocks of ``split`` in file order (copies out of the mmap, int64 ids)."""
        split = SPLITS[split_index(split)]
        a = self.arrays(split)
        n = len(a["labels"]) if num_rows is None else min(num_rows, len(a["labels"]))
        for lo in range(0, n, BLOCK_ROWS):
            hi = min(lo + BLOCK_ROWS, n)
            ones = np.ones(hi - lo, np.int32)
            ids = np.ascontiguousarray(a["cats"][lo:hi].T, dtype=np.int64)
            yield RowBlock(
                np.array(a["dense"][lo:hi]), [ones] * len(ids), list(ids), np.array(a["labels"][lo:hi])
            )
        if num_rows is None:
            self._finish_pass(split)

    def _finish_pass(self, split: str) -> None:
        if not self.malformed_rows:  # the first pass reports what the conversion skipped
            for m in self.manifest["malformed_messages"]:
                warnings.warn(m, MalformedRowWarning, stacklevel=3)
        self.malformed_rows[split] = int(self.manifest["malformed_rows"][split])

    def scan(self) -> dict[str, dict[str, int]]:
        return {"rows": dict(self.manifest["rows"]), "malformed": dict(self.manifest["malformed_rows"])}

    def pass_state(self) -> dict:
        return {"malformed_rows": dict(self.malformed_rows)}

    def merge_pass_state(self, state: dict) -> None:
        self.malformed_rows.update(state["malformed_rows"])
