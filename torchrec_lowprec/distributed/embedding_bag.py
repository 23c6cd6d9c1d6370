"""``ShardedLowPrecisionEmbeddingBagCollection``: a low-precision collection under TorchRec's
``DistributedModelParallel``.

It is TorchRec's ``ShardedEmbeddingBagCollection`` (same input dist, output dist, awaitables,
pipelining, quantized comms) with its per-rank lookups replaced by
:class:`~torchrec_lowprec.distributed.lookup.LowPrecisionShardLookup` and its state dict by
ShardedTensors over our storage (:mod:`.state`); the low-precision half is shared with the
sequence collection (:mod:`.sharded_base`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.types import ParameterSharding, ShardingEnv
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_lowprec.distributed.sharded_base import ShardedLowPrecisionMixin, ShardingView
from torchrec_lowprec.modules.embedding_bag import LowPrecisionEmbeddingBagCollection


class ShardedLowPrecisionEmbeddingBagCollection(ShardedLowPrecisionMixin, ShardedEmbeddingBagCollection):
    """The sharded form of :class:`LowPrecisionEmbeddingBagCollection` (built by
    :class:`~torchrec_lowprec.distributed.sharder.LowPrecisionEmbeddingBagCollectionSharder`).

    Each rank stores only its shards, in the same packed layout, and runs the fused update on
    them in the backward pass. If the unsharded module holds data (not ``meta``), its rows,
    step sizes and optimizer state are copied into the shards (exactly; column-wise shards
    re-quantize each column block with its own step size).

    Example::

        dmp = DistributedModelParallel(model, plan=plan, sharders=lp.sharders(), device=dev)
    """

    def __init__(
        self,
        module: LowPrecisionEmbeddingBagCollection,
        table_name_to_parameter_sharding: dict[str, ParameterSharding],
        env: ShardingEnv,
        fused_params: dict[str, Any] | None = None,
        device: torch.device | None = None,
        qcomm_codecs_registry: dict | None = None,
        module_fqn: str | None = None,
    ) -> None:
        self._lp_prepare(module, fused_params, device)
        super().__init__(
            ShardingView(module, "embedding_bags"),  # type: ignore[arg-type]
            table_name_to_parameter_sharding,
            env,
            fused_params=None,
            device=device,
            qcomm_codecs_registry=qcomm_codecs_registry,
            module_fqn=module_fqn,
        )
        self._lp_finish(module, env)

    def _lp_tables(self) -> list[EmbeddingBagConfig]:
        return self._embedding_bag_configs

    def _lp_shardings(self) -> Iterator[tuple[str, Any]]:
        return zip(self._sharding_types, self._embedding_shardings)

    def _initialize_torch_state(self, skip_registering: bool = False) -> None:
        # Our state dict is built from the lookups (see _lp_finish / state_dict), not from
        # TorchRec's float-weight machinery.
        self.embedding_bags = nn.ModuleDict()
