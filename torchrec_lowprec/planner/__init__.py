"""Precision planning: bit widths that fit a memory budget, inside TorchRec's sharding plan.

* :func:`plan_precision` -> :class:`MemoryPlan` (precision plan + TorchRec ``ShardingPlan``).
* :class:`LowPrecisionStorageEstimator`: TorchRec storage estimator counting real bytes.
"""

from torchrec_lowprec.planner.plan_file import sharding_plan_from_dict, sharding_plan_to_dict
from torchrec_lowprec.planner.precision import (
    GiB,
    InfeasibleBudgetError,
    MemoryPlan,
    plan_precision,
    planned_bytes_per_rank,
    run_sharding_planner,
)
from torchrec_lowprec.planner.storage import LowPrecisionStorageEstimator, shard_bytes

__all__ = [
    "GiB",
    "InfeasibleBudgetError",
    "LowPrecisionStorageEstimator",
    "MemoryPlan",
    "plan_precision",
    "planned_bytes_per_rank",
    "run_sharding_planner",
    "shard_bytes",
    "sharding_plan_from_dict",
    "sharding_plan_to_dict",
]
