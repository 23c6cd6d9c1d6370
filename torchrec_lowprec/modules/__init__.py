"""Unsharded low-precision embedding modules (the layer ``distributed/`` shards)."""

from torchrec_lowprec.modules.convert import convert, from_float, to_float
from torchrec_lowprec.modules.embedding_bag import LowPrecisionEmbeddingBagCollection

__all__ = ["LowPrecisionEmbeddingBagCollection", "convert", "from_float", "to_float"]
