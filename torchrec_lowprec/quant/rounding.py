"""Counter-based random draws and rounding onto the integer grid.

Every random number is a pure function of ``(seed, table, step, global row, global column)``,
so a table gets the same draws whichever rank holds a row, however it is sharded, and
whichever backend (PyTorch reference, C++ kernel, Triton kernel) runs the update.

The hash is ``mix32`` (the "lowbias32" integer finaliser, two multiplies and three
xor-shifts). It is evaluated on int64 tensors holding values below 2**32: products wrap
modulo 2**64 and the mask keeps the low 32 bits, which are exact.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_GOLDEN = 0x9E3779B9
TWO_POW_M24 = 1.0 / (1 << 24)
#: round(2**24 * (sqrt(5) - 1) / 2): the golden-ratio increment of the dithered draws (24 bits)
WEYL_24 = 10368890
MASK24 = 0xFFFFFF


def mix32_int(x: int) -> int:
    """``mix32`` on a Python int (used for per-call keys)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    x ^= x >> 16
    return x


def mix32(x: torch.Tensor) -> torch.Tensor:
    """``mix32`` elementwise on an int64 tensor of values in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & MASK32
    return x ^ (x >> 16)


def table_hash(name: str) -> int:
    """A stable 32-bit id of a table name (FNV-1a), equal in every process."""
    h = 0x811C9DC5
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & MASK32
    return h


def hash_key(seed: int, table: int, step: int) -> int:
    """The 32-bit key of one table's update at one step; rows and columns are mixed in later."""
    k = mix32_int(seed & MASK32) ^ mix32_int(seed >> 32)
    k = mix32_int(k ^ (table & MASK32))
    return mix32_int(k ^ (step & MASK32)) ^ mix32_int(step >> 32)


def row_keys(key: int, global_rows: torch.Tensor) -> torch.Tensor:
    """Per-row keys (int64 in ``[0, 2**32)``) for global row ids."""
    lo = global_rows & MASK32
    hi = global_rows >> 32
    return mix32(mix32(lo ^ key) ^ hi)


def dither_offset(step: int) -> int:
    """The 24-bit offset ``rounding="dithered"`` adds to every draw at ``step``:
    ``step * WEYL_24 mod 2**24``, the golden-ratio (Weyl) sequence ``frac(step * 0.618...)``."""
    return (int(step) * WEYL_24) & MASK24


def uniform_from_counter(row_key: torch.Tensor, global_cols: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Uniform draws in ``[0, 1)`` with 24 random bits, one per (row, column).

    ``row_key`` is ``[U, 1]`` and ``global_cols`` is ``[D]``; the result is ``[U, D]`` fp32.
    ``offset`` (24 bits, :func:`dither_offset`) is added modulo 2**24: with a key that does not
    change with the step, an element's draws over steps are ``frac(c + step * 0.618...)``, a
    low-discrepancy sequence (``rounding="dithered"``); 0 leaves the draws as they were.
    """
    h = mix32((row_key + global_cols * _GOLDEN) & MASK32)
    return (((h >> 8) + offset) & MASK24).to(torch.float32) * TWO_POW_M24


def round_to_grid(v: torch.Tensor, qmin: int, qmax: int, noise: torch.Tensor | None) -> torch.Tensor:
    """Round ``v`` (values in units of the step size) to integers in ``[qmin, qmax]``.

    ``noise`` uniform in [0, 1) gives stochastic rounding ``floor(v + u)`` (unbiased inside
    the grid); ``None`` gives nearest rounding ``floor(v + 0.5)`` (ties up, the same rule in
    every backend).
    """
    shifted = v + (noise if noise is not None else 0.5)
    return torch.clamp(torch.floor(shifted), qmin, qmax)
