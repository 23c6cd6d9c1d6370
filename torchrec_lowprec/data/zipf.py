"""Power-law ("Zipf") popularity ranks over a finite vocabulary, sampled in O(1) per draw."""

from __future__ import annotations

import math

import numpy as np


def power_law_ranks(rng: np.random.Generator, vocab: int, s: float, size: int) -> np.ndarray:
    """``size`` popularity ranks in ``[0, vocab)`` with ``P(k)`` close to ``(k+1)**-s``.

    Inverse-CDF draw from the density ``x**-s`` on ``[0.5, vocab + 0.5)``, rounded: the mass
    of rank ``k`` is the integral over ``[k+0.5, k+1.5)``, the midpoint rule for
    ``(k+1)**-s`` (within ~12% at rank 0 for ``s`` near 1, under 3% from rank 1 on). O(1) per
    draw and no table, so a 1M-id field costs nothing to sample.
    """
    u = rng.random(size)
    lo, hi = 0.5, vocab + 0.5
    if s == 0.0:
        x = lo + u * (hi - lo)
    elif abs(s - 1.0) < 1e-9:
        x = lo * np.exp(u * math.log(hi / lo))
    else:
        a = 1.0 - s
        la, ha = lo**a, hi**a
        x = (la + u * (ha - la)) ** (1.0 / a)
    return np.clip((x - 0.5).astype(np.int64), 0, vocab - 1)


def power_law_pmf(vocab: int, s: float) -> np.ndarray:
    """The exact probabilities of the ranks :func:`power_law_ranks` draws (float64 ``[vocab]``)."""
    edges = np.arange(vocab + 1, dtype=np.float64) + 0.5
    if s == 0.0:
        cdf = edges
    elif abs(s - 1.0) < 1e-9:
        cdf = np.log(edges)
    else:
        cdf = edges ** (1.0 - s) / (1.0 - s)
    mass = np.diff(cdf)
    return mass / mass.sum()
