"""Export trained low-precision models to TorchRec's quantized inference modules (FBGEMM IntNBit).

Example::

    import torchrec_lowprec as lp
    served = lp.convert(trained_model, lp.InferenceConfig())  # LP collections -> torchrec.quant EBCs
"""

from torchrec_lowprec.export.inference import (
    DATA_TYPE_OF_BITS,
    KeyOrderedCollection,
    check_servable,
    export_collection,
    quantized_weights,
    to_inference,
)

__all__ = [
    "DATA_TYPE_OF_BITS",
    "check_servable",
    "KeyOrderedCollection",
    "export_collection",
    "quantized_weights",
    "to_inference",
]
