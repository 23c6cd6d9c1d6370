"""Precision planning: bit widths that fit a memory budget, inside TorchRec's sharding plan.

* :func:`plan_precision` -> :class:`MemoryPlan` (precision plan + TorchRec ``ShardingPlan``).
* :class:`LowPrecisionStorageEstimator`: TorchRec storage estimator counting real bytes.
* :mod:`torchrec_lowprec.planner.schema`: the plan itself (:class:`PrecisionPlan`), plain data
  every layer reads.

Names resolve on first use (PEP 562): importing ``planner.schema`` from ``configs`` or
``modules/`` does not load TorchRec's planner or ``distributed/``.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "GiB": "torchrec_lowprec.planner.memory_plan",
    "InfeasibleBudgetError": "torchrec_lowprec.planner.precision",
    "MemoryPlan": "torchrec_lowprec.planner.memory_plan",
    "plan_precision": "torchrec_lowprec.planner.precision",
    "planned_bytes_per_rank": "torchrec_lowprec.planner.precision",
    "run_sharding_planner": "torchrec_lowprec.planner.precision",
    "LowPrecisionStorageEstimator": "torchrec_lowprec.planner.storage",
    "shard_bytes": "torchrec_lowprec.planner.storage",
    "sharding_plan_from_dict": "torchrec_lowprec.planner.plan_file",
    "sharding_plan_to_dict": "torchrec_lowprec.planner.plan_file",
    "PrecisionPlan": "torchrec_lowprec.planner.schema",
    "TablePrecision": "torchrec_lowprec.planner.schema",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torchrec_lowprec.planner' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
