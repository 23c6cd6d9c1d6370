"""Counting the lines of text files and hashing line numbers into splits."""

from __future__ import annotations

import gzip
from collections.abc import Sequence

import numpy as np

_U64 = 0xFFFFFFFFFFFFFFFF


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
