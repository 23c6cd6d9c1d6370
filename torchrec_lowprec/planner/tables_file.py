"""The inputs of ``torchrec-lowprec plan``, read and checked before any planning starts.

Every check raises ``ValueError`` with one line saying what is wrong and where (the CLI prints
it as ``error: ...`` and exits 2): a typo in ``tables.yaml`` or a flag must not turn into a
plan for a different model.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torchrec.modules.embedding_configs import (
    BaseEmbeddingConfig,
    EmbeddingBagConfig,
    EmbeddingConfig,
    PoolingType,
)

from torchrec_lowprec._yaml import excerpt, load_document
from torchrec_lowprec.planner.schema import PrecisionPlan

#: Keys a table entry may have (ours), and TorchRec's ``EmbeddingBagConfig`` names accepted as
#: aliases for them. Anything else is rejected: an unknown key would be silently ignored.
TABLE_KEYS = ("name", "rows", "dim", "features", "pooling")
TORCHREC_ALIASES = {"num_embeddings": "rows", "embedding_dim": "dim", "feature_names": "features"}
#: Largest ``--world-size`` the CLI takes. TorchRec's planner enumerates every rank for every
#: table and its cost grows with the world size (docs/precision.md: 145 s at 4096 ranks, over
#: 10 minutes at 8192); above this the command would appear to hang.
MAX_WORLD_SIZE = 4096
#: Bounds of a tables file, checked before any work (the file itself is read by
#: :func:`torchrec_lowprec._yaml.load_document`: at most 4 MiB, no YAML aliases).
MAX_TABLES = 10_000
MAX_FEATURES = 1_000  # per table
MAX_ROWS = 1 << 40
MAX_DIM = 1 << 16


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _table(path: str, i: int, t: object) -> BaseEmbeddingConfig:
    where = f"{path}: table #{i}"
    if not isinstance(t, dict):
        raise ValueError(f"{where} is not a mapping (name: ..., rows: ..., dim: ...)")
    entry: dict[str, Any] = {}
    for key, value in t.items():
        canonical = TORCHREC_ALIASES.get(key, key)
        if canonical not in TABLE_KEYS:
            raise ValueError(
                f"{where} has unknown key {excerpt(key)}; allowed: {list(TABLE_KEYS)} (or TorchRec's "
                f"{list(TORCHREC_ALIASES)})"
            )
        if canonical in entry:
            raise ValueError(f"{where} gives {canonical!r} twice (as {canonical!r} and its TorchRec alias)")
        entry[canonical] = value
    missing = [k for k in ("name", "rows", "dim") if k not in entry]
    if missing:
        raise ValueError(
            f"{where} needs name, rows, dim (and optionally features, pooling): {missing} missing"
        )
    name = entry.get("name")
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{where}: name must be a non-empty string without '.', got {excerpt(name)}")
    where = f"{path}: table {excerpt(name)}"
    for key, top in (("rows", MAX_ROWS), ("dim", MAX_DIM)):
        v = entry.get(key)
        if not _is_int(v) or v <= 0:
            raise ValueError(f"{where}: {key} must be a whole number > 0, got {excerpt(v)}")
        if v > top:
            raise ValueError(f"{where}: {key} must be a whole number in [1, {top}], got {excerpt(v)}")
    feats = entry.get("features", [name])
    if isinstance(feats, list) and len(feats) > MAX_FEATURES:
        raise ValueError(f"{where}: features lists {len(feats)} features; at most {MAX_FEATURES}")
    # A string is refused rather than read as one feature: `features: a, b` would become the
    # single feature "a, b" and silently match nothing in --frequencies.
    if not isinstance(feats, list) or not feats or not all(isinstance(f, str) and f for f in feats):
        raise ValueError(
            f"{where}: features must be a non-empty list of names, e.g. [user_id]; got {excerpt(feats)}"
        )
    dup = sorted(f for f, n in Counter(feats).items() if n > 1)
    if dup:
        raise ValueError(f"{where}: features {excerpt(feats)} name a feature twice ({excerpt(dup)})")
    pooling = entry.get("pooling", "sum")
    if not isinstance(pooling, str) or pooling.upper() not in ("SUM", "MEAN", "NONE"):
        raise ValueError(
            f"{where}: pooling must be sum, mean or none (an EmbeddingCollection's table), got {excerpt(pooling)}"
        )
    if pooling.upper() == "NONE":
        return EmbeddingConfig(
            name=name, num_embeddings=entry["rows"], embedding_dim=entry["dim"], feature_names=list(feats)
        )
    return EmbeddingBagConfig(
        name=name,
        num_embeddings=entry["rows"],
        embedding_dim=entry["dim"],
        feature_names=list(feats),
        pooling=PoolingType[pooling.upper()],
    )


def read_tables(path: str) -> list[BaseEmbeddingConfig]:
    """Table configs from a YAML/JSON file (format in ``torchrec-lowprec plan --help``):
    ``EmbeddingBagConfig`` s, and ``EmbeddingConfig`` s for ``pooling: none`` (sequence tables).

    Example::

        tables = read_tables("tables.yaml")  # [{name: t_user, rows: 1000000, dim: 64}, ...]
    """
    doc = load_document(path, "tables file")  # YAML is a superset of JSON
    if isinstance(doc, dict) and set(doc) != {"tables"}:
        raise ValueError(
            f"{path}: the top level must be a list of tables or only a 'tables:' key, got {excerpt(list(doc))}"
        )
    items = doc.get("tables") if isinstance(doc, dict) else doc
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty list of tables (or a 'tables:' key holding one)")
    if len(items) > MAX_TABLES:
        raise ValueError(f"{path}: the file lists {len(items)} tables; at most {MAX_TABLES}")
    out = [_table(path, i, t) for i, t in enumerate(items)]
    dup = sorted(n for n, k in Counter(t.name for t in out).items() if k > 1)
    if dup:
        raise ValueError(f"{path}: duplicate table names {excerpt(dup)}")
    dup = sorted(f for f, k in Counter(f for t in out for f in t.feature_names).items() if k > 1)
    if dup:
        raise ValueError(
            f"{path}: feature(s) {excerpt(dup)} are read by two tables; give each table its own features"
        )
    return out


def check_frequencies(
    counts: Mapping[str, object], tables: list[BaseEmbeddingConfig], source: str
) -> dict[str, torch.Tensor]:
    """``counts`` if every entry is a 1-D tensor of whole counts >= 0 for a feature of
    ``tables`` with one count per row of its table; else ``ValueError`` naming the feature."""
    rows = {f: t.num_embeddings for t in tables for f in t.feature_names}
    unknown = sorted(set(counts) - set(rows))
    if unknown:
        raise ValueError(
            f"{source} has counts for feature(s) {unknown} that no table reads (tables read {sorted(rows)}); "
            "check the features: lists of the tables file"
        )
    out = {}
    for f, c in counts.items():
        if not isinstance(c, torch.Tensor) or c.dim() != 1:
            raise ValueError(
                f"{source}: counts of feature {f!r} must be a 1-D tensor, got {type(c).__name__}"
            )
        if c.is_floating_point() or c.is_complex() or c.dtype == torch.bool:
            raise ValueError(f"{source}: counts of feature {f!r} must be integers, got {c.dtype}")
        if c.numel() != rows[f]:
            raise ValueError(
                f"{source}: feature {f!r} has {c.numel()} counts but its table has {rows[f]} rows"
            )
        if c.numel() and int(c.min()) < 0:
            raise ValueError(f"{source}: feature {f!r} has a negative count ({int(c.min())})")
        out[f] = c
    return out


def check_precision_plan(
    plan: PrecisionPlan, tables: list[BaseEmbeddingConfig], source: str
) -> PrecisionPlan:
    """``plan`` if it names only tables of ``tables``; else ``ValueError`` naming the others."""
    names = [t.name for t in tables]
    unknown = sorted(set(plan.tables) - set(names))
    if unknown:
        raise ValueError(
            f"{source} plans table(s) {unknown} that the tables file lacks (it has {names}); "
            "a plan for another model would be ignored"
        )
    return plan


def check_plan_args(
    world_size: int, hbm_gb: float | None, batch_size: int, reserved_fraction: float, groups: int, out: str
) -> None:
    """The numeric flags and ``--out`` of ``torchrec-lowprec plan`` (``ValueError`` naming the flag)."""
    if not 1 <= world_size <= MAX_WORLD_SIZE:
        raise ValueError(
            f"--world-size must be in [1, {MAX_WORLD_SIZE}], got {world_size} (TorchRec's planner takes "
            "minutes beyond that; call torchrec_lowprec.planner.plan_precision directly to plan a larger job)"
        )
    if hbm_gb is None or not 0 < hbm_gb < math.inf:
        raise ValueError(f"--hbm-gb must be a finite number > 0 (GiB per rank), got {hbm_gb}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if not 0 <= reserved_fraction < 1:
        raise ValueError(f"--reserved-fraction must be in [0, 1), got {reserved_fraction}")
    if groups < 1:
        raise ValueError(f"--groups must be >= 1, got {groups}")
    if os.path.isdir(out):
        raise ValueError(
            f"--out {out} is a directory; give a file path, e.g. {os.path.join(out, 'plan.json')}"
        )
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out}: directory {parent} does not exist")
