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
