"""Export trained low-precision collections to TorchRec's quantized inference collections.

A :class:`LowPrecisionEmbeddingBagCollection` or :class:`LowPrecisionEmbeddingCollection`
already stores its tables in FBGEMM's IntNBit row layout (fp16 scale + fp16 bias at the front,
then packed codes). TorchRec's inference collections
(``torchrec.quant.embedding_modules.EmbeddingBagCollection`` / ``EmbeddingCollection``) build
an ``IntNBitTableBatchedEmbeddingBagsCodegen`` per pooling mode (EBC) or per data type (EC,
``PoolingMode.NONE``) and accept, per table, the ``(codes, scale_bias)`` pair of every row. We
hand them our bytes unchanged, so no value is re-quantized: the served table is the trained
table bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_lowprec._deprecation import warn_deprecated
from torchrec_lowprec.configs import InferenceConfig
from torchrec_lowprec.export.rows import DATA_TYPE_OF_BITS, check_servable, quantized_weights, served_tables
from torchrec_lowprec.export.sequence import export_embedding_collection
from torchrec_lowprec.kernels.lookup import row_alignment_for
from torchrec_lowprec.modules.embedding_bag import LowPrecisionEmbeddingBagCollection
from torchrec_lowprec.modules.embedding_collection import LowPrecisionEmbeddingCollection
from torchrec_lowprec.transform import convert, register_transform

__all__ = [
    "DATA_TYPE_OF_BITS",
    "KeyOrderedCollection",
    "check_servable",
    "export_collection",
    "export_embedding_collection",
    "quantized_weights",
    "served_tables",
    "to_inference",
]


class KeyOrderedCollection(nn.Module):
    """TorchRec's inference collection with its output put back in the trained key order.

    TorchRec's quantized collection groups tables by pooling mode, so a collection whose SUM
    and MEAN tables interleave (``t0`` SUM, ``t1`` MEAN, ``t2`` SUM) would list ``t2``'s
    features before ``t1``'s. Models that read the ``KeyedTensor`` by key (TorchRec's DLRM uses
    ``to_dict()``) do not care; this wrapper keeps positional readers correct too. It is only
    used when the order actually differs.

    Example::

        served = KeyOrderedCollection(quant_ebc, keys, lengths)
        served(kjt).keys() == keys
    """

    def __init__(self, collection: QuantEmbeddingBagCollection, keys: list[str], lengths: list[int]) -> None:
        super().__init__()
        self.collection = collection
        self._keys = list(keys)
        self._lengths = list(lengths)
        src_keys = collection._embedding_names
        src_lengths = collection._length_per_key
        starts = dict(zip(src_keys, torch.tensor([0] + src_lengths).cumsum(0).tolist()))
        cols = [torch.arange(starts[k], starts[k] + n) for k, n in zip(self._keys, self._lengths)]
        self.register_buffer("_cols", torch.cat(cols), persistent=False)

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self.collection.embedding_bag_configs()

    def is_weighted(self) -> bool:
        return self.collection.is_weighted()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        out = self.collection(features)
        return KeyedTensor(
            keys=self._keys, length_per_key=self._lengths, values=out.values().index_select(1, self._cols)
        )


def export_collection(
    ebc: LowPrecisionEmbeddingBagCollection,
    output_dtype: torch.dtype = torch.float32,
    row_alignment: int | None = None,
    register_tbes: bool = False,
    keep_key_order: bool = True,
) -> nn.Module:
    """TorchRec's quantized inference collection holding ``ebc``'s trained rows byte for byte.

    Args:
        ebc: a trained low-precision collection (any mix of 32/16/8/4/2-bit tables).
        output_dtype: dtype of the pooled output (``float32`` reproduces the trained module's
            eval output exactly; ``float16`` halves the output bytes).
        row_alignment: FBGEMM row alignment; default 1 on CPU and 16 on CUDA, as the trained
            module (TorchRec's own default is 16 everywhere; any value serves the same values).
        register_tbes: register FBGEMM's TBE modules as children (TorchRec's option; needed by
            ``torchrec.inference.modules.get_table_to_weights_from_tbe`` and fx ``call_module``).
        keep_key_order: when TorchRec's grouping by pooling mode would reorder the output keys
            (SUM and MEAN tables interleaved), wrap the collection in
            :class:`KeyOrderedCollection`; ``False`` returns TorchRec's collection as is.

    Returns TorchRec's ``QuantEmbeddingBagCollection`` (or the wrapper, see ``keep_key_order``).

    Example::

        qebc = export_collection(model.sparse_arch.embedding_bag_collection)
        pooled = qebc(kjt)  # == the trained collection's eval output
    """
    if not isinstance(ebc, LowPrecisionEmbeddingBagCollection):
        hint = (
            " (export_embedding_collection takes a LowPrecisionEmbeddingCollection)"
            if isinstance(ebc, LowPrecisionEmbeddingCollection)
            else ""
        )
        raise TypeError(
            f"export_collection expects a LowPrecisionEmbeddingBagCollection, got {type(ebc).__name__}{hint}"
        )
    tables = served_tables(ebc, ebc.embedding_bag_configs())
    device = ebc.device
    weights = quantized_weights(ebc)
    align = row_alignment if row_alignment is not None else row_alignment_for(device)
    out = QuantEmbeddingBagCollection(
        tables,
        is_weighted=ebc.is_weighted(),
        device=device,
        output_dtype=output_dtype,
        table_name_to_quantized_weights=weights,
        row_alignment=align,
        register_tbes=register_tbes,
    )
    out.train(False)
    keys = [f for t in ebc.embedding_bag_configs() for f in t.feature_names]
    if keep_key_order and out._embedding_names != keys:
        lengths = [t.embedding_dim for t in ebc.embedding_bag_configs() for _ in t.feature_names]
        return KeyOrderedCollection(out, keys, lengths).train(False)
    return out


def _is_low_precision(module: nn.Module) -> bool:
    return isinstance(module, (LowPrecisionEmbeddingBagCollection, LowPrecisionEmbeddingCollection))


def _to_eval(model: nn.Module, config: InferenceConfig) -> None:
    model.eval()


@register_transform(
    InferenceConfig,
    is_target=_is_low_precision,
    targets=(
        "LowPrecisionEmbeddingBagCollection or LowPrecisionEmbeddingCollection (convert its "
        "EmbeddingBagCollections / EmbeddingCollections and train first)"
    ),
    if_none="raise",
    finish=_to_eval,
)
def _to_quantized(
    ebc: LowPrecisionEmbeddingBagCollection | LowPrecisionEmbeddingCollection,
    config: InferenceConfig,
    fqn: str,
) -> nn.Module:
    dtype = getattr(torch, config.output_dtype) if config.output_dtype is not None else torch.float32
    if isinstance(ebc, LowPrecisionEmbeddingCollection):
        return export_embedding_collection(ebc, dtype, config.row_alignment, config.register_tbes)
    return export_collection(ebc, dtype, config.row_alignment, config.register_tbes)


def to_inference(
    model: nn.Module,
    output_dtype: torch.dtype = torch.float32,
    row_alignment: int | None = None,
    register_tbes: bool = False,
) -> nn.Module:
    """Deprecated (removed in 0.2): ``convert(model, InferenceConfig(...))``.

    Replaces every
    :class:`LowPrecisionEmbeddingBagCollection` in ``model`` (at any depth, in place) by
    TorchRec's quantized inference ``EmbeddingBagCollection`` with the same bytes.

    Returns ``model`` put in eval mode (or the new collection when ``model`` itself is one).
    Parents are kept: a wrapper holding a low-precision collection as a child keeps working as
    long as it only calls the child's ``forward`` (KJT -> KeyedTensor, same keys and order).

    Example::

        model = lp.convert(DLRM(...), lp.LowPrecisionConfig(bits=4))
        ...  # train
        served = lp.convert(model, lp.InferenceConfig())
        logits = served(dense, kjt)
    """
    warn_deprecated("to_inference(model, ...)", "convert(model, InferenceConfig(...))")
    return convert(model, InferenceConfig(output_dtype, row_alignment, register_tbes))
