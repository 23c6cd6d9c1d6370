"""Configuration of MEC codebook compression (no torchrec import)."""

from __future__ import annotations

import math
from dataclasses import dataclass

POPULARITY_WEIGHTINGS = ("log", "count", "uniform")
CODEBOOK_INITS = ("kmeans", "random")


def _power_of_two(k: int) -> bool:
    return k > 1 and (k & (k - 1)) == 0


@dataclass(frozen=True)
class MECConfig:
    """How large tables are replaced by product-quantization codes (MEC, Wang et al.).

    Each table of at least ``min_rows`` rows is split into ``num_subspaces`` (L) column blocks;
    each block gets a codebook of ``codebook_size`` (K) codewords and every row stores one code
    per block. Rows are served as the concatenation of their L codewords.

    Args:
        num_subspaces: L, sub-codebooks per table (must divide each compressed table's dim).
        codebook_size: K, codewords per sub-codebook: a power of two, 2..65536 (codes are
            uint8 for K <= 256, else uint16).
        min_rows: tables with fewer rows are kept as they are (in their original module form).
        steps: optimisation steps of the code learner (0: k-means codes only).
        batch_size: rows per step.
        lr: Adam learning rate of the codebooks and the encoder.
        popularity: ``"count"`` (default) weighs a row's reconstruction error by ``1 + count``
            (the expected error over the training accesses: best test AUC in
            benchmarks/compression.py); ``"log"`` by ``1 + ln(1 + count)`` (the paper's log
            weighting, keeping unseen rows in); ``"uniform"`` weighs every row 1.
        commitment_weight: weight of ``||z - sg(c)||^2`` (VQ-VAE commitment: keeps the encoder
            output near its codeword).
        balance_weight: weight of the code-usage term ``log K - H(mean soft assignment)``.
        contrastive_weight: weight of the InfoNCE term against rows re-coded with a *different*
            random code in one sub-space.
        num_negatives: negatives per row of the contrastive term.
        temperature: softness of the assignments in the balance / contrastive terms, relative
            to the sub-space's mean squared distance.
        kmeans_iters: Lloyd iterations of the (popularity-weighted) k-means initialisation.
        init: ``"kmeans"`` or ``"random"`` (Gaussian codewords; for tests and ablations).
        refit: after learning, run Lloyd iterations on the rows themselves (nearest codeword,
            weighted mean) and serve nearest-codeword codes; ``False`` keeps the encoder's codes
            and the learned codebooks.
        seed: every random draw of the learner derives from it.

    Example::

        cfg = MECConfig(num_subspaces=4, codebook_size=256, min_rows=100_000)
    """

    num_subspaces: int = 4
    codebook_size: int = 256
    min_rows: int = 10_000
    steps: int = 200
    batch_size: int = 1024
    lr: float = 5e-3
    popularity: str = "count"
    commitment_weight: float = 0.25
    balance_weight: float = 0.1
    contrastive_weight: float = 0.05
    num_negatives: int = 8
    temperature: float = 0.5
    kmeans_iters: int = 10
    init: str = "kmeans"
    refit: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.num_subspaces, int) or self.num_subspaces < 1:
            raise ValueError(
                f"MECConfig.num_subspaces={self.num_subspaces!r} must be an int >= 1 dividing the table dims"
            )
        if not isinstance(self.codebook_size, int) or not _power_of_two(self.codebook_size):
            raise ValueError(
                f"MECConfig.codebook_size={self.codebook_size!r} must be a power of two > 1 (e.g. 256); "
                "codes are stored in whole bits"
            )
        if self.codebook_size > 65536:
            raise ValueError(
                f"MECConfig.codebook_size={self.codebook_size} exceeds 65536 (uint16 codes); use fewer "
                "codewords or more sub-spaces"
            )
        for name in ("min_rows", "steps", "kmeans_iters"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"MECConfig.{name}={getattr(self, name)!r} must be an int >= 0")
        for name in ("batch_size", "num_negatives"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"MECConfig.{name}={getattr(self, name)!r} must be an int >= 1")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"MECConfig.lr={self.lr!r} must be finite and > 0")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"MECConfig.temperature={self.temperature!r} must be finite and > 0")
        for name in ("commitment_weight", "balance_weight", "contrastive_weight"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(
                    f"MECConfig.{name}={getattr(self, name)!r} must be finite and >= 0 (0 turns the term off)"
                )
        if self.popularity not in POPULARITY_WEIGHTINGS:
            raise ValueError(
                f"MECConfig.popularity={self.popularity!r} is not supported; allowed: {list(POPULARITY_WEIGHTINGS)}"
            )
        if self.init not in CODEBOOK_INITS:
            raise ValueError(
                f"MECConfig.init={self.init!r} is not supported; allowed: {list(CODEBOOK_INITS)}"
            )

    def check_dim(self, table: str, dim: int) -> None:
        """Raise ``ValueError`` if table ``table`` of dim ``dim`` cannot be split into L blocks."""
        if dim % self.num_subspaces != 0:
            divisors = [d for d in range(1, dim + 1) if dim % d == 0]
            raise ValueError(
                f"MECConfig.num_subspaces={self.num_subspaces} does not divide embedding_dim={dim} of table "
                f"{table!r}; choose one of {divisors} (or raise min_rows to keep that table uncompressed)"
            )
