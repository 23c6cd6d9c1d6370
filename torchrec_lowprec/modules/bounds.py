"""Checking ids against table sizes before they reach a kernel."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_lowprec.kernels.dispatch import backend_for
from torchrec_lowprec.modules.input_check import REPORT_BAD_IDS, REPORT_BAD_KJT, REPORT_OK, combined


def _limits(
    values: torch.Tensor, lengths: torch.Tensor, rows: list[int], batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids of each feature and each id's table size (``lengths`` key-major, ``len(rows)``
    features x ``batch``)."""
    per_feature = lengths.view(len(rows), batch).sum(dim=1)
    limit = torch.repeat_interleave(
        torch.tensor(rows, device=values.device), per_feature, output_size=values.numel()
    )
    return per_feature, limit


def _out_of_range(value: int, feature: str, table: str, rows: int, count: int, where: str) -> str:
    return (
        f"id {value} of feature {feature!r} is out of range for table {table!r} with {rows} rows "
        f"({count} bad id(s){where})"
    )


_FIX_IDS = "; fix the ids, or set bounds_check='warn' / 'ignore' to drop them"


def check_ids(
    values: torch.Tensor,
    lengths: torch.Tensor,
    weights: torch.Tensor | None,
    features: list[str],
    rows: list[int],
    batch: int,
    modes: list[str],
    tables: list[str],
    dropped: str = "dropped from their bags",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return ``(values, lengths, weights)`` with out-of-range ids handled per feature mode.

    ``"raise"``: ``IndexError`` naming the table, feature and offending id. ``"warn"`` /
    ``"ignore"``: the id is dropped from its bag (with a warning for ``"warn"`` ending in
    ``dropped``: what the caller does with them).
    """
    if values.numel() == 0:
        return values, lengths, weights
    if values.device.type == "cpu" and backend_for(values.device) == "cpu_native":
        from torchrec_lowprec.kernels import cpu_native

        # One native pass; the tensor version below only runs to report or drop bad ids.
        if cpu_native.count_out_of_range(values, lengths, rows, batch) == 0:
            return values, lengths, weights
    per_feature, limit = _limits(values, lengths, rows, batch)
    bad = (values < 0) | (values >= limit)
    if not bool(bad.any()):
        return values, lengths, weights
    bad_pos = torch.nonzero(bad).flatten()
    first = int(bad_pos[0])
    f_of_first = int(torch.searchsorted(torch.cumsum(per_feature, 0), first, right=True))
    f = f_of_first
    msg = _out_of_range(
        int(values[first]), features[f], tables[f], rows[f], bad_pos.numel(), " in this batch"
    )
    f_bad = torch.searchsorted(torch.cumsum(per_feature, 0), bad_pos, right=True)
    if any(modes[int(f)] == "raise" for f in torch.unique(f_bad)):
        raise IndexError(msg + _FIX_IDS)
    if any(modes[int(f)] == "warn" for f in torch.unique(f_bad)):
        warnings.warn(f"{msg}; {dropped}", RuntimeWarning, stacklevel=3)
    keep = ~bad
    bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    new_lengths = torch.zeros_like(lengths).index_add_(0, bag, keep.to(lengths.dtype))
    return values[keep], new_lengths, weights[keep] if weights is not None else None


def in_range_mask(values: torch.Tensor, lengths: torch.Tensor, rows: list[int], batch: int) -> torch.Tensor:
    """Per id, whether it lies in ``[0, rows[f])`` of its feature ``f`` (lengths key-major):
    the ids :func:`check_ids` keeps, for a sequence collection that keeps their positions."""
    _, limit = _limits(values, lengths, rows, batch)
    return (values >= 0) & (values < limit)


_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_sizes(features: KeyedJaggedTensor, weighted: bool) -> bool:
    """The O(1) checks of :func:`validate_kjt` (keys, dtypes, shapes); ``True`` if the KJT has
    no bags (nothing more to check)."""
    keys = features.keys()
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(
            f"KJT has duplicate key(s) {dup} in {keys}; each feature must appear once (which copy a "
            "collection would read is undefined: TorchRec's EmbeddingBagCollection reads the last)"
        )
    if features.variable_stride_per_key():
        raise ValueError("variable batch size per feature (VBE) KJTs are not supported")
    values, weights, offsets = features.values(), features.weights_or_none(), features.offsets_or_none()
    if values.dim() != 1 or values.dtype not in _INDEX_DTYPES:
        raise ValueError(
            f"KJT values must be a 1-D int32/int64 tensor of ids, got {values.dtype} of shape {tuple(values.shape)}"
        )
    lengths = features.lengths()  # from the offsets if only those were given
    if lengths.dim() != 1 or lengths.dtype not in _INDEX_DTYPES:
        raise ValueError(
            f"KJT lengths must be a 1-D int32/int64 tensor, got {lengths.dtype} of shape {tuple(lengths.shape)}"
        )
    batch = features.stride()
    if lengths.numel() != len(keys) * batch:
        raise ValueError(
            f"KJT has {lengths.numel()} lengths for {len(keys)} keys x batch size {batch}; it needs one "
            f"length per key and sample ({len(keys) * batch}), key-major"
        )
    if weighted and weights is None:
        raise ValueError("the collection is weighted (is_weighted=True) but the KJT has no weights")
    if weights is not None and weights.shape != values.shape:
        raise ValueError(
            f"KJT has {weights.numel()} weights for {values.numel()} values; per-sample weights need "
            "one weight per id"
        )
    if offsets is not None and offsets.numel() != lengths.numel() + 1:
        raise ValueError(
            f"KJT has {offsets.numel()} offsets for {lengths.numel()} lengths; expected one more"
        )
    if lengths.numel() == 0:
        if values.numel():
            raise ValueError(f"KJT has {values.numel()} values but no bags (empty lengths)")
        return True
    return False


def validate_kjt(features: KeyedJaggedTensor, weighted: bool = False) -> list[int]:
    """Raise ``ValueError`` saying what is inconsistent if ``features``' lengths / offsets /
    values / weights do not describe one another, before any kernel reads them.

    FBGEMM's kernels trust these sizes (``values=[]`` with ``lengths=[3, 3]`` reads past the
    end of ``values``), so every collection checks them first. Cost: O(1) size checks and one
    pass over the lengths (their min, sum and per-key sums), no pass over the values: on CPU a
    native pass that reads them in place (no host sync); elsewhere one reduction read back to
    the host (one sync). ``weighted``: the collection reads per-sample weights, so the KJT must carry
    them. Returns the ids per key (the collections split the fused update by it, so the
    backward needs no sync of its own).
    """
    keys, batch = features.keys(), features.stride()
    if _check_sizes(features, weighted):
        return [0] * len(keys)
    values, offsets, lengths = features.values(), features.offsets_or_none(), features.lengths()
    if lengths.device.type == "cpu" and backend_for(lengths.device) == "cpu_native":
        from torchrec_lowprec.kernels import cpu_native

        # Read in place: host tensors need no copy, so the check makes no host sync.
        low, low_at, total, first, last, per_key_totals = cpu_native.kjt_length_stats(
            lengths, offsets, len(keys)
        )
    else:  # one reduction read back: one host sync (docs/design.md, "Bad input")
        stats = [lengths.min().to(torch.int64), lengths.sum(dtype=torch.int64)]
        stats += [offsets[0].to(torch.int64), offsets[-1].to(torch.int64)] if offsets is not None else []
        per_key = lengths.view(len(keys), batch).sum(dim=1, dtype=torch.int64)
        low, total, *rest = torch.cat([torch.stack(stats), per_key]).tolist()
        (first, last), per_key_totals = (rest[:2] if offsets is not None else (0, 0)), rest[-len(keys) :]
        low_at = int(torch.nonzero(lengths == low)[0]) if low < 0 else 0
    if low < 0:
        raise ValueError(
            f"KJT lengths has negative entries (smallest: {low} at key {keys[low_at // batch]!r}, "
            f"sample {low_at % batch}); lengths count the ids of each bag"
        )
    if offsets is not None and (first != 0 or last != values.numel()):
        raise ValueError(
            f"KJT offsets run from {first} to {last} but values holds {values.numel()} ids; offsets "
            "must start at 0 and end at values.numel()"
        )
    if total != values.numel():
        raise ValueError(
            f"KJT lengths sum to {total} but values holds {values.numel()} ids; sum(lengths) must equal "
            "values.numel()"
        )
    return per_key_totals


def in_feature_order(
    features: KeyedJaggedTensor, order: list[str], weighted: bool = False
) -> KeyedJaggedTensor:
    """``features``, checked by :func:`validate_kjt`, with its keys in ``order`` (extra keys
    dropped, a key repeated where ``order`` repeats it); ``ValueError`` naming any feature of
    ``order`` the KJT lacks."""
    return ordered_with_totals(features, order, weighted)[0]


def ordered_with_totals(
    features: KeyedJaggedTensor, order: list[str], weighted: bool = False, known: list[int] | None = None
) -> tuple[KeyedJaggedTensor, list[int]]:
    """:func:`in_feature_order` and the number of ids of each entry of ``order``.

    ``known``: those numbers, from a caller that already has them on the host for a KJT already
    in ``order`` and built from a checked one (a sharded lookup's input: TorchRec's input dist
    output carries its ``length_per_key``, and the global KJT was checked before it). The KJT is
    then not checked again, and no host sync is made here."""
    if known is not None:
        if features.keys() != order or len(known) != len(order):
            raise ValueError(f"known totals need a KJT keyed {order}, got {features.keys()}")
        return features, list(known)
    return _in_order(features, order, validate_kjt(features, weighted))


def ordered_on_device(
    features: KeyedJaggedTensor, order: list[str], weighted: bool = False
) -> tuple[KeyedJaggedTensor, list[int], torch.Tensor | None]:
    """:func:`ordered_with_totals` for a batch whose checks run on the device
    (``input_check.checks_on_device``): the lengths pass is made there when the KJT carries its
    ``length_per_key`` (no sync; a bad KJT gets safe lengths and a report, see
    :func:`kjt_report`), and the report is returned; without ``length_per_key`` the
    check reads its numbers back as :func:`validate_kjt` does (one sync) and the report is
    ``None``."""
    if not _check_sizes(features, weighted):
        checked = kjt_report(features)
        if checked is not None:
            kjt, totals, report = checked
            return (*_in_order(kjt, order, totals), report)
    return (*ordered_with_totals(features, order, weighted), None)


def _in_order(
    features: KeyedJaggedTensor, order: list[str], per_key: list[int]
) -> tuple[KeyedJaggedTensor, list[int]]:
    totals = dict(zip(features.keys(), per_key))
    if features.keys() == order:
        return features, [totals[f] for f in order]
    missing = list(dict.fromkeys(f for f in order if f not in features.keys()))  # once each
    if missing:
        raise ValueError(f"KJT lacks feature(s) {missing} of this collection; it has {features.keys()}")
    return features.permute([features.keys().index(f) for f in order]), [totals[f] for f in order]


# ----- the same checks on the device (modules/input_check.py) -----
def id_report(
    values: torch.Tensor, lengths: torch.Tensor, rows: list[int], batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids safe to look up, report)`` of the id bounds check, on the device: ids outside
    ``[0, rows[f])`` of their feature ``f`` read row 0; the report counts them and names the
    first (``lengths`` key-major, ``len(rows)`` keys x ``batch``)."""
    if values.numel() == 0:  # (argmax has no first element to name)
        return values, torch.zeros(4, dtype=torch.int64, device=values.device)
    per_feature, limit = _limits(values, lengths, rows, batch)
    bad = (values < 0) | (values >= limit)
    count = bad.sum(dtype=torch.int64)
    first = torch.argmax(bad.to(torch.uint8))  # the first maximum: the first bad id
    feature = torch.searchsorted(torch.cumsum(per_feature, 0), first, right=True)
    kind = torch.where(count > 0, REPORT_BAD_IDS, REPORT_OK)
    report = torch.stack([kind, count, values[first].to(torch.int64), feature.to(torch.int64)])
    return torch.where(bad, torch.zeros_like(values), values), report


