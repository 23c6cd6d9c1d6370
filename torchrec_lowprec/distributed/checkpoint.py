"""Checkpoints of low-precision collections, sharded or not, through
``torch.distributed.checkpoint`` (DCP), validated before anything is loaded.

``save(model, path)`` writes every rank's shards; ``load(model, path)`` reads them back under
the model's current plan — another sharding plan, another world size, or one process
unsharded — after checking that every low-precision table of the checkpoint matches the
model's (names, rows, dims, bit widths, step-size mode, optimizer state, column split).
A mismatch raises ``ValueError`` naming the table and the field; nothing is loaded.

Loading never runs code from the checkpoint: DCP's metadata is read with an unpickler that
admits only DCP's own metadata classes and torch sizes / dtypes, and every pickled non-tensor
entry (the collections' ``_extra_state``) with ``torch.load(weights_only=True)``. ``save``
writes a checksum manifest (:mod:`torchrec_lowprec.manifest`) last; ``load`` verifies it first
and raises :class:`~torchrec_lowprec.manifest.CheckpointCorruptError` on a missing, truncated or
altered file.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from torchrec_lowprec.distributed.embedding_bag import ShardedLowPrecisionEmbeddingBagCollection
from torchrec_lowprec.distributed.embedding_collection import ShardedLowPrecisionEmbeddingCollection
from torchrec_lowprec.distributed.state import TableMeta, convert_column_split
from torchrec_lowprec.distributed.validate import validate_sharded_checkpoint
from torchrec_lowprec.manifest import verify_manifest, write_manifest
from torchrec_lowprec.modules.embedding_bag import LowPrecisionEmbeddingBagCollection
from torchrec_lowprec.modules.embedding_collection import LowPrecisionEmbeddingCollection

__all__ = ["load", "save", "validate_sharded_checkpoint"]

# Everything DCP's ``.metadata`` pickle names (torch 2.x), plus torch dtypes; nothing else.
_META = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    *((_META, n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                          "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("builtins", "set"), ("builtins", "frozenset"),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # type: ignore[override]
        dtype = module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in _ALLOWED and not dtype:
            raise pickle.UnpicklingError(
                f"checkpoint metadata names {module}.{name}, which is not DCP metadata; refusing to load it"
            )
        return super().find_class(module, name)


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` unpickling admits DCP metadata classes only.

    Example::

        dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
    """

    def read_metadata(self, *args, **kwargs) -> Metadata:  # type: ignore[override]
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} does not hold DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except pickled entries load with ``weights_only=True``.

    Not flattening ShardedTensors: DCP's default drops those a rank holds no shard of, then
    mistakes the state dict for a pre-2.4 one and fails on ``..._extra_state`` ("Missing key");
    that is any TABLE_WISE plan where a rank lacks a table. Ours are not nested, which is all
    flattening is for.

    Example::

        dcp.load(state, checkpoint_id=path, planner=SafeLoadPlanner())
    """

    def __init__(self) -> None:
        super().__init__(flatten_sharded_tensors=False)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:  # type: ignore[override]
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _low_precision_modules(model: nn.Module) -> dict[str, nn.Module]:
    kinds = (
        ShardedLowPrecisionEmbeddingBagCollection,
        ShardedLowPrecisionEmbeddingCollection,
        LowPrecisionEmbeddingBagCollection,
        LowPrecisionEmbeddingCollection,
    )
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


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def save(model: nn.Module, path: str, manifest: bool = True) -> None:
    """Save ``model.state_dict()`` (sharded or not) to the directory ``path`` with DCP, then
    (rank 0, once every rank wrote its files) the checksum manifest."""
    dcp.save(model.state_dict(), checkpoint_id=path)
    if manifest:
        if _is_distributed():
            dist.barrier()
        if not _is_distributed() or dist.get_rank() == 0:
            write_manifest(path)
        if _is_distributed():
            dist.barrier()


def load(model: nn.Module, path: str, verify: bool = True) -> None:
    """Load a checkpoint written by :func:`save` into ``model`` under its current plan.

    The manifest is verified first (``verify=False`` skips it, for a caller that verified an
    enclosing manifest). Every low-precision table is checked against the checkpoint's metadata
    next; a mismatch raises ``ValueError`` (the same on every rank) and leaves the model untouched.
    A table saved under another column split (column-wise <-> another column split, table/row-wise
    or unsharded) is read whole and re-quantized per block of the model's split
    (:func:`~torchrec_lowprec.distributed.state.convert_column_split`).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path!r}")
    if verify:
        verify_manifest(path)
    state = model.state_dict()
    meta = SafeFileSystemReader(path).read_metadata().state_dict_metadata
    modules = {_state_prefix(model, n): m for n, m in _low_precision_modules(model).items()}
    # The column split each table was saved under (DCP stores `_extra_state` flattened).
    ask = {
        p: {
            n: {"column_shards": []}
            for n in _metas_of(m)
            if f"{p}_extra_state.tables.{n}.column_shards" in meta
        }
        for p, m in modules.items()
    }
    saved = _read(path, {p + "_extra_state": {"tables": t} for p, t in ask.items() if t})
    conversions = []
    for prefix, module in modules.items():
        shapes = {k: tuple(v.size) for k, v in meta.items() if k.startswith(prefix) and hasattr(v, "size")}
        theirs = saved.get(prefix + "_extra_state", {}).get("tables", {})
        for name, m in _metas_of(module).items():
            cols = tuple(theirs.get(name, {}).get("column_shards", m.col_starts))
            src = replace(m, col_starts=cols)
            for key, want in src.global_shapes().items():
                got = shapes.get(f"{prefix}tables.{name}.{key}")
                if got is None:
                    raise ValueError(
                        f"table {name!r}: the checkpoint at {path!r} has no entry tables.{name}.{key}"
                    )
                if got != tuple(want):
                    raise ValueError(
                        f"table {name!r}: checkpoint entry tables.{name}.{key} has shape {got}, the model "
                        f"expects {tuple(want)} (different rows, dim, bit width or optimizer)"
                    )
                if cols != tuple(m.col_starts):
                    full = f"{prefix}tables.{name}.{key}"
                    state[full] = torch.empty(want, dtype=meta[full].properties.dtype)
            if cols != tuple(m.col_starts):
                conversions.append((prefix, name, src, m))
    _read(path, state)
    for prefix, name, src, dst in conversions:
        keys = {k: f"{prefix}tables.{name}.{k}" for k in src.global_shapes()}
        out = convert_column_split({k: state[full] for k, full in keys.items()}, src, dst)
        state.update({full: out[k] for k, full in keys.items()})
        extra = state.get(prefix + "_extra_state")
        if isinstance(extra, dict) and name in extra.get("tables", {}):
            extra["tables"][name]["column_shards"] = list(dst.col_starts)
    model.load_state_dict(state)


def _read(path: str, state: dict) -> dict:
    """``dcp.load`` into ``state`` through the safe reader and planner; returns ``state``."""
    try:
        dcp.load(
            state,
            storage_reader=SafeFileSystemReader(path),
            no_dist=not _is_distributed(),
            planner=SafeLoadPlanner(),
        )
    except CheckpointException as e:
        if "Weights only load failed" in str(e):
            raise pickle.UnpicklingError(
                f"{path}: a pickled entry holds objects other than tensors and plain types; refusing to "
                "unpickle it (it may run code)"
            ) from None
        raise
    return state


def _state_prefix(model: nn.Module, module_name: str) -> str:
    """The state-dict prefix of a submodule (DMP's wrappers add none of their own names)."""
    key = module_name
    for wrapper in ("_dmp_wrapped_module.", "module."):
        key = key.replace(wrapper, "")
    return key + "." if key else ""
