"""``ShardedLowPrecisionEmbeddingCollection``: a low-precision sequence collection under
TorchRec's ``DistributedModelParallel``.

It is TorchRec's ``ShardedEmbeddingCollection`` (same input dist, sequence output dist,
``EmbeddingCollectionAwaitable``, column-shard permutes, ``need_indices``) with its per-rank
lookups replaced by :class:`~torchrec_lowprec.distributed.lookup.LowPrecisionShardLookup`
(``sequence=True``: one row per id) and its state dict by ShardedTensors over our storage;
everything low-precision is shared with the pooled collection (:mod:`.sharded_base`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torchrec.distributed.embedding import ShardedEmbeddingCollection
from torchrec.distributed.types import ParameterSharding, ShardingEnv
from torchrec.modules.embedding_configs import EmbeddingConfig

from torchrec_lowprec.distributed.sharded_base import ShardedLowPrecisionMixin, ShardingView
from torchrec_lowprec.modules.embedding_collection import LowPrecisionEmbeddingCollection


class ShardedLowPrecisionEmbeddingCollection(ShardedLowPrecisionMixin, ShardedEmbeddingCollection):
    """The sharded form of :class:`LowPrecisionEmbeddingCollection` (built by
    :class:`~torchrec_lowprec.distributed.sharder.LowPrecisionEmbeddingCollectionSharder`;
    TABLE_WISE, ROW_WISE or COLUMN_WISE, as TorchRec's ``EmbeddingCollection``).

    Each rank stores only its shards and runs the fused update on them in the backward pass;
    rounding draws are keyed by global table, row and column, so TABLE_WISE and ROW_WISE
    training is bit for bit the unsharded module's. Column-wise shards keep one step size per
    row per shard (the rows are re-quantized per block when the unsharded module is copied in).
    The output is TorchRec's: ``Dict[str, JaggedTensor]`` per embedding name.

    Example::

        ec = lp.LowPrecisionEmbeddingCollection(tables, config=lp.LowPrecisionConfig(bits=4))
        dmp = DistributedModelParallel(Model(ec), plan=plan, sharders=lp.sharders(), device=dev)
        out = dmp(kjt)                      # {"history": JaggedTensor}, this rank's batch
        dmp.fused_optimizer.param_groups[0]["lr"] = 0.01  # the next backward updates at 0.01
    """

    _lp_sequence = True

    def __init__(
        self,
        module: LowPrecisionEmbeddingCollection,
        table_name_to_parameter_sharding: dict[str, ParameterSharding],
        env: ShardingEnv,
        fused_params: dict[str, Any] | None = None,
        device: torch.device | None = None,
        qcomm_codecs_registry: dict | None = None,
        module_fqn: str | None = None,
    ) -> None:
        self._lp_prepare(module, fused_params, device)
        super().__init__(
            ShardingView(module, "embeddings"),  # type: ignore[arg-type]
            table_name_to_parameter_sharding,
            env,
            fused_params=None,
            device=device,
            qcomm_codecs_registry=qcomm_codecs_registry,
            use_index_dedup=False,
            module_fqn=module_fqn,
        )
        if self._use_index_dedup:  # torchrec's global set_ec_index_dedup(True)
            raise ValueError(
                "EC index dedup (torchrec.distributed.embedding.set_ec_index_dedup) is not supported for "
                "low-precision tables: it pre-sums the gradients of repeated ids in another order, so the "
                "update would no longer be the unsharded one; turn it off for this model"
            )
        self._lp_finish(module, env)

    def _lp_tables(self) -> list[EmbeddingConfig]:
        return self._embedding_configs

    def _lp_shardings(self) -> Iterator[tuple[str, Any]]:
        return iter(self._sharding_type_to_sharding.items())

    def _initialize_torch_state(self, skip_registering: bool = False) -> None:
        # Our state dict is built from the lookups (see _lp_finish / state_dict), not from
        # TorchRec's float-weight machinery.
        self.embeddings = nn.ModuleDict()
