"""Criteo Kaggle / Criteo 1TB click logs: one :class:`TabularSchema` of the generic reader.

A row is ``label, I1..I13 (integers), C1..C26 (hashed hex strings)``, tab-separated, any
field but the label may be empty. The papers' preprocessing, chosen by ``int_features``:

* ``"dense"`` (default, as DLRM): the integers are the dense features, ``log(1 + max(x, 0))``
  (an empty field is 0);
* ``"categorical"``: each integer becomes a categorical feature with value
  ``floor(ln(x)**2)`` for ``x > 2``, else ``x``, which then goes through the vocabulary.

Categorical values seen fewer than ``min_count`` times in the training split share id 0.
Feature names are TorchRec's (``int_0..int_12``, ``cat_0..cat_25``). For the 1TB logs pass
the day files in order (``day_0 .. day_23``) and ``split="chronological"`` for the
time-ordered split. Kaggle's unlabeled ``test.txt`` (39 columns) is not supported: its rows
would all be malformed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES, DEFAULT_LABEL_NAME

from .schema import TabularSchema, log1p_clamped, log_squared_bucket
from .tabular import TabularDataset

CRITEO_NUM_INT = len(DEFAULT_INT_NAMES)
CRITEO_NUM_CAT = len(DEFAULT_CAT_NAMES)


def criteo_schema(int_features: str = "dense") -> TabularSchema:
    """The Criteo TSV layout: 40 tab-separated columns, no header."""
    return TabularSchema(
        label=DEFAULT_LABEL_NAME,
        dense=tuple(DEFAULT_INT_NAMES),
        categorical=tuple(DEFAULT_CAT_NAMES),
        delimiter="\t",
        header=False,
        columns=(DEFAULT_LABEL_NAME, *DEFAULT_INT_NAMES, *DEFAULT_CAT_NAMES),
        int_features=int_features,
        dense_parse="int",
        name="criteo",
    )


def criteo_int_to_dense(x: np.ndarray) -> np.ndarray:
    """Dense value of Criteo integers: ``log(1 + max(x, 0))`` (float64)."""
    return log1p_clamped(x)


def criteo_int_to_bucket(x: np.ndarray) -> np.ndarray:
    """Categorical value of Criteo integers: ``floor(ln(x)**2)`` if ``x > 2`` else ``x`` (int64)."""
    return np.array([log_squared_bucket(float(v)) for v in np.ravel(x)], dtype=np.int64).reshape(np.shape(x))


class CriteoDataset(TabularDataset):
    """Criteo TSV files as TorchRec batches (see :class:`TabularDataset` for the passes and splits).

    Example::

        data = CriteoDataset("train.txt", min_count=4, seed=0)   # random 8:1:1 split
        data.save_vocabulary("criteo_vocab.json")
        val = CriteoDataset("train.txt", vocabulary="criteo_vocab.json", seed=0)
        for batch in val.batches("val", batch_size=8192):
            ...  # dense [B, 13], KJT with cat_0..cat_25, labels [B]
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        int_features: str = "dense",
        **options: Any,
    ) -> None:
        """``int_features``: see :func:`criteo_schema`; ``options``: the keyword arguments of
        :class:`TabularDataset` (``min_count``, ``split``, ``fractions``, ``seed``, ``strict``,
        ``vocabulary``, ``max_warnings``, ``workers``, ``segment_bytes``, ``max_line_bytes``)."""
        super().__init__(paths, criteo_schema(int_features), **options)
