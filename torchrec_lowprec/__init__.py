"""torchrec-lowprec: train TorchRec embedding tables stored in int8/int4/int2.

Example::

    import torchrec, torchrec_lowprec as lp
    ebc = lp.LowPrecisionEmbeddingBagCollection(tables, config=lp.LowPrecisionConfig(bits=8))
    model = lp.convert(model, lp.LowPrecisionConfig(bits=4))
"""

from torchrec_lowprec.distributed import sharders
from torchrec_lowprec.modules import LowPrecisionEmbeddingBagCollection, convert, from_float, to_float
from torchrec_lowprec.types import LowPrecisionConfig, OptimizerType

__version__ = "0.1.0"

__all__ = [
    "LowPrecisionConfig",
    "LowPrecisionEmbeddingBagCollection",
    "OptimizerType",
    "convert",
    "from_float",
    "sharders",
    "to_float",
]
