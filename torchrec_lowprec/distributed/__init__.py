"""Sharding low-precision collections under TorchRec's DistributedModelParallel."""

from torchrec_lowprec.distributed.embedding_bag import ShardedLowPrecisionEmbeddingBagCollection
from torchrec_lowprec.distributed.embedding_collection import ShardedLowPrecisionEmbeddingCollection
from torchrec_lowprec.distributed.sharder import (
    LowPrecisionEmbeddingBagCollectionSharder,
    LowPrecisionEmbeddingCollectionSharder,
    sharders,
)

__all__ = [
    "LowPrecisionEmbeddingBagCollectionSharder",
    "LowPrecisionEmbeddingCollectionSharder",
    "ShardedLowPrecisionEmbeddingBagCollection",
    "ShardedLowPrecisionEmbeddingCollection",
    "sharders",
]
