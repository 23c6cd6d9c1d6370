"""Lines of text files: counting them, reading them with a length limit, the errors for an
over-long line and for a quoted field that does not close on its line, and hashing line numbers
into splits."""

from __future__ import annotations

import gzip
from collections.abc import Sequence

import numpy as np

_U64 = 0xFFFFFFFFFFFFFFFF
#: Longest line read (bytes, its line break not counted); ``max_line_bytes=`` of the readers.
MAX_LINE_BYTES = 4 << 20
_MEASURE_BYTES = 256 << 20  # how far past the limit a long line's length is measured


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def random_split_codes(seed: int, start: int, count: int, fractions: Sequence[float]) -> np.ndarray:
    """Split (0 train, 1 val, 2 test) of data lines ``start..start+count-1``: splitmix64 of (seed, line)."""
    z = np.arange(start, start + count, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z += np.uint64(_splitmix64(seed & _U64))  # uint64 arithmetic wraps, as the hash wants
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    u = (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return ((u >= fractions[0]).astype(np.uint8) + (u >= fractions[0] + fractions[1])).astype(np.uint8)


def count_lines(path: str, header: bool = False) -> int:
    """Data lines of a text (or ``.gz``) file, counting ``b"\\n"`` in 16 MiB reads."""
    opener = gzip.open if path.endswith(".gz") else open
    n, last = 0, b"\n"
    with opener(path, "rb") as f:
        while buf := f.read(1 << 24):
            n += buf.count(b"\n")
            last = buf[-1:]
    n += last != b"\n"  # a last line without its newline
    return n - (1 if header and n else 0)


def _mib(n: int) -> str:
    return f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n / (1 << 20):.1f} MiB"


def line_too_long(path: str, line: int, length: int, limit: int, more: bool = False) -> ValueError:
    """The error for line ``line`` of ``path`` holding ``length`` bytes (``more``: at least)."""
    size = f"at least {length}" if more else f"{length}"
    return ValueError(
        f"{path}:{line}: line of {size} bytes is longer than the limit max_line_bytes={limit} "
        f"({_mib(limit)}); is this the right file (line breaks, delimiter)? If the line is meant, "
        "pass a larger max_line_bytes= to TabularDataset / CriteoDataset"
    )


def _rest_of_line(f, have: int) -> int:
    """Bytes of the current line still in ``f`` (up to about :data:`_MEASURE_BYTES`) after ``have``."""
    n = have
    while n < _MEASURE_BYTES:
        chunk = f.readline(1 << 20)
        n += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return n - chunk.endswith(b"\n")
    return n


def read_line(f, path: str, line: int, limit: int = MAX_LINE_BYTES) -> bytes:
    """The next line of ``f`` (with its line break; ``b""`` at the end) if it holds at most
    ``limit`` bytes, else the :func:`line_too_long` error: a file without line breaks is not read whole."""
    got = f.readline(limit + 2)
    body = len(got) - got.endswith(b"\n")
    if body > limit:
        n = _rest_of_line(f, len(got)) if not got.endswith(b"\n") else body
        raise line_too_long(path, line, n, limit, more=n >= _MEASURE_BYTES)
    return got


def check_line_lengths(buf: bytes, path: str, first_line: int, limit: int, f) -> None:
    """``line_too_long`` for the first line of ``buf`` over ``limit`` bytes (``f``: the file
    after ``buf``, to measure a last line cut at the limit)."""
    if len(buf) <= limit:
        return
    breaks = np.flatnonzero(np.frombuffer(buf, np.uint8) == 10)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [len(buf)]])
    over = np.flatnonzero(ends - starts > limit)
    if len(over):
        k = int(over[0])
        n = int(ends[k] - starts[k])
        if k == len(breaks):  # the last line, cut where the reading stopped
            n = _rest_of_line(f, n)
        raise line_too_long(path, first_line + k, n, limit, more=n >= _MEASURE_BYTES)


def opens_quote(line: bytes, delimiter: str) -> bool:
    """Whether ``line`` ends inside a quoted field (CSV rules as pyarrow's: a field is quoted if it
    starts with ``"``, ``""`` inside is one quote)."""
    if b'"' not in line:
        return False
    delim, inside, at_start, i = ord(delimiter), False, True, 0
    while i < len(line):
        c = line[i]
        if inside:
            if c == 34 and i + 1 < len(line) and line[i + 1] == 34:
                i += 1
            elif c == 34:
                inside = False
        elif c == 34 and at_start:
            inside, at_start = True, False
            i += 1
            continue
        at_start = not inside and c == delim
        i += 1
    return inside


def quoted_break(path: str, line: int) -> ValueError:
    """The error for a quoted field of line ``line`` of ``path`` that does not close on it."""
    return ValueError(
        f"{path}:{line}: a quoted field holds a line break (or its closing "
        "quote is missing); line breaks inside quoted fields are not supported: remove them from "
        "the field or fix the quoting"
    )
