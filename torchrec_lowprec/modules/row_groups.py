"""What the mixed-precision collections share: a :class:`PrecisionPlan` turned into physical
row-group tables of an inner low-precision collection, and ids routed to them.

A plan splits each table's frequency-ranked rows into groups with their own bit width (MPE).
Runs of groups with equal bits become one *physical* table of the inner collection
(``row_groups``: a :class:`LowPrecisionEmbeddingBagCollection` for the pooled
:class:`MixedPrecisionEmbeddingBagCollection`, a :class:`LowPrecisionEmbeddingCollection` for
the sequence :class:`MixedPrecisionEmbeddingCollection`), so the forward is one inner call and
the backward one fused update; pruned groups (0 bits) have no storage and read as zeros.
:class:`RowGroupRouting` holds the plan, the physical tables, the routing tables, row maps,
weights in and out, byte accounting and the plan's checkpoint check; each collection adds its
forward (how routed ids come back as its output).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.modules.embedding_modules import get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_lowprec.configs import LowPrecisionConfig
from torchrec_lowprec.modules import input_check
from torchrec_lowprec.modules.bounds import describe_report, ids_checked_on_device
from torchrec_lowprec.modules.checkpoint import validate_all_entries
from torchrec_lowprec.modules.collection_base import LowPrecisionTables
from torchrec_lowprec.modules.row_group_plan import (  # noqa: F401  (re-exported: the names' old home)
    GROUP_FEATURE_SEP,
    GROUP_TABLE_SEP,
    PhysicalTable,
    _default_config,
    check_row_map,
    physical_name,
    table_precision,
)
from torchrec_lowprec.optim.keyed import FusedTableOptimizer
from torchrec_lowprec.planner.schema import PrecisionPlan


class RowGroupRouting(nn.Module):
    """The plan-to-row-groups half of a mixed-precision collection (not used on its own).

    A collection calls :meth:`_init_row_groups` (it returns the :class:`PhysicalTable` s to
    build ``self.row_groups`` from), then :meth:`_init_row_maps`; its forward calls
    :meth:`_route` to get the inner KJT. Slots are ``(table, feature)`` pairs in table order
    (a feature read by two tables is two slots, named ``feature@table`` as TorchRec names them).

    Example::

        mixed = MixedPrecisionEmbeddingCollection(tables, plan=plan)
        mixed.group_tables("t")          # ["t__g0", "t__g2"]: the physical tables of "t"
        mixed.memory_bytes(per_table=True)["t__g0"]["rows"]
    """

    row_groups: LowPrecisionTables

    def _init_row_groups(
        self,
        tables: list[BaseEmbeddingConfig],
        plan: PrecisionPlan,
        config: LowPrecisionConfig | None,
        per_table_configs: dict[str, LowPrecisionConfig] | None,
    ) -> list[PhysicalTable]:
        """Validate ``plan`` against ``tables``; set the per-table configs and precisions and
        the routing tables; return the physical tables to store (``ValueError`` if none)."""
        if not isinstance(plan, PrecisionPlan):
            raise TypeError(
                f"{type(self).__name__}: plan= (keyword) must be a PrecisionPlan, got {type(plan).__name__}"
            )
        per_table_configs = dict(per_table_configs or {})
        names = [t.name for t in tables]
        unknown = set(plan.tables) - set(names)
        if unknown:
            raise ValueError(f"precision plan names tables {sorted(unknown)} that are not in {names}")
        self._logical_tables = tables
        self._configs = {
            t.name: per_table_configs.get(t.name) or _default_config(t, plan, config) for t in tables
        }
        self._precisions = {t.name: table_precision(t, plan, self._configs[t.name].bits) for t in tables}
        self.plan = PrecisionPlan(dict(self._precisions))
        physical: list[PhysicalTable] = []
        self._features: list[str] = []  # per slot, in table order
        seg_start, seg_dest, feat_base = [], [], []
        inner_keys: list[str] = []
        # inner key -> logical slot; physical feature names are unique (feature@table when shared)
        self._inner_key_slot: dict[str, int] = {}
        emb_names = get_embedding_names_by_table(tables)
        self._embedding_names = [n for names in emb_names for n in names]
        self._logical_table: dict[str, str] = {}  # physical table -> logical table
        base = 0
        for t, slot_names in zip(tables, emb_names):
            tp = self._precisions[t.name]
            segs = tp.segments()
            whole = len(segs) == 1
            feats_of_seg = {}
            for first, a, e, bits in segs:
                if bits == 0:
                    continue
                pname = physical_name(t.name, first, whole)
                feats = tuple(n if whole else f"{n}{GROUP_FEATURE_SEP}{first}" for n in slot_names)
                physical.append(
                    PhysicalTable(t, pname, a, e, feats, self._configs[t.name].replace(bits=bits))
                )
                self._logical_table[pname] = t.name
                feats_of_seg[first] = feats
            for i, f in enumerate(t.feature_names):
                self._features.append(f)
                feat_base.append(base)
                for first, a, _, bits in segs:
                    seg_start.append(base + a)
                    if bits == 0:
                        seg_dest.append(-1)
                    else:
                        seg_dest.append(len(inner_keys))
                        inner_keys.append(feats_of_seg[first][i])
                        self._inner_key_slot[inner_keys[-1]] = len(self._features) - 1
                base += tp.rows
        if not physical:
            raise ValueError("the precision plan prunes every row of every table; nothing would be stored")
        # Slots are routed by their position in a virtual concatenation of all slots' tables:
        # one searchsorted finds each id's segment.
        self._seg_start = torch.tensor(seg_start, dtype=torch.int64)
        self._seg_dest = torch.tensor(seg_dest, dtype=torch.int64)
        self._feat_base = torch.tensor(feat_base, dtype=torch.int64)
        self._inner_keys = inner_keys
        self._rows = [t.num_embeddings for t in tables for _ in t.feature_names]
        self._table_of_feature = [t.name for t in tables for _ in t.feature_names]
        self._remapped = {n for n, tp in self._precisions.items() if tp.remapped}
        return physical

    def _init_row_maps(self, row_maps: dict[str, torch.Tensor] | None, device: torch.device) -> None:
        """Check and register ``row_maps`` (``row_map_<table>`` int32 buffers): exactly the
        tables planned ``remapped=True``, each a permutation of its rows."""
        row_maps = row_maps or {}
        stray = sorted(set(row_maps) - self._remapped)
        if stray:
            raise ValueError(
                f"row_maps given for table(s) {stray} that the precision plan does not mark remapped=True "
                f"(remapped: {sorted(self._remapped)}); a map there would be ignored"
            )
        for t in self._logical_tables:
            n = t.name
            if n in self._remapped:
                if n not in row_maps:
                    raise ValueError(
                        f"table {n!r} is planned with remapped=True but no row_maps[{n!r}] (raw id -> rank) was given"
                    )
                m = check_row_map(n, row_maps[n], self._precisions[n].rows)
                self.register_buffer(f"row_map_{n}", m.to(device=device, dtype=torch.int32))

    # ----- interface -----
    @property
    def fused_optimizer(self) -> FusedTableOptimizer:
        """The fused optimizer of the row groups (a TorchRec ``KeyedOptimizer``; one lr group per
        physical table, keyed ``tables.<physical name>``): see
        :attr:`LowPrecisionEmbeddingBagCollection.fused_optimizer`."""
        return self.row_groups.fused_optimizer

    @property
    def device(self) -> torch.device:
        return self.row_groups.device

    def table_config(self, name: str) -> LowPrecisionConfig:
        """The :class:`LowPrecisionConfig` of table ``name`` (its ``bits`` replaced per group)."""
        return self._configs[name]

    def logical_table(self, physical: str) -> str:
        """The table whose groups physical table ``physical`` (of ``row_groups``) holds."""
        return self._logical_table[physical]

    def group_tables(self, name: str) -> list[str]:
        """The physical tables (in ``row_groups``) holding table ``name``'s stored groups."""
        segs = self._precisions[name].segments()
        return [physical_name(name, first, len(segs) == 1) for first, _, _, bits in segs if bits]

    # ----- routing -----
    def _route(
        self,
        values: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None,
        batch: int,
        valid: torch.Tensor | None = None,
    ) -> tuple[KeyedJaggedTensor, torch.Tensor]:
        """The inner KJT (each id moved to its group's physical feature, as a row of that table)
        and, per inner value, the position of its occurrence in ``values``. Ids of pruned groups,
        and those ``valid`` marks False, go nowhere."""
        return self._inner_kjt(self._destinations(values, lengths, batch, valid), weights, batch)

    def _destinations(
        self, values: torch.Tensor, lengths: torch.Tensor, batch: int, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per id: its row in its physical table, its inner bag (``-1``: routed nowhere), and
        whether it is routed; the number of ids routed to each inner key (on the device); and
        per id its inner key (int32)."""
        dev = values.device
        nf = len(self._features)
        bag = torch.repeat_interleave(
            torch.arange(nf * batch, device=dev), lengths, output_size=values.numel()
        )
        feat = torch.div(bag, batch, rounding_mode="floor")
        if valid is not None:
            values = torch.where(valid, values, torch.zeros_like(values))
        for i, t in enumerate(self._table_of_feature):
            if t in self._remapped:
                # gather from the int32 map as stored: converting the whole map every step cost
                # more than the routing itself on million-row tables. index_select, not [],
                # throughout: on CPU it is about twice as fast for these 1-D gathers
                sel = feat == i
                mapped = getattr(self, f"row_map_{t}").index_select(0, values * sel)
                values = torch.where(sel, mapped.to(torch.int64), values)
        seg_start = self._seg_start.to(dev)
        base = self._feat_base.to(dev).index_select(0, feat)
        seg = torch.searchsorted(seg_start, base + values, right=True) - 1
        local = values - (seg_start.index_select(0, seg) - base)
        dest = self._seg_dest.to(dev).index_select(0, seg)
        keep = dest >= 0 if valid is None else (dest >= 0) & valid
        per_key = torch.zeros(len(self._inner_keys), dtype=torch.int64, device=dev)
        per_key.index_add_(0, dest.clamp(min=0), keep.to(torch.int64))
        return (
            local,
            torch.where(keep, dest * batch + (bag - feat * batch), -1),
            keep,
            per_key,
            dest.to(torch.int32),
        )

    def _inner_kjt(
        self,
        routed: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        weights: torch.Tensor | None,
        batch: int,
        per_key: list[int] | None = None,
    ) -> tuple[KeyedJaggedTensor, torch.Tensor]:
        """:meth:`_route`'s result from :meth:`_destinations`'; ``per_key``: its counts, read back
        (the inner KJT then carries them, and nothing here waits for the device)."""
        local, dest_bag, keep, _, dest = routed
        if per_key is None:
            kept = torch.nonzero(keep).flatten()
        else:
            kept = torch.nonzero_static(keep, size=sum(per_key)).flatten()
        dest_bag = dest_bag.index_select(0, kept)
        # Ids arrive in bag order, so those of one inner key are already in sample order: a
        # stable sort by the key alone (int32: fewer bytes to sort) is the sort by inner bag.
        pos = kept.index_select(0, torch.argsort(dest.index_select(0, kept), stable=True))
        n_bags = len(self._inner_keys) * batch
        new_lengths = torch.zeros(n_bags, dtype=torch.int64, device=local.device)
        new_lengths.index_add_(0, dest_bag, torch.ones_like(dest_bag))
        inner = KeyedJaggedTensor(
            keys=self._inner_keys,
            values=local.index_select(0, pos),
            lengths=new_lengths,
            weights=weights.index_select(0, pos) if weights is not None else None,
            stride=batch,
            length_per_key=per_key,
        )
        return inner, pos

    def _routed_on_device(
        self, features: KeyedJaggedTensor, weighted: bool
    ) -> tuple[KeyedJaggedTensor, list[int], KeyedJaggedTensor, torch.Tensor] | None:
        """``(KJT in slot order, ids per slot, inner KJT, positions)`` for a batch on a device
        whose input checks run there (``input_check.checks_on_device``; every table's
        ``bounds_check`` ``"raise"``), or ``None`` (the caller checks on the host). The routing
        needs the number of ids each row group gets on the host, so the KJT check, the id check
        and those counts come back in one read (the step's one host sync), and a bad batch
        raises here, in its own step, updating nothing."""
        device = features.values().device  # (a sharded row_groups has no single device)
        if not input_check.checks_on_device(device):
            return None
        if any(self._configs[t].bounds_check != "raise" for t in self._table_of_feature):
            return None
        kjt, totals, report, _ = ids_checked_on_device(features, self._features, self._rows, weighted)
        lengths, batch = kjt.lengths(), kjt.stride()
        routed = self._destinations(kjt.values().to(torch.int64), lengths, batch)
        numbers = torch.cat([report, routed[3]]).tolist()  # the one read
        if numbers[0] != input_check.REPORT_OK:
            raise describe_report(
                features.keys(), self._features, self._table_of_feature, self._rows, device, later=False
            )(numbers[:4], 0)
        weights = kjt.weights().float() if weighted else None
        return (kjt, totals, *self._inner_kjt(routed, weights, batch, numbers[4:]))

    # ----- weights and accounting -----
    def dequantized_weight(self, name: str) -> torch.Tensor:
        """Table ``name`` as fp32 ``[rows, dim]`` indexed by (frequency-ranked) id; pruned rows are 0."""
        tp = self._precisions[name]
        segs = tp.segments()
        out = torch.zeros(tp.rows, tp.dim, dtype=torch.float32, device=self.device)
        for first, a, e, bits in segs:
            if bits:
                out[a:e] = self.row_groups.dequantized_weight(physical_name(name, first, len(segs) == 1))
        return out

    def load_float_weight(self, name: str, weight: torch.Tensor) -> None:
        """Quantize fp32 ``weight`` ``[rows, dim]`` (indexed by raw id) into table ``name``'s groups."""
        tp = self._precisions[name]
        if tuple(weight.shape) != (tp.rows, tp.dim):
            raise ValueError(f"table {name!r}: weight {tuple(weight.shape)} is not {tp.rows} x {tp.dim}")
        if name in self._remapped:
            ranked = torch.empty_like(weight)
            ranked[getattr(self, f"row_map_{name}").to(torch.int64).to(weight.device)] = weight
            weight = ranked
        segs = tp.segments()
        for first, a, e, bits in segs:
            if bits:
                self.row_groups.load_float_weight(physical_name(name, first, len(segs) == 1), weight[a:e])

    def memory_bytes(self, per_table: bool = False) -> int | dict[str, dict[str, int]]:
        """Bytes held: the physical tables' rows, step sizes, optimizer state, plus row maps."""
        inner = self.row_groups
        if isinstance(inner, LowPrecisionTables):
            report = inner.memory_bytes(per_table=True)
        else:  # sharded by DistributedModelParallel: this rank's shards
            report = {"row_groups": {"total": inner.memory_bytes()}}
        for n in sorted(self._remapped):
            m = getattr(self, f"row_map_{n}")
            report[f"{n}.row_map"] = {
                "row_map": m.numel() * m.element_size(),
                "total": m.numel() * m.element_size(),
            }
        if per_table:
            return report
        return sum(p["total"] for p in report.values())

    def extra_repr(self) -> str:
        if not isinstance(self.row_groups, LowPrecisionTables):
            return ""  # sharded: the shards report themselves
        report = self.row_groups.memory_bytes(per_table=True)
        lines = []
        for t in self._logical_tables:
            tp = self._precisions[t.name]
            groups = ", ".join(f"rows {a}-{e}: {b} bits" for _, a, e, b in tp.segments())
            held = sum(p["total"] for n, p in report.items() if self._logical_table.get(n) == t.name)
            lines.append(f"{t.name}: {tp.rows} x {tp.dim}, {groups}, {held} bytes")
        return "\n".join(lines)

    # ----- checkpoints: the plan travels with the tables -----
    def get_extra_state(self) -> dict[str, Any]:
        return {"precision_plan": self.plan.to_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved = PrecisionPlan.from_dict(state.get("precision_plan"), "checkpoint")
        if saved != self.plan:
            diff = sorted(
                n
                for n in set(saved.tables) | set(self.plan.tables)
                if saved.tables.get(n) != self.plan.tables.get(n)
            )
            raise ValueError(
                f"checkpoint was trained with a different precision plan (tables {diff} differ); build the "
                "module from the checkpoint's plan (PrecisionPlan.from_dict(sd[...'_extra_state']['precision_plan']))"
            )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # type: ignore[override]
        # The plan is checked before any child copies rows, so a mismatch loads nothing.
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            self.set_extra_state(extra)
        for n in sorted(self._remapped):
            if prefix + f"row_map_{n}" in state_dict:
                check_row_map(n, state_dict[prefix + f"row_map_{n}"], self._precisions[n].rows)
        # Every group's entries too: a missing or misshapen one in the last group loads nothing.
        validate_all_entries(self, state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
