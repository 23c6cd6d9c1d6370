"""The rows an exported collection serves: TorchRec's ``(codes, scale_bias)`` views of our
packed rows and the served table configs (one home for both exports: pooled and sequence)."""

from __future__ import annotations

import dataclasses

import torch
from torchrec.modules.embedding_configs import BaseEmbeddingConfig

from torchrec_lowprec.modules.collection_base import LowPrecisionTables
from torchrec_lowprec.modules.data_type import DATA_TYPE_OF_BITS
from torchrec_lowprec.quant.layout import SCALE_BIAS_BYTES
from torchrec_lowprec.types import INT_BITS

__all__ = ["DATA_TYPE_OF_BITS", "check_servable", "quantized_weights", "served_tables"]


def check_servable(name: str, bits: int, dim: int) -> None:
    """Refuse a table FBGEMM's IntNBit inference module cannot take (it asserts byte-packed
    8/4/2-bit rows; our rule, dim % 4 == 0, is the one the training module enforces)."""
    if bits not in DATA_TYPE_OF_BITS:
        raise ValueError(
            f"table {name!r}: bits={bits} has no FBGEMM inference type {sorted(DATA_TYPE_OF_BITS)}"
        )
    if bits in INT_BITS and dim % 4 != 0:
        raise ValueError(
            f"table {name!r}: embedding_dim={dim} at {bits} bits cannot be served by FBGEMM's IntNBit "
            "kernels (the dim of an 8/4/2-bit table must be a multiple of 4); retrain that table at "
            "bits=16/32 or with a dim divisible by 4"
        )


def quantized_weights(module: LowPrecisionTables) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Table name -> ``(codes, scale_bias)`` uint8 views of a low-precision collection's rows
    (:class:`LowPrecisionEmbeddingBagCollection` or :class:`LowPrecisionEmbeddingCollection`),
    in the form TorchRec's inference modules take (``table_name_to_quantized_weights``,
    ``assign_weights_to_tbe``); ``scale_bias`` is ``None`` for fp32/fp16 tables.

    Example::

        assign_weights_to_tbe(sharded_model, quantized_weights(lp_ebc))
    """
    out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for name in module.tables:
        bits = module.table_config(name).bits
        rows = module.quantized_weight(name).detach()
        if bits in INT_BITS:
            # Our row: [scale fp16][bias fp16][codes]. TorchRec wants (codes, scale_bias) and
            # writes scale_bias back in front of the codes (FBGEMM's default, reverse_qparam=False).
            out[name] = (rows[:, SCALE_BIAS_BYTES:], rows[:, :SCALE_BIAS_BYTES])
        else:
            out[name] = (rows, None)
    return out


def served_tables(module: LowPrecisionTables, tables: list[BaseEmbeddingConfig]) -> list[BaseEmbeddingConfig]:
    """``tables`` (the collection's configs) with ``data_type`` set to each table's stored width,
    after :func:`check_servable`; refuses a collection on the meta device (it holds no rows).

    Example::

        served_tables(lp_ec, lp_ec.embedding_configs())[0].data_type  # DataType.INT4
    """
    if module.device.type == "meta":
        raise ValueError("cannot export a collection on the meta device: it holds no trained rows")
    out = []
    for t in tables:
        bits = module.table_config(t.name).bits
        check_servable(t.name, bits, t.embedding_dim)
        out.append(dataclasses.replace(t, data_type=DATA_TYPE_OF_BITS[bits]))
    return out
