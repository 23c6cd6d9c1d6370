"""Export trained low-precision models to TorchRec's quantized inference modules (FBGEMM IntNBit).

Example::

    import torchrec_lowprec as lp
    served = lp.convert(trained_model, lp.InferenceConfig())  # LP collections -> torchrec.quant EBCs / ECs
"""

from torchrec_lowprec.export.inference import (
    DATA_TYPE_OF_BITS,
    KeyOrderedCollection,
    check_servable,
    export_collection,
    quantized_weights,
    served_tables,
    to_inference,
)
from torchrec_lowprec.export.sequence import KeyOrderedEmbeddingCollection, export_embedding_collection

__all__ = [
    "DATA_TYPE_OF_BITS",
    "check_servable",
    "KeyOrderedCollection",
    "KeyOrderedEmbeddingCollection",
    "export_collection",
    "export_embedding_collection",
    "quantized_weights",
    "served_tables",
    "to_inference",
]
