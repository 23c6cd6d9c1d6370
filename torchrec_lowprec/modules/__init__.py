"""Unsharded low-precision embedding modules (the layer ``distributed/`` shards)."""

from torchrec_lowprec._versions import check_versions

# Before torchrec loads FBGEMM's ops: a known-broken stack fails here naming the supported versions.
check_versions()

from torchrec_lowprec.modules.embedding_bag import LowPrecisionEmbeddingBagCollection  # noqa: E402
from torchrec_lowprec.modules.embedding_collection import LowPrecisionEmbeddingCollection  # noqa: E402
from torchrec_lowprec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection  # noqa: E402
from torchrec_lowprec.modules.mixed_precision_ec import MixedPrecisionEmbeddingCollection  # noqa: E402

__all__ = [
    "LowPrecisionEmbeddingBagCollection",
    "LowPrecisionEmbeddingCollection",
    "MixedPrecisionEmbeddingBagCollection",
    "MixedPrecisionEmbeddingCollection",
]
