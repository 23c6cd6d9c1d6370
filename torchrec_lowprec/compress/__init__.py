"""MEC: compress trained embedding tables into product-quantization codes and codebooks.

Example::

    from torchrec_lowprec import CodebookConfig, convert
    counts = count_frequencies(data.batches("train", 8192), data.vocab_sizes)
    convert(model, CodebookConfig(num_subspaces=4, codebook_size=256, min_rows=100_000), frequencies=counts)
"""

from torchrec_lowprec.compress.api import (
    codebook_parameters,
    compress_,
    compress_collection,
    finetune_codebooks,
)
from torchrec_lowprec.compress.codebook_ebc import (
    CodebookEmbeddingBagCollection,
    CodebookTable,
    codebook_table,
)
from torchrec_lowprec.compress.pq import PQResult, code_entropy, learn_pq, popularity_weights, reconstruct
from torchrec_lowprec.configs import CodebookConfig

__all__ = [
    "CodebookEmbeddingBagCollection",
    "CodebookTable",
    "CodebookConfig",
    "PQResult",
    "code_entropy",
    "codebook_parameters",
    "codebook_table",
    "compress_",
    "compress_collection",
    "finetune_codebooks",
    "learn_pq",
    "popularity_weights",
    "reconstruct",
]
