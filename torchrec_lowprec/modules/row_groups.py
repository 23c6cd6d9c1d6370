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

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.modules.embedding_modules import get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_lowprec.configs import LowPrecisionConfig
from torchrec_lowprec.modules.checkpoint import validate_all_entries
from torchrec_lowprec.modules.collection_base import LowPrecisionTables
from torchrec_lowprec.modules.data_type import config_from_data_type
from torchrec_lowprec.modules.table_state import has_default_init
from torchrec_lowprec.optim.keyed import FusedTableOptimizer
from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision

#: Physical table ``<table>__g<first group>`` holds a run of groups; its features are
#: ``<feature>@g<first group>``. A table kept in one piece keeps its own names.
GROUP_TABLE_SEP = "__g"
GROUP_FEATURE_SEP = "@g"


def physical_name(table: str, first_group: int, whole: bool) -> str:
    return table if whole else f"{table}{GROUP_TABLE_SEP}{first_group}"


def table_precision(table: BaseEmbeddingConfig, plan: PrecisionPlan, default_bits: int) -> TablePrecision:
    """The plan's entry for ``table`` (checked against its shape), or one group at ``default_bits``."""
    tp = plan.tables.get(table.name)
    if tp is None:
        return TablePrecision(
            table.num_embeddings, table.embedding_dim, (table.num_embeddings,), (default_bits,)
        )
    if (tp.rows, tp.dim) != (table.num_embeddings, table.embedding_dim):
        raise ValueError(
            f"precision plan for table {table.name!r} is for {tp.rows} x {tp.dim} rows but the table is "
            f"{table.num_embeddings} x {table.embedding_dim}; re-run the search/planner for this model"
        )
    return tp


def check_row_map(table: str, row_map: torch.Tensor, rows: int) -> torch.Tensor:
    """``row_map`` if it is a valid raw id -> rank map of ``table`` (``rows`` entries, integer,
    each rank in ``[0, rows)`` exactly once), else ``ValueError`` naming the table. A map
    pointing outside the table would read another table's rows (the forward routes ranks by
    their position in all tables); a rank missing from it would leave a row unreachable."""
    if not isinstance(row_map, torch.Tensor) or row_map.is_floating_point() or row_map.is_complex():
        raise ValueError(
            f"row_maps[{table!r}] must be an integer tensor (raw id -> rank), got {row_map!r:.80}"
        )
    if row_map.dtype == torch.bool or tuple(row_map.shape) != (rows,):
        raise ValueError(
            f"row_maps[{table!r}] has shape {tuple(row_map.shape)} and dtype {row_map.dtype}, expected "
            f"({rows},) integers: one rank per raw id of table {table!r}"
        )
    if row_map.device.type == "meta" or rows == 0:
        return row_map
    low, high = int(row_map.min()), int(row_map.max())
    if low < 0 or high >= rows:
        bad = low if low < 0 else high
        raise ValueError(
            f"row_maps[{table!r}] maps raw id {int(torch.nonzero(row_map == bad)[0])} to rank {bad}, "
            f"outside [0, {rows}) of table {table!r}"
        )
    seen = torch.bincount(row_map.to(torch.int64), minlength=rows)
    if bool((seen != 1).any()):
        rank = int(torch.nonzero(seen != 1)[0])
        raise ValueError(
            f"row_maps[{table!r}] is not a permutation of [0, {rows}): rank {rank} is given to "
            f"{int(seen[rank])} raw ids; give each rank to exactly one raw id"
        )
    return row_map


def _default_config(table: BaseEmbeddingConfig, plan: PrecisionPlan, config: LowPrecisionConfig | None):
    """A table's config when ``per_table_configs`` does not name it (the low-precision
    collection's rule: with no config, a whole table is stored at its ``data_type``)."""
    if config is not None:
        return config
    return LowPrecisionConfig() if table.name in plan.tables else config_from_data_type(table)


@dataclass(frozen=True)
class PhysicalTable:
    """One stored run of groups of ``table``: rows ``[start, end)`` at ``bits``, read by ``features``."""

    table: BaseEmbeddingConfig
    name: str
    start: int
    end: int
    features: tuple[str, ...]
    config: LowPrecisionConfig

    def torchrec_config(self, cls: type, **extra: Any) -> BaseEmbeddingConfig:
        """This run as a TorchRec table config of type ``cls`` (``EmbeddingBagConfig`` or
        ``EmbeddingConfig``), keeping the logical table's init (applied to each row group)."""
        t = self.table
        return cls(
            num_embeddings=self.end - self.start, embedding_dim=t.embedding_dim, name=self.name,
            feature_names=list(self.features), weight_init_min=t.get_weight_init_min(),
            weight_init_max=t.get_weight_init_max(), init_fn=None if has_default_init(t) else t.init_fn,
            **extra,
        )  # fmt: skip


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
                sel = feat == i
                values = torch.where(sel, getattr(self, f"row_map_{t}").to(torch.int64)[values * sel], values)
        seg_start = self._seg_start.to(dev)
        base = self._feat_base.to(dev)[feat]
        seg = torch.searchsorted(seg_start, base + values, right=True) - 1
        local = values - (seg_start[seg] - base)
        dest = self._seg_dest.to(dev)[seg]
        keep = dest >= 0 if valid is None else (dest >= 0) & valid
        kept = torch.nonzero(keep).flatten()
        dest_bag = (dest * batch + (bag - feat * batch))[kept]
        pos = kept[torch.argsort(dest_bag, stable=True)]
        n_keys = len(self._inner_keys)
        new_lengths = torch.bincount(dest_bag, minlength=n_keys * batch).to(lengths.dtype)
        inner = KeyedJaggedTensor(
            keys=self._inner_keys,
            values=local[pos],
            lengths=new_lengths,
            weights=weights[pos] if weights is not None else None,
            stride=batch,
        )
        return inner, pos

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
