"""Checkpoints of low-precision collections, sharded or not, through
``torch.distributed.checkpoint`` (DCP), validated before anything is loaded.

``save(model, path)`` writes every rank's shards; ``load(model, path)`` reads them back under
the model's current plan — another sharding plan, another world size, or one process
unsharded — after checking that every low-precision table of the checkpoint matches the
model's (names, rows, dims, bit widths, step-size mode, optimizer state, column split).
A mismatch raises ``ValueError`` naming the table and the field; nothing is loaded.
"""

from __future__ import annotations

import os

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from torchrec_lowprec.distributed.embedding_bag import ShardedLowPrecisionEmbeddingBagCollection
from torchrec_lowprec.distributed.state import TableMeta
from torchrec_lowprec.distributed.validate import validate_sharded_checkpoint
from torchrec_lowprec.modules.embedding_bag import LowPrecisionEmbeddingBagCollection

__all__ = ["load", "save", "validate_sharded_checkpoint"]


def _low_precision_modules(model: nn.Module) -> dict[str, nn.Module]:
    kinds = (ShardedLowPrecisionEmbeddingBagCollection, LowPrecisionEmbeddingBagCollection)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def _metas_of(module: nn.Module) -> dict[str, TableMeta]:
    if hasattr(module, "_lp_metas"):
        return module._lp_metas
    return {
        name: TableMeta(t["rows"], t["dim"], t["bits"], (0,), t["learn_step_size"], _opt(t["optimizer"]))
        for name, t in module.get_extra_state()["tables"].items()
    }


def _opt(value: str):
    from torchrec_lowprec.types import OptimizerType

    return OptimizerType(value)


def save(model: nn.Module, path: str) -> None:
    """Save ``model.state_dict()`` (sharded or not) to the directory ``path`` with DCP."""
    dcp.save(model.state_dict(), checkpoint_id=path)


def load(model: nn.Module, path: str) -> None:
    """Load a checkpoint written by :func:`save` into ``model`` under its current plan.

    Every low-precision table is checked against the checkpoint's metadata first; a mismatch
    raises ``ValueError`` (the same on every rank) and leaves the model untouched.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path!r}")
    state = model.state_dict()
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    for prefix_mod, module in _low_precision_modules(model).items():
        prefix = _state_prefix(model, prefix_mod)
        shapes = {k: tuple(v.size) for k, v in meta.items() if k.startswith(prefix) and hasattr(v, "size")}
        metas = _metas_of(module)
        for name, m in metas.items():
            for key, want in m.global_shapes().items():
                got = shapes.get(f"{prefix}tables.{name}.{key}")
                if got is None:
                    raise ValueError(
                        f"table {name!r}: the checkpoint at {path!r} has no entry tables.{name}.{key}"
                    )
                if got != tuple(want):
                    raise ValueError(
                        f"table {name!r}: checkpoint entry tables.{name}.{key} has shape {got}, the model "
                        f"expects {tuple(want)} (different rows, dim, bit width, optimizer or column split)"
                    )
    no_dist = not (dist.is_available() and dist.is_initialized())
    # DCP's default planner drops ShardedTensors a rank holds no shard of, then mistakes the
    # state dict for a pre-2.4 one and fails on `..._extra_state` ("Missing key"): that is any
    # TABLE_WISE plan where a rank lacks a table. Our ShardedTensors are not nested, which is
    # all flattening is for.
    planner = DefaultLoadPlanner(flatten_sharded_tensors=False)
    dcp.load(state, checkpoint_id=path, no_dist=no_dist, planner=planner)
    model.load_state_dict(state)


def _state_prefix(model: nn.Module, module_name: str) -> str:
    """The state-dict prefix of a submodule (DMP's wrappers add none of their own names)."""
    key = module_name
    for wrapper in ("_dmp_wrapped_module.", "module."):
        key = key.replace(wrapper, "")
    return key + "." if key else ""