def ids_checked_on_device(
    features: KeyedJaggedTensor, order: list[str], rows: list[int], weighted: bool = False
) -> tuple[KeyedJaggedTensor, list[int], torch.Tensor, torch.Tensor]:
    """:func:`ordered_on_device` then :func:`id_report` (``rows``: each entry of ``order``'s
    table size): the KJT in ``order`` whose bad ids read row 0, carrying its ``length_per_key``
    (nothing after it syncs for it), the ids per entry, the combined report, and the ids as
    fed (in ``order``)."""
    kjt, totals, report = ordered_on_device(features, order, weighted)
    fed = kjt.values()
    safe, ids = id_report(fed, kjt.lengths(), rows, kjt.stride())
    checked = KeyedJaggedTensor(
        keys=order, values=safe, lengths=kjt.lengths(), weights=kjt.weights_or_none(),
        stride=kjt.stride(), length_per_key=totals,
    )  # fmt: skip
    return checked, totals, combined(report, ids), fed


def kjt_report(features: KeyedJaggedTensor) -> tuple[KeyedJaggedTensor, list[int], torch.Tensor] | None:
    """``(features with safe lengths, ids per key, report)`` of the KJT consistency check, on
    the device, for a KJT that carries its ``length_per_key`` on the host (TorchRec's input
    pipelines and ``KeyedJaggedTensor.to()`` keep it); ``None`` if it carries none (the caller
    then checks on the host). The sizes the host knows are checked at once (``ValueError``)."""
    known = features.length_per_key_or_none()
    keys, values, batch = features.keys(), features.values(), features.stride()
    if known is None or len(known) != len(keys):
        return None
    if sum(known) != values.numel():
        raise ValueError(
            f"KJT length_per_key sums to {sum(known)} but values holds {values.numel()} ids; they "
            "must agree (and with sum(lengths))"
        )
    lengths, offsets = features.lengths(), features.offsets_or_none()
    dev = lengths.device
    expected = torch.tensor(known, dtype=torch.int64, device=dev)
    per_key = lengths.view(len(keys), batch).sum(dim=1, dtype=torch.int64)
    mismatch = per_key != expected
    bad = (lengths < 0).any() | mismatch.any()
    if offsets is not None:
        bad = bad | (offsets[0] != 0) | (offsets[-1] != values.numel())
    # Consistent stand-in lengths (each key's ids in its first bag): no kernel reads past values.
    safe = torch.zeros_like(lengths).index_put_(
        (torch.arange(len(keys), device=dev) * batch,), expected.to(lengths.dtype)
    )
    checked = KeyedJaggedTensor(
        keys=keys,
        values=values,
        weights=features.weights_or_none(),
        lengths=torch.where(bad, safe, lengths),
        stride=batch,
        length_per_key=known,
    )
    key_at = torch.argmax(mismatch.to(torch.uint8))
    kind = torch.where(bad, REPORT_BAD_KJT, REPORT_OK)
    report = torch.stack([kind, per_key[key_at], expected[key_at], key_at]).to(torch.int64)
    return checked, list(known), report


def describe_report(
    kjt_keys: list[str],
    features: list[str],
    tables: list[str],
    rows: list[int],
    device: torch.device,
    later: bool = True,
) -> Callable[[list[int], int], Exception]:
    """The function that turns a report into its exception: KJT reports name a key of
    ``kjt_keys`` (the fed KJT's), id reports a lookup slot (its feature, table and rows).
    ``later=False``: for a report read back in the step that fed the batch (the message says
    so, not "raised a step or more later")."""

    def describe(numbers: list[int], step: int) -> Exception:
        kind, count, a, b = numbers
        when = (
            f" in the batch of step {step} (checked on {device.type} without waiting for it, so "
            "raised a step or more later; that batch updated no table)"
            if later
            else " in this batch"
        )
        if kind == REPORT_BAD_KJT:
            return ValueError(
                f"KJT lengths disagree with its length_per_key or offsets "
                f"(key {kjt_keys[b]!r}: lengths sum to {count}, length_per_key says {a}; or a "
                f"negative length, or offsets not running from 0 to values.numel()){when}; build "
                "the KJT from consistent lengths/offsets"
            )
        return IndexError(_out_of_range(a, features[b], tables[b], rows[b], count, "") + when + _FIX_IDS)

    return describe
