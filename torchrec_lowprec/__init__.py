"""torchrec-lowprec: train TorchRec embedding tables stored in int8/int4/int2.

Importing the package imports nothing heavy: the names below load torch/torchrec on first use
(PEP 562), so ``torchrec-lowprec --help`` runs where only the package is installed.

Example::

    import torchrec, torchrec_lowprec as lp
    ebc = lp.LowPrecisionEmbeddingBagCollection(tables, config=lp.LowPrecisionConfig(bits=8))
    model = lp.convert(model, lp.LowPrecisionConfig(bits=4))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_LAZY = {
    "LowPrecisionConfig": "torchrec_lowprec.types",
    "OptimizerType": "torchrec_lowprec.types",
    "LowPrecisionEmbeddingBagCollection": "torchrec_lowprec.modules",
    "convert": "torchrec_lowprec.modules",
    "from_float": "torchrec_lowprec.modules",
    "to_float": "torchrec_lowprec.modules",
    "sharders": "torchrec_lowprec.distributed",
}

__all__ = [
    "LowPrecisionConfig",
    "LowPrecisionEmbeddingBagCollection",
    "OptimizerType",
    "convert",
    "from_float",
    "sharders",
    "to_float",
]

if TYPE_CHECKING:  # pragma: no cover
    from torchrec_lowprec.distributed import sharders
    from torchrec_lowprec.modules import LowPrecisionEmbeddingBagCollection, convert, from_float, to_float
    from torchrec_lowprec.types import LowPrecisionConfig, OptimizerType


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torchrec_lowprec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return [*sorted(_LAZY), "__version__"]
