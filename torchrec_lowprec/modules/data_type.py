"""TorchRec's ``EmbeddingBagConfig.data_type`` as a low-precision table's width, and back."""

from __future__ import annotations

import dataclasses

from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig

from torchrec_lowprec.configs import LowPrecisionConfig
from torchrec_lowprec.types import FORMATS

#: Storage width of each TorchRec data type a low-precision table can hold (``types.FORMATS``).
BITS_OF_DATA_TYPE = {DataType[f.data_type]: b for b, f in FORMATS.items() if f.trainable and f.data_type}
DATA_TYPE_OF_BITS = {b: d for d, b in BITS_OF_DATA_TYPE.items()}


def config_from_data_type(table: EmbeddingBagConfig) -> LowPrecisionConfig:
    """The default :class:`LowPrecisionConfig` at the width ``table.data_type`` names.

    Example::

        config_from_data_type(EmbeddingBagConfig(..., data_type=DataType.INT4)).bits  # 4
    """
    bits = BITS_OF_DATA_TYPE.get(table.data_type)
    if bits is None:
        raise ValueError(
            f"table {table.name!r}: data_type {table.data_type} cannot be stored by a low-precision table; "
            f"use one of {[d.name for d in BITS_OF_DATA_TYPE]} or pass a LowPrecisionConfig"
        )
    return LowPrecisionConfig(bits=bits)


def with_data_type(table: EmbeddingBagConfig, bits: int) -> EmbeddingBagConfig:
    """``table`` with ``data_type`` matching the width it is stored at (a copy when it changes)."""
    want = DATA_TYPE_OF_BITS[bits]
    return table if table.data_type == want else dataclasses.replace(table, data_type=want)
