"""torchrec-lowprec: train TorchRec embedding tables stored in int8/int4/int2.

Importing the package imports neither torch nor torchrec: the public names below resolve on
first use (PEP 562), so ``torchrec-lowprec --help`` and ``import torchrec_lowprec.quant`` stay
light, and ``lp.sharders`` pulls in ``torchrec.distributed`` only when called for.

Example::

    import torchrec, torchrec_lowprec as lp
    ebc = lp.LowPrecisionEmbeddingBagCollection(tables, config=lp.LowPrecisionConfig(bits=8))
    model = lp.convert(model, lp.LowPrecisionConfig(bits=4))
"""

from __future__ import annotations

import importlib
from typing import Any

from torchrec_lowprec._deprecation import warn_deprecated

__version__ = "0.1.0"

#: Public name -> the module defining it (imported on first access). docs/design.md lists
#: the same names (tests/test_public_api.py checks both).
_LAZY = {
    "CodebookConfig": "torchrec_lowprec.configs",
    "InferenceConfig": "torchrec_lowprec.configs",
    "LowPrecisionConfig": "torchrec_lowprec.configs",
    "MixedPrecisionConfig": "torchrec_lowprec.configs",
    "MPESearchConfig": "torchrec_lowprec.configs",
    "PerTableConfig": "torchrec_lowprec.configs",
    "OptimizerType": "torchrec_lowprec.types",
    "PrecisionPlan": "torchrec_lowprec.planner.schema",
    "TablePrecision": "torchrec_lowprec.planner.schema",
    "LowPrecisionEmbeddingBagCollection": "torchrec_lowprec.modules.embedding_bag",
    "LowPrecisionEmbeddingCollection": "torchrec_lowprec.modules.embedding_collection",
    "MixedPrecisionEmbeddingBagCollection": "torchrec_lowprec.modules.mixed_precision",
    "MixedPrecisionEmbeddingCollection": "torchrec_lowprec.modules.mixed_precision_ec",
    "convert": "torchrec_lowprec.transform",
    "register_transform": "torchrec_lowprec.transform",
    "sharders": "torchrec_lowprec.distributed.sharder",
}

#: Old root names, kept one release with a DeprecationWarning: name -> (module, replacement).
_DEPRECATED = {
    "from_float": ("torchrec_lowprec.modules.convert", "torchrec_lowprec.convert(model, config, filter_fn)"),
    "to_float": ("torchrec_lowprec.modules.convert", "torchrec_lowprec.modules.convert.to_float"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        module, instead = _DEPRECATED[name]
        warn_deprecated(f"torchrec_lowprec.{name}", instead)
        return getattr(importlib.import_module(module), name)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torchrec_lowprec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
