"""Checking a checkpoint's low-precision tables against a sharded collection, before loading.

Imported by ``distributed/sharded_base.py`` (the sharded EBC and EC validate what they load) and
re-exported by ``distributed/checkpoint.py``; it imports neither, so the two never import each
other.
"""

from __future__ import annotations

import torch

from torchrec_lowprec.distributed.state import TableMeta
from torchrec_lowprec.modules.checkpoint import partial_message


def validate_sharded_checkpoint(metas: dict[str, TableMeta], state_dict: dict, prefix: str) -> list[str]:
    """Raise ``ValueError`` if ``state_dict`` (entries under ``prefix``) does not fit ``metas``:
    a table's metadata or an entry's shape differs, or some entries are there and others are
    missing (a collection loads all or nothing). Returns the missing keys (all of them, or none)."""
    extra = state_dict.get(prefix + "_extra_state")
    if isinstance(extra, dict) and "tables" in extra:
        _compare_tables(extra["tables"], metas)
    want = [f"{prefix}tables.{n}.{k}" for n, m in sorted(metas.items()) for k in m.global_shapes()]
    want.append(prefix + "step")
    missing = [k for k in want if k not in state_dict]
    if missing and len(missing) < len(want):
        raise ValueError(partial_message(missing))
    for name, meta in metas.items():
        for key, shape in meta.global_shapes().items():
            t = state_dict.get(f"{prefix}tables.{name}.{key}")
            if isinstance(t, torch.Tensor) and tuple(t.shape) != tuple(shape):
                raise ValueError(
                    f"table {name!r}: checkpoint entry tables.{name}.{key} has shape {tuple(t.shape)}, "
                    f"expected {tuple(shape)} (different rows, dim, bit width, optimizer or column split)"
                )
    return missing


def _compare_tables(theirs: dict, metas: dict[str, TableMeta]) -> None:
    if set(theirs) != set(metas):
        raise ValueError(
            f"checkpoint tables {sorted(theirs)} do not match the model's {sorted(metas)} "
            f"(missing: {sorted(set(metas) - set(theirs))}, extra: {sorted(set(theirs) - set(metas))})"
        )
    for name, m in metas.items():
        mine = {"rows": m.rows, "dim": m.dim, "bits": m.bits, "learn_step_size": m.learn_step_size}
        for field, value in mine.items():
            if theirs[name].get(field) != value:
                raise ValueError(
                    f"table {name!r}: checkpoint has {field}={theirs[name].get(field)} but the model has "
                    f"{field}={value}; rebuild the model with the checkpoint's configuration"
                )
        cols = theirs[name].get("column_shards", [0])
        if list(cols) != list(m.col_starts):
            raise ValueError(
                f"table {name!r}: checkpoint was column-sharded at columns {list(cols)} but the model's plan "
                f"splits it at {list(m.col_starts)}; column shards keep one step size per shard: load it "
                "with torchrec_lowprec.distributed.checkpoint.load, which re-quantizes per block"
            )
