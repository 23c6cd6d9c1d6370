"""Sharding low-precision collections under TorchRec's DistributedModelParallel."""

from torchrec_lowprec.distributed.embedding_bag import ShardedLowPrecisionEmbeddingBagCollection
from torchrec_lowprec.distributed.sharder import LowPrecisionEmbeddingBagCollectionSharder, sharders

__all__ = [
    "LowPrecisionEmbeddingBagCollectionSharder",
    "ShardedLowPrecisionEmbeddingBagCollection",
    "sharders",
]
