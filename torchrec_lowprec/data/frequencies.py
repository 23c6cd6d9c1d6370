"""Per-id access counts of embedding tables, streamed over batches (input to precision planning)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping

import torch
from torchrec import KeyedJaggedTensor
from torchrec.datasets.utils import Batch

from torchrec_lowprec.progress import progress
from torchrec_lowprec.quant.groups import frequency_groups, frequency_rank

from .common import atomic_write_bytes

__all__ = [
    "count_frequencies",
    "frequency_groups",
    "frequency_rank",
    "load_frequencies",
    "remap_by_rank",
    "save_frequencies",
]

FREQ_FORMAT = "torchrec_lowprec.frequencies"
FREQ_VERSION = 1


def count_frequencies(
    batches: Iterable[Batch | KeyedJaggedTensor], num_embeddings: Mapping[str, int]
) -> dict[str, torch.Tensor]:
    """How often each id of each feature occurs (every occurrence in a bag counts).

    Holds one int64 vector of ``num_embeddings[f]`` counts per feature, whatever the number
    of batches; features of the batches not in ``num_embeddings`` are ignored. An id outside
    ``[0, rows)`` or a feature missing from a batch raises ``ValueError``.

    Example::

        counts = count_frequencies(data.batches("train", 8192), data.vocab_sizes)
        save_frequencies(counts, "freq.pt")
    """
    counts = {f: torch.zeros(int(n), dtype=torch.int64) for f, n in num_embeddings.items()}
    for i, item in enumerate(progress(batches, "counting id frequencies", unit="batch")):
        kjt = item.sparse_features if isinstance(item, Batch) else item
        keys = list(kjt.keys())
        per_key = dict(zip(keys, kjt.values().split(kjt.length_per_key())))
        for f, acc in counts.items():
            if f not in per_key:
                raise ValueError(f"batch {i} has no feature {f!r} (it has {keys})")
            ids = per_key[f]
            if ids.numel() == 0:
                continue
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= acc.numel():
                raise ValueError(
                    f"batch {i}: feature {f!r} has id {lo if lo < 0 else hi} outside [0, {acc.numel()})"
                )
            acc += torch.bincount(ids.to(torch.int64), minlength=acc.numel())
    return counts


def save_frequencies(counts: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Save counts (``torch.save`` of a versioned dict), atomically."""
    buf = io.BytesIO()
    doc = {
        "format": FREQ_FORMAT,
        "version": FREQ_VERSION,
        "counts": {k: v.to(torch.int64).cpu() for k, v in counts.items()},
    }
    torch.save(doc, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_frequencies(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load counts written by :func:`save_frequencies`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"frequency file {path} does not exist: run count_frequencies and save_frequencies"
        )
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for a non-torch file
        raise ValueError(f"{path} is not a frequency file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FREQ_FORMAT:
        raise ValueError(f"{path} is not a {FREQ_FORMAT} file")
    if doc.get("version") != FREQ_VERSION:
        raise ValueError(f"{path} has frequency format version {doc.get('version')}, expected {FREQ_VERSION}")
    return dict(doc["counts"])


def remap_by_rank(kjt: KeyedJaggedTensor, ranks: Mapping[str, torch.Tensor]) -> KeyedJaggedTensor:
    """``kjt`` with the ids of each feature in ``ranks`` replaced by their frequency rank.

    Ids outside a rank map raise ``ValueError`` (the map was built for a smaller vocabulary).
    """
    keys = kjt.keys()
    pieces = list(kjt.values().split(kjt.length_per_key()))
    for i, f in enumerate(keys):
        if f in ranks and pieces[i].numel():
            r = ranks[f]
            ids = pieces[i]
            if int(ids.min()) < 0 or int(ids.max()) >= r.numel():
                raise ValueError(f"feature {f!r}: ids outside [0, {r.numel()}) of its frequency-rank map")
            pieces[i] = r.to(ids.device)[ids].to(ids.dtype)
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.cat(pieces) if pieces else kjt.values(),
        lengths=kjt.lengths(),
        weights=kjt.weights_or_none(),
        stride=kjt.stride(),
    )
