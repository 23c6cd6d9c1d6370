"""Unsharded low-precision embedding modules (the layer ``distributed/`` shards)."""

from torchrec_lowprec.modules.convert import convert, from_float, to_float
from torchrec_lowprec.modules.embedding_bag import LowPrecisionEmbeddingBagCollection
from torchrec_lowprec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection

__all__ = [
    "LowPrecisionEmbeddingBagCollection",
    "MixedPrecisionEmbeddingBagCollection",
    "convert",
    "from_float",
    "to_float",
]
