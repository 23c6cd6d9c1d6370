"""Export a trained :class:`LowPrecisionEmbeddingCollection` to TorchRec's quantized inference
``EmbeddingCollection`` (``torchrec.quant.embedding_modules.EmbeddingCollection``).

TorchRec's module builds one FBGEMM ``IntNBitTableBatchedEmbeddingBagsCodegen``
(``PoolingMode.NONE``) per data type and takes our rows as they are (``quantized_weights``): the
served rows are the trained bytes, and with an fp32 output its lookups equal the trained
module's eval output bit for bit. Two things of its own need fixing up (TorchRec 1.8):

* it names each data-type group's outputs from that group's tables alone, so a feature read by
  two tables of *different* widths comes out as the bare feature name twice (one output
  overwriting the other) instead of ``feature@table``: the served module is given the names
  TorchRec's float collection (and ours) use;
* its output dict lists the groups one after another, so tables whose widths interleave
  (int8, int4, int8) come out in another key order: :class:`KeyOrderedEmbeddingCollection` puts
  it back (only where the order differs).
"""

# No ``from __future__ import annotations``: TorchScript reads the wrapper's forward annotations.
import itertools

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import get_embedding_names_by_table
from torchrec.quant.embedding_modules import EmbeddingCollection as QuantEmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_lowprec.export.rows import quantized_weights, served_tables
from torchrec_lowprec.kernels.lookup import row_alignment_for
from torchrec_lowprec.modules.embedding_collection import LowPrecisionEmbeddingCollection


class KeyOrderedEmbeddingCollection(nn.Module):
    """TorchRec's quantized ``EmbeddingCollection`` with its output dict in the trained key order.

    TorchRec's module groups tables by data type, so the outputs of interleaved widths
    (``t0`` int8, ``t1`` int4, ``t2`` int8) come out as ``t0, t2, t1``. Readers by key do not
    care; this wrapper keeps readers by position (iterating the dict) correct too. Used only
    where the order differs.

    Example::

        served = KeyOrderedEmbeddingCollection(quant_ec, ["a", "b", "c"])
        list(served(kjt)) == ["a", "b", "c"]
    """

    def __init__(self, collection: QuantEmbeddingCollection, keys: list[str]) -> None:
        super().__init__()
        self.collection = collection
        self._keys = list(keys)

    def embedding_configs(self) -> list[EmbeddingConfig]:
        return self.collection.embedding_configs()

    def need_indices(self) -> bool:
        return self.collection.need_indices()

    def embedding_dim(self) -> int:
        return self.collection.embedding_dim()

    def embedding_names_by_table(self) -> list[list[str]]:
        return self.collection.embedding_names_by_table()

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        out = self.collection(features)
        return {k: out[k] for k in self._keys}


def _name_outputs_as_trained(served: QuantEmbeddingCollection) -> None:
    """Give every data-type group of ``served`` the output names of the whole collection
    (``get_embedding_names_by_table`` over all its tables), not of the group alone."""
    tables = served.embedding_configs()
    names = dict(zip((t.name for t in tables), get_embedding_names_by_table(tables)))
    served._embedding_names_by_batched_tables = {
        key: list(itertools.chain.from_iterable(names[t.name] for t in group))
        for key, group in served._key_to_tables.items()
    }


def export_embedding_collection(
    ec: LowPrecisionEmbeddingCollection,
    output_dtype: torch.dtype = torch.float32,
    row_alignment: int | None = None,
    register_tbes: bool = False,
    keep_key_order: bool = True,
) -> nn.Module:
    """TorchRec's quantized inference ``EmbeddingCollection`` holding ``ec``'s trained rows
    byte for byte.

    Args:
        ec: a trained :class:`LowPrecisionEmbeddingCollection` (any mix of 32/16/8/4/2-bit
            tables; TorchRec's module, like ours, needs one ``embedding_dim`` for all).
        output_dtype: dtype of the embeddings (``float32`` reproduces the trained module's eval
            output exactly; ``float16`` rounds each value to fp16).
        row_alignment: FBGEMM row alignment; default 1 on CPU and 16 on CUDA, as the trained
            module (any value serves the same values).
        register_tbes: register FBGEMM's TBE modules as children (TorchRec's option).
        keep_key_order: when TorchRec's grouping by data type would reorder the output keys,
            wrap it in :class:`KeyOrderedEmbeddingCollection`; ``False`` returns TorchRec's
            module as is (same keys and values, grouped by width).

    Returns TorchRec's ``torchrec.quant.EmbeddingCollection`` (or the wrapper, see
    ``keep_key_order``), in eval mode. Its keys, values, lengths and (with ``need_indices``) ids
    are the trained module's. Ids out of range are not refused there: FBGEMM's inference bounds
    check logs an error and reads row 0 instead (the trained module raised, or with
    ``bounds_check="warn"/"ignore"`` gave a zero row), so check ids upstream when serving.

    Example::

        qec = export_embedding_collection(model.sequence_ec)
        out = qec(kjt)  # == model.sequence_ec.eval()(kjt): same keys, lengths, values
    """
    if not isinstance(ec, LowPrecisionEmbeddingCollection):
        raise TypeError(
            f"export_embedding_collection expects a LowPrecisionEmbeddingCollection, got {type(ec).__name__}"
            + (
                " (export_collection takes pooled collections)"
                if hasattr(ec, "embedding_bag_configs")
                else ""
            )
        )
    if output_dtype not in (torch.float32, torch.float16):
        raise ValueError(f"output_dtype={output_dtype} must be torch.float32 or torch.float16")
    tables = served_tables(ec, ec.embedding_configs())
    align = row_alignment if row_alignment is not None else row_alignment_for(ec.device)
    out = QuantEmbeddingCollection(
        tables,
        device=ec.device,
        need_indices=ec.need_indices(),
        output_dtype=output_dtype,
        table_name_to_quantized_weights=quantized_weights(ec),
        register_tbes=register_tbes,
        row_alignment=align,
    )
    _name_outputs_as_trained(out)
    out.train(False)
    keys = [n for names in ec.embedding_names_by_table() for n in names]
    served_keys = list(itertools.chain.from_iterable(out._embedding_names_by_batched_tables.values()))
    if keep_key_order and served_keys != keys:
        return KeyOrderedEmbeddingCollection(out, keys).train(False)
    return out
