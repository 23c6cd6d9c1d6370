"""The MPE search for sequence features: ``MPESearchEmbeddingCollection``, the unpooled twin of
:class:`~torchrec_lowprec.modules.mpe_search.MPESearchEmbeddingBagCollection` (same
parameters, regulariser and selection, from :class:`~torchrec_lowprec.modules.mpe_search.MPESearchTables`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import (
    EmbeddingCollection,
    EmbeddingCollectionInterface,
    get_embedding_names_by_table,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_lowprec.configs import MPESearchConfig
from torchrec_lowprec.modules.mpe_search import MPESearchTables
from torchrec_lowprec.modules.table_layout import SequenceAccessors


class MPESearchEmbeddingCollection(MPESearchTables, SequenceAccessors, EmbeddingCollectionInterface):
    """Search-time collection: KJT -> ``Dict[str, JaggedTensor]`` like
    ``torchrec.EmbeddingCollection``, every id's row replaced by its expected quantized value
    ``sum_i p_gi * Q_bi(w)`` under its group's learned bit-width distribution. Ids must be
    frequency-ranked (``data.remap_by_rank``).

    Train with the model's loss plus :meth:`regularization`; :meth:`select` gives the
    :class:`PrecisionPlan` that ``MixedPrecisionEmbeddingCollection`` (or ``convert(model,
    MixedPrecisionConfig(plan))``) retrains with.

    Args:
        tables: TorchRec ``EmbeddingConfig`` s (one ``embedding_dim``, as TorchRec's).
        config: :class:`MPESearchConfig`.
        frequencies: feature name -> per-id lookup counts (only the sorted counts are used;
            a table without counts gets equal groups and equal masses).
        need_indices: also return each feature's ids as its JaggedTensor's ``weights``.
        device: where the search tables live.

    Example::

        search = MPESearchEmbeddingCollection(tables, MPESearchConfig(reg_lambda=1e-3), counts)
        out = search(kjt)["history"].values()        # [ids, dim]
        loss = seq_loss(out) + search.regularization()
        plan = search.select()
    """

    def __init__(
        self,
        tables: list[EmbeddingConfig],
        config: MPESearchConfig | None = None,
        frequencies: Mapping[str, torch.Tensor] | None = None,
        need_indices: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not tables:
            raise ValueError(f"{type(self).__name__} needs at least one table")
        if len({t.embedding_dim for t in tables}) > 1:
            raise ValueError(
                f"{type(self).__name__}: every table needs the same embedding_dim (as "
                f"torchrec.EmbeddingCollection), got { {t.name: t.embedding_dim for t in tables} }"
            )
        self._need_indices = need_indices
        self._init_search(tables, config, frequencies, device)
        self._embedding_names_by_table = get_embedding_names_by_table(tables)

    @classmethod
    def from_float(
        cls,
        ec: EmbeddingCollection,
        config: MPESearchConfig | None = None,
        frequencies: Mapping[str, torch.Tensor] | None = None,
    ) -> MPESearchEmbeddingCollection:
        """A search collection starting from ``ec``'s weights (step sizes re-initialised)."""
        tables = ec.embedding_configs()
        dev = ec.embeddings[tables[0].name].weight.device
        out = cls(tables, config, frequencies, ec.need_indices(), dev)
        out._copy_float_weights({t.name: ec.embeddings[t.name].weight for t in tables})
        return out

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        slots = iter(self._checked_features(features))
        probs = self.bit_probabilities()
        out: dict[str, JaggedTensor] = {}
        names = iter(self._embedding_names)
        for t in self._tables:
            for f in t.feature_names:
                jt, keep = next(slots)
                out[next(names)] = JaggedTensor(
                    values=self._lookup(t, f, jt.values(), probs[t.name], keep),
                    lengths=jt.lengths(),
                    weights=jt.values() if self._need_indices else None,
                )
        return out
