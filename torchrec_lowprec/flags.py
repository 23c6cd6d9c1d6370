"""Command-line flags checked before any work starts: a parser whose error is one line, and
numeric ranges checked from tables (the DLRM and sequence examples read these)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose error is one ``error: ...`` line (exit 2) like every other error of a
    script, not the usage block of all its flags followed by the message.

    Example::

        ap = OneLineErrorParser(description="train")
        ap.add_argument("--batch-size", type=int, default=1024)
        args = ap.parse_args()   # `--batch-size x` prints one line and exits 2
    """

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message}\n")


def flag_name(dest: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + dest.replace("_", "-")


def range_error(
    args: argparse.Namespace,
    int_min: Mapping[str, int],
    float_range: Mapping[str, tuple[float, float, bool, bool]],
    zero_means: Mapping[str, str] | None = None,
) -> str | None:
    """The first numeric flag out of range, as the message to print; None: all fine.

    ``int_min``: dest -> smallest value; ``float_range``: dest -> ``(lo, hi, open_lo,
    open_hi)``, every value also finite; ``zero_means``: what 0 means, for flags where it is a
    setting rather than a count (said in the message). Flags left at ``None`` are not checked.
    """
    zero_means = zero_means or {}
    for dest, lo in int_min.items():
        v = getattr(args, dest, None)
        if v is not None and v < lo:
            zero = f" ({zero_means[dest]})" if dest in zero_means else ""
            return f"{flag_name(dest)} must be >= {lo}{zero}, got {v}"
    for dest, (lo, hi, open_lo, open_hi) in float_range.items():
        v = getattr(args, dest, None)
        if v is None:
            continue
        if math.isfinite(v) and (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi):
            continue
        if hi == math.inf:
            bound = "" if lo == -math.inf else f" {'>' if open_lo else '>='} {lo:g}"
        else:
            bound = f" in {'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"
        return f"{flag_name(dest)} must be a finite number{bound}, got {v}"
    return None


def add_recipe_flags(group: argparse._ActionsContainer) -> None:
    """``--learn-step-size`` / ``--no-learn-step-size`` and ``--hot-rows``, the low-bit recipe
    flags every example takes with the same meaning (``--hot-rows`` is checked by
    :func:`parse_hot_rows`)."""
    group.add_argument(
        "--learn-step-size",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ALPT: learn each row's step size (int8/4/2; --no-learn-step-size: a fixed step, the papers' LPT)",
    )
    group.add_argument(
        "--hot-rows",
        default=None,
        metavar="SHARE:BITS[,SHARE:BITS]",
        help="each table's most frequent rows (counted on the training split) stored wider, hottest group "
        "first, the rest at --precision: e.g. 0.6:8 (the hottest 60%% of rows at 8 bits); with "
        "--no-learn-step-size the low-bit recipes of docs/precision.md",
    )


#: Longest ``--hot-rows`` list accepted (a plan has a handful of groups; bounds the parse).
MAX_HOT_GROUPS = 8


def parse_hot_rows(spec: str, base_bits: int) -> list[tuple[float, int]]:
    """``"0.2:8,0.5:4"`` -> ``[(0.2, 8), (0.5, 4)]``: shares of each table's rows (hottest group
    first) and their widths, for :meth:`PrecisionPlan.hot_rows` over tables at ``base_bits``.

    Raises ``ValueError`` with a one-line message naming ``--hot-rows`` when a share is not in
    (0, 1], the shares add up to more than 1, a width is not a plan width, or a hot group is
    not wider than ``base_bits`` (the rest of the table).

    Example::

        parse_hot_rows("0.6:8", base_bits=4)   # [(0.6, 8)]: int4 tables, hottest 60% at 8 bits
    """
    from torchrec_lowprec.planner.schema import PrecisionPlan

    parts = spec.split(",")
    if len(parts) > MAX_HOT_GROUPS:
        raise ValueError(f"--hot-rows {spec[:80]!r}: at most {MAX_HOT_GROUPS} groups")
    out: list[tuple[float, int]] = []
    for part in parts:
        share_s, sep, bits_s = part.strip().partition(":")
        try:
            share, bits = float(share_s), int(bits_s)
        except ValueError:
            share, bits = math.nan, -1
        if not sep or not math.isfinite(share) or bits < 0:
            raise ValueError(
                f"--hot-rows {spec!r}: {part.strip()!r} is not SHARE:BITS (e.g. 0.6:8: the hottest 60% of "
                "each table's rows at 8 bits)"
            )
        out.append((share, bits))
    try:
        PrecisionPlan.hot_rows({}, base_bits, out)  # the widths' and shares' checks, in one place
    except ValueError as e:
        raise ValueError(f"--hot-rows {spec!r}: {str(e).removeprefix('hot_rows: ')}") from None
    narrow = [bits for _, bits in out if bits <= base_bits]
    if narrow:
        raise ValueError(
            f"--hot-rows {spec!r}: hot rows at {narrow[0]} bits are not wider than the tables' {base_bits}; "
            "give a wider width or a narrower --precision"
        )
    return out
