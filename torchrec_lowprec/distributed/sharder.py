"""The sharders that let ``DistributedModelParallel`` shard low-precision collections: pooled
(``LowPrecisionEmbeddingBagCollection``) and sequence (``LowPrecisionEmbeddingCollection``),
both from :class:`LowPrecisionSharderMixin`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ModuleSharder, ParameterSharding, ShardingEnv, ShardingType

from torchrec_lowprec.distributed.embedding_bag import ShardedLowPrecisionEmbeddingBagCollection
from torchrec_lowprec.distributed.embedding_collection import ShardedLowPrecisionEmbeddingCollection
from torchrec_lowprec.distributed.lookup import collection_tables
from torchrec_lowprec.modules.collection_base import LowPrecisionTables
from torchrec_lowprec.modules.embedding_bag import LowPrecisionEmbeddingBagCollection
from torchrec_lowprec.modules.embedding_collection import LowPrecisionEmbeddingCollection
from torchrec_lowprec.modules.table_layout import stored_bytes
from torchrec_lowprec.optim.fused import (
    config_with_fused_params,
    fused_params_for_optimizer,
    resolve_optimizer,
)
from torchrec_lowprec.types import INT_BITS, row_alignment

#: The compute kernel our shards report to TorchRec's planner: a fused-optimizer kernel.
COMPUTE_KERNEL = EmbeddingComputeKernel.FUSED.value
#: Kernels a plan may name for our tables. ``construct_module_sharding_plan`` labels tables
#: without an in-backward optimizer "dense"; ours always train in the backward pass, so both
#: labels mean our fused kernel. Others (UVM caching, key-value, ...) are refused.
ACCEPTED_KERNELS = (EmbeddingComputeKernel.FUSED.value, EmbeddingComputeKernel.DENSE.value)


def table_bytes(
    module: LowPrecisionTables,
    name: str,
    compute_device: str,
    rows: int | None = None,
    cols: int | None = None,
    fused_params: dict[str, Any] | None = None,
) -> int:
    """Bytes table ``name`` of ``module`` (or a ``rows`` x ``cols`` shard of it) holds on
    ``compute_device``: padded rows, master step sizes, state of the optimizer it will run
    (its in-backward tag, else the sharder's ``fused_params``, else its config)."""
    cfg = config_with_fused_params(module.table_config(name), fused_params)
    t = next(t for t in collection_tables(module) if t.name == name)
    kind = resolve_optimizer(module.tables[name].handle, cfg).kind
    align = row_alignment(compute_device)
    return stored_bytes(
        t.num_embeddings if rows is None else rows, t.embedding_dim if cols is None else cols,
        cfg.bits, kind, cfg.keeps_master_step_size, align,
    )  # fmt: skip


class PlannerParameter(nn.Parameter):
    """A meta ``[rows, dim]`` parameter for TorchRec's planner whose ``numel() *
    element_size()`` is ``nbytes()`` (a function: the bytes depend on the planned device).

    ``element_size()`` stays fp32's 4 (the pooled output and its all-to-alls are fp32, and the
    planner reads their sizes from it); ``numel()`` is the exact fraction ``nbytes() / 4``.

    Example::

        p = PlannerParameter(1000, 64, lambda: 1000 * 72)
        p.shape, p.numel() * p.element_size()  # (torch.Size([1000, 64]), Fraction(72000, 1))
    """

    def __new__(cls, rows: int, dim: int, nbytes: Callable[[], int]) -> PlannerParameter:
        p = super().__new__(cls, torch.empty(rows, dim, device="meta"), requires_grad=False)
        p._lp_nbytes = nbytes
        return p

    def __init__(self, rows: int, dim: int, nbytes: Callable[[], int]) -> None:
        pass

    def numel(self) -> Fraction:  # type: ignore[override]
        return Fraction(self._lp_nbytes(), self.element_size())

    def __deepcopy__(self, memo: dict) -> PlannerParameter:  # the planner deep-copies options
        return PlannerParameter(self.shape[0], self.shape[1], self._lp_nbytes)

    def __reduce_ex__(self, proto):  # type: ignore[override]
        return PlannerParameter, (self.shape[0], self.shape[1], self._lp_nbytes)


class LowPrecisionSharderMixin:
    """What our sharders add to TorchRec's: ``fused_params`` checked (keys that would change
    the update's math raise ``ValueError``, kernel settings that do not apply warn), our sharding
    types and compute kernel offered to the planner, exact planner bytes
    (:meth:`shardable_parameters`), and the plan validated before any collective runs.

    Put before TorchRec's sharder class; ``_supported`` lists the sharding types.

    Example::

        class MySharder(LowPrecisionSharderMixin, EmbeddingCollectionSharder):
            _supported = (ShardingType.TABLE_WISE.value,)
    """

    _supported: tuple[str, ...] = ()
    fused_params: dict[str, Any] | None
    qcomm_codecs_registry: dict | None

    def _check_fused_params(self, fused_params: dict[str, Any] | None) -> None:
        # Checked once here: keys that would change the update raise, keys that do not apply
        # to low-precision tables warn (they still reach TorchRec's float tables).
        fused_params_for_optimizer(fused_params)

    def sharding_types(self, compute_device_type: str) -> list[str]:
        self._planned_device = compute_device_type  # the planner's device: sets the row padding
        return [t for t in super().sharding_types(compute_device_type) if t in self._supported]  # type: ignore[misc]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        self._planned_device = compute_device_type
        return [COMPUTE_KERNEL]

    def shardable_parameters(self, module: LowPrecisionTables) -> dict[str, nn.Parameter]:  # type: ignore[override]
        """One meta ``[rows, dim]`` parameter per table whose size in bytes, as TorchRec's
        storage estimator reads it (``numel() * element_size()``), is what the table holds.

        TorchRec sizes a shard as ``table bytes * shard elements / table elements`` (plus an
        optimizer share read from ``_optimizer_classes``, absent here). Our bytes are
        ``rows * RowFormat.bytes_per_row``, so every shard holding whole rows (TABLE_WISE,
        ROW_WISE, TABLE_ROW_WISE) is sized exactly; column shards repeat each row's fixed part
        (fp16 scale/bias, step size, row-wise state) and are under-counted by it
        (``LowPrecisionStorageEstimator`` counts them exactly)."""
        return {
            t.name: PlannerParameter(
                t.num_embeddings, t.embedding_dim, functools.partial(self._table_bytes, module, t.name)
            )
            for t in collection_tables(module)
        }

    def storage_usage(  # type: ignore[override]
        self, tensor: torch.Tensor, compute_device_type: str, compute_kernel: str
    ) -> dict[str, int]:
        """Bytes of a table (``tensor`` from :meth:`shardable_parameters`) on ``compute_device_type``."""
        self._planned_device = compute_device_type
        return super().storage_usage(tensor, compute_device_type, compute_kernel)  # type: ignore[misc]

    def _table_bytes(self, module: LowPrecisionTables, name: str) -> int:
        device = getattr(self, "_planned_device", None) or module.device.type
        return table_bytes(module, name, device, fused_params=self.fused_params)

    def shard(  # type: ignore[override]
        self,
        module: LowPrecisionTables,
        params: dict[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> nn.Module:
        validate_plan(module, params)
        return self.sharded_module_type(  # type: ignore[attr-defined]
            module, params, env, self.fused_params, device, self.qcomm_codecs_registry, module_fqn
        )


_SUPPORTED = (
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
)
#: What TorchRec's EmbeddingCollection shards (its sharder also offers DATA_PARALLEL: refused).
_SUPPORTED_SEQUENCE = (
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.COLUMN_WISE.value,
)


class LowPrecisionEmbeddingBagCollectionSharder(LowPrecisionSharderMixin, EmbeddingBagCollectionSharder):
    """Shards :class:`LowPrecisionEmbeddingBagCollection` TABLE_WISE, ROW_WISE, COLUMN_WISE,
    TABLE_ROW_WISE or TABLE_COLUMN_WISE (DATA_PARALLEL is refused: see docs/sharding.md).

    Takes ``EmbeddingBagCollectionSharder``'s arguments. ``fused_params`` set the tables' fused
    optimizer as on TorchRec's float tables (``optimizer`` as an ``EmbOptimType``,
    ``learning_rate``, ``eps``, ``weight_decay``, ``beta1``, ``beta2``): they override each table's
    ``LowPrecisionConfig`` and are overridden, key by key, by in-backward optimizer tags. Keys
    that would change the update's math (``weight_decay_mode``, gradient clipping, ...) raise
    ``ValueError``; kernel settings that do not apply (caching, ``output_dtype``, ...) warn.
    ``qcomm_codecs_registry`` (quantized all-to-alls) is used as TorchRec uses it. Like TorchRec's sharder, it offers ROW_WISE and
    TABLE_ROW_WISE to the planner on CUDA only; manual plans may use them on CPU.

    Example::

        dmp = DistributedModelParallel(model, plan=plan, sharders=lp.sharders(), device=dev)
    """

    _supported = _SUPPORTED

    def __init__(
        self,
        fused_params: dict[str, Any] | None = None,
        qcomm_codecs_registry: dict | None = None,
    ) -> None:
        self._check_fused_params(fused_params)
        super().__init__(fused_params, qcomm_codecs_registry)

    @property
    def module_type(self) -> type[LowPrecisionEmbeddingBagCollection]:  # type: ignore[override]
        return LowPrecisionEmbeddingBagCollection

    @property
    def sharded_module_type(self) -> type[ShardedLowPrecisionEmbeddingBagCollection]:  # type: ignore[override]
        return ShardedLowPrecisionEmbeddingBagCollection


class LowPrecisionEmbeddingCollectionSharder(LowPrecisionSharderMixin, EmbeddingCollectionSharder):
    """Shards :class:`LowPrecisionEmbeddingCollection` TABLE_WISE, ROW_WISE or COLUMN_WISE (what
    TorchRec's ``EmbeddingCollection`` supports; DATA_PARALLEL is refused as for the EBC).

    ``fused_params`` and ``qcomm_codecs_registry`` work as for
    :class:`LowPrecisionEmbeddingBagCollectionSharder`. ``use_index_dedup=True`` is refused (it
    pre-sums repeated ids' gradients, so the update would not be the unsharded one).

    Example::

        plan = construct_module_sharding_plan(ec, {"t": row_wise()}, sharder=LowPrecisionEmbeddingCollectionSharder())
        dmp = DistributedModelParallel(model, plan=ShardingPlan({"ec": plan}), sharders=lp.sharders())
    """

    _supported = _SUPPORTED_SEQUENCE

    def __init__(
        self,
        fused_params: dict[str, Any] | None = None,
        qcomm_codecs_registry: dict | None = None,
        use_index_dedup: bool = False,
    ) -> None:
        if use_index_dedup:
            raise ValueError(
                "use_index_dedup=True is not supported for low-precision tables: it pre-sums the "
                "gradients of repeated ids in another order, so the update would not be the unsharded one"
            )
        self._check_fused_params(fused_params)
        super().__init__(fused_params, qcomm_codecs_registry)

    @property
    def module_type(self) -> type[LowPrecisionEmbeddingCollection]:  # type: ignore[override]
        return LowPrecisionEmbeddingCollection

    @property
    def sharded_module_type(self) -> type[ShardedLowPrecisionEmbeddingCollection]:  # type: ignore[override]
        return ShardedLowPrecisionEmbeddingCollection


def validate_plan(module: LowPrecisionTables, params: dict[str, ParameterSharding]) -> None:
    """Refuse, before any collective runs, a plan our sharder cannot execute."""
    sequence = isinstance(module, LowPrecisionEmbeddingCollection)
    supported = _SUPPORTED_SEQUENCE if sequence else _SUPPORTED
    cw_widths: dict[str, list[int]] = {}
    for t in collection_tables(module):
        ps = params.get(t.name)
        if ps is None:
            raise ValueError(f"the sharding plan has no entry for low-precision table {t.name!r}")
        if ps.sharding_type not in supported:
            raise ValueError(
                f"table {t.name!r}: sharding type {ps.sharding_type!r} is not supported for low-precision "
                f"{'sequence ' if sequence else ''}tables (supported: {list(supported)}); DATA_PARALLEL "
                "replicas would diverge, use TABLE_WISE"
            )
        if ps.compute_kernel not in ACCEPTED_KERNELS:
            raise ValueError(
                f"table {t.name!r}: compute kernel {ps.compute_kernel!r} is not supported for low-precision "
                f"tables (accepted: {list(ACCEPTED_KERNELS)}); plan with lp.sharders()"
            )
        if ps.sharding_type in (ShardingType.COLUMN_WISE.value, ShardingType.TABLE_COLUMN_WISE.value):
            bits = module.table_config(t.name).bits
            widths = sorted({int(s.shard_sizes[1]) for s in ps.sharding_spec.shards})
            cw_widths[t.name] = widths
            if bits in INT_BITS and any(w % 4 for w in widths):
                raise ValueError(
                    f"table {t.name!r}: column shards of widths {widths} cannot be stored at {bits} bits "
                    "(FBGEMM's IntNBit rows need a multiple of 4)"
                )
    if sequence and len({w for ws in cw_widths.values() for w in ws}) > 1:
        raise ValueError(
            f"column shard widths {cw_widths} differ; TorchRec's sharded EmbeddingCollection needs one "
            "column-shard width for every column-wise table (its sequence output has one local dim)"
        )


def sharders(
    fused_params: dict[str, Any] | None = None, qcomm_codecs_registry: dict | None = None
) -> list[ModuleSharder[nn.Module]]:
    """Our sharders (pooled, then sequence) plus TorchRec's default sharders, so that a model
    mixing float and low-precision EBCs and ECs shards in one call. ``fused_params`` and
    ``qcomm_codecs_registry`` go to our sharders and TorchRec's ``EmbeddingBagCollectionSharder``
    and ``EmbeddingCollectionSharder``.

    Example::

        plan = EmbeddingShardingPlanner(topology=topo).collective_plan(model, lp.sharders(), pg)
    """
    out: list[ModuleSharder[nn.Module]] = [
        LowPrecisionEmbeddingBagCollectionSharder(fused_params, qcomm_codecs_registry),  # type: ignore[list-item]
        LowPrecisionEmbeddingCollectionSharder(fused_params, qcomm_codecs_registry),  # type: ignore[list-item]
    ]
    for s in get_default_sharders():
        if type(s) is EmbeddingBagCollectionSharder:
            s = EmbeddingBagCollectionSharder(fused_params, qcomm_codecs_registry)
        elif type(s) is EmbeddingCollectionSharder:
            s = EmbeddingCollectionSharder(fused_params, qcomm_codecs_registry)
        out.append(s)
    return out
