"""The precision planner: bit widths per table / row group that fit a memory budget, and the
TorchRec ``ShardingPlan`` that places them, computed together.

Start from the searched (MPE) precision or ``max_bits``; while TorchRec's planner (with
:class:`LowPrecisionStorageEstimator`) cannot place the tables, lower one group one step
(32 -> 16 -> 8 -> 4 -> 2 [-> 0]) where it costs least: cost = the group's lookup share x the
growth of its relative quantization error (``4^-(b-1)`` for ``b`` integer bits, ``4^-11`` for
fp16, 1 for a pruned row) per byte saved. Rare groups and big, rarely read tables go first.

Sequence tables (``EmbeddingConfig``, an ``EmbeddingCollection``'s) are planned beside the pooled
ones: one width per table, same bytes (see :mod:`torchrec_lowprec.planner.sequence`).
"""

from __future__ import annotations

import copy
import heapq

import torch
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import PlannerError, PlannerErrorType
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ShardingPlan
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, EmbeddingBagConfig

from torchrec_lowprec.configs import LowPrecisionConfig
from torchrec_lowprec.distributed.sharder import LowPrecisionEmbeddingBagCollectionSharder
from torchrec_lowprec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection
from torchrec_lowprec.modules.table_layout import stored_bytes
from torchrec_lowprec.planner.memory_plan import MemoryPlan, fmt_bytes
from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision
from torchrec_lowprec.planner.sequence import check_sequence_plan, is_sequence_table, pooled_twins
from torchrec_lowprec.planner.storage import LowPrecisionStorageEstimator, shard_bytes
from torchrec_lowprec.quant.groups import frequency_groups, table_counts
from torchrec_lowprec.types import HBM_DEVICES, PLAN_BITS, row_alignment

LADDER = tuple(sorted(PLAN_BITS, reverse=True))


class InfeasibleBudgetError(ValueError):
    """No precision at or above the floor fits the budget (the message gives both numbers)."""


def relative_error(bits: int) -> float:
    """Relative mean-squared quantization error of a row stored at ``bits`` (a proxy)."""
    if bits == 0:
        return 1.0
    if bits == 32:
        return 0.0
    if bits == 16:
        return 4.0**-11
    return 4.0 ** -(bits - 1)


def _placement_message(
    error: PlannerError, floor: float, cap: int, reserved_fraction: float, topology: Topology, batch_size: int
) -> str:
    """Why TorchRec could not place tables that fit in total: its per-shard I/O buffers."""
    import re

    hbm = topology.compute_device in HBM_DEVICES
    needs = [
        int(m[0 if hbm else 1]) for m in re.findall(r"storage_sum=Storage\(hbm=(\d+), ddr=(\d+)", str(error))
    ]
    need = f"; its smallest placement of one table needs {fmt_bytes(max(needs))} on one rank" if needs else ""
    return (
        f"the tables fit at the floor ({fmt_bytes(floor / topology.world_size)} per rank, {fmt_bytes(floor)} in total) "
        f"but TorchRec's planner cannot place them in the {fmt_bytes(cap * (1 - reserved_fraction))} per rank left "
        f"after reserving {100 * reserved_fraction:.0f}%: it adds each shard's input/output buffers (ids and "
        f"pooled outputs of --batch-size {batch_size} x {topology.world_size} ranks) to the rank holding it"
        f"{need}. Lower --batch-size or the world size, or add memory per rank"
    )


def initial_precision(
    tables: list[BaseEmbeddingConfig],
    precision_plan: PrecisionPlan | None,
    frequencies: dict[str, torch.Tensor] | None,
    num_groups: int,
    max_bits: int,
    remap_in_module: bool = False,
) -> PrecisionPlan:
    """The starting point: the searched plan (capped at ``max_bits``), else frequency groups at
    ``max_bits``, else one group per table at ``max_bits`` (fp16/fp32 for dims FBGEMM cannot pack);
    sequence tables always one group."""
    out = {}
    for t in tables:
        dim_ok = t.embedding_dim % 4 == 0
        top = max_bits if dim_ok or max_bits > 8 else 16
        if precision_plan is not None and t.name in precision_plan.tables:
            tp = precision_plan.tables[t.name]
            out[t.name] = tp.with_bits(tuple(min(b, top) for b in tp.bits))
        elif frequencies and any(f in frequencies for f in t.feature_names) and not is_sequence_table(t):
            ends, mass = frequency_groups(table_counts(t, frequencies), num_groups)
            out[t.name] = TablePrecision(
                t.num_embeddings, t.embedding_dim, ends, (top,) * len(ends), mass, remap_in_module
            )
        else:
            out[t.name] = TablePrecision(
                t.num_embeddings, t.embedding_dim, (t.num_embeddings,), (top,), (1.0,)
            )
    return PrecisionPlan(out)


class _Lowering:
    """Greedy lowering of (table, group) bit widths by accuracy cost per byte saved."""

    def __init__(
        self,
        plan: PrecisionPlan,
        cfg: LowPrecisionConfig,
        min_bits: int,
        align: int,
        whole: tuple[str, ...] = (),
    ) -> None:
        self.tables = dict(plan.tables)
        self.whole = set(whole)  # tables that cannot be pruned (sequence tables)
        self.bits = {n: list(tp.bits) for n, tp in self.tables.items()}
        self.cfg, self.align = cfg, align
        self.ladder = [b for b in LADDER if b >= min_bits]
        self.heap: list[tuple[float, str, int]] = []
        for n, tp in self.tables.items():
            for g in range(tp.num_groups):
                self._push(n, g)

    def row_bytes(self, tp: TablePrecision, bits: int) -> int:
        return stored_bytes(1, tp.dim, bits, self.cfg.optimizer, self.cfg.learn_step_size, self.align)

    def _next(self, n: str, bits: int) -> int | None:
        tp = self.tables[n]
        lower = [
            b
            for b in self.ladder
            if b < bits and (b == 0 or b > 8 or tp.dim % 4 == 0) and not (b == 0 and n in self.whole)
        ]
        return lower[0] if lower else None

    def _push(self, n: str, g: int) -> None:
        tp, b = self.tables[n], self.bits[n][g]
        nb = self._next(n, b)
        if nb is None:
            return
        rows = tp.group_ends[g] - tp.group_starts()[g]
        saved = rows * (self.row_bytes(tp, b) - self.row_bytes(tp, nb))
        mass = tp.group_mass[g] if tp.group_mass is not None else rows / tp.rows
        cost = mass * (relative_error(nb) - relative_error(b)) / max(saved, 1)
        heapq.heappush(self.heap, (cost, n, g))

    def total(self) -> int:
        return sum(
            (e - a) * self.row_bytes(tp, b)
            for n, tp in self.tables.items()
            for a, e, b in zip(tp.group_starts(), tp.group_ends, self.bits[n])
        )

    def lower_until(self, target: int) -> bool:
        """Lower until the total is <= ``target``; False when the floor is reached first."""
        total = self.total()
        while total > target:
            if not self.heap:
                return False
            _, n, g = heapq.heappop(self.heap)
            tp, b = self.tables[n], self.bits[n][g]
            nb = self._next(n, b)
            rows = tp.group_ends[g] - tp.group_starts()[g]
            total -= rows * (self.row_bytes(tp, b) - self.row_bytes(tp, nb))
            self.bits[n][g] = nb
            self._push(n, g)
        return True

    def plan(self) -> PrecisionPlan:
        return PrecisionPlan({n: tp.with_bits(tuple(self.bits[n])) for n, tp in self.tables.items()})


def run_sharding_planner(
    tables: list[EmbeddingBagConfig],
    precision: PrecisionPlan,
    cfg: LowPrecisionConfig,
    topology: Topology,
    batch_size: int,
    reserved_fraction: float,
) -> tuple[ShardingPlan, MixedPrecisionEmbeddingBagCollection]:
    """TorchRec's planner with our storage estimator, on a meta-device model of the plan.

    ``reserved_fraction`` of every rank's HBM *and* DDR is kept back (TorchRec's own
    reservation only shrinks HBM, which would leave a CPU budget unreserved)."""
    topology = copy.deepcopy(topology)
    for dev in topology.devices:
        dev.storage.hbm = int(dev.storage.hbm * (1 - reserved_fraction))
        dev.storage.ddr = int(dev.storage.ddr * (1 - reserved_fraction))
    maps = {
        n: torch.empty(tp.rows, dtype=torch.int32, device="meta")
        for n, tp in precision.tables.items()
        if tp.remapped
    }
    model = MixedPrecisionEmbeddingBagCollection(
        tables, plan=precision, config=cfg, device=torch.device("meta"), init_weights=False, row_maps=maps
    )
    enumerator = EmbeddingEnumerator(
        topology=topology,
        batch_size=batch_size,
        estimator=[
            EmbeddingPerfEstimator(topology=topology),
            LowPrecisionStorageEstimator(topology=topology),
        ],
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        enumerator=enumerator,
        storage_reservation=FixedPercentageStorageReservation(percentage=0.0),
        debug=False,
    )
    return planner.plan(model, [LowPrecisionEmbeddingBagCollectionSharder()]), model


def planned_bytes_per_rank(
    sharding: ShardingPlan, model: MixedPrecisionEmbeddingBagCollection, world_size: int, compute_device: str
) -> list[int]:
    """Bytes each rank will hold for its shards, from the plan's shard sizes (I/O excluded)."""
    per_rank = [0] * world_size
    inner = model.row_groups
    for module_plan in sharding.plan.values():
        for name, ps in module_plan.items():
            for s in ps.sharding_spec.shards:
                per_rank[s.placement.rank()] += shard_bytes(inner, name, *s.shard_sizes, compute_device)
    return per_rank


def plan_precision(
    tables: list[BaseEmbeddingConfig],
    topology: Topology,
    config: LowPrecisionConfig | None = None,
    *,
    batch_size: int = 512,
    precision_plan: PrecisionPlan | None = None,
    frequencies: dict[str, torch.Tensor] | None = None,
    num_groups: int = 16,
    min_bits: int = 2,
    max_bits: int = 32,
    reserved_fraction: float = 0.15,
    module_path: str = "",
    remap_in_module: bool = False,
    sequence_module_path: str = "",
) -> MemoryPlan:
    """Bit widths that fit ``topology``'s memory per rank (HBM on CUDA, DDR on CPU) and the
    TorchRec sharding plan placing them.

    Args:
        tables: the model's table configs: ``EmbeddingBagConfig`` (pooled) and ``EmbeddingConfig``
            (an ``EmbeddingCollection``'s: one width per table, never pruned).
        topology: TorchRec ``Topology`` (world size, compute device, ``hbm_cap``/``ddr_cap``).
        config: optimizer, ALPT on/off etc. of the tables (``bits`` is ignored).
        batch_size: per-rank batch size (for TorchRec's I/O estimate).
        precision_plan: MPE's selection, the starting point (only ever lowered).
        frequencies: feature -> per-id counts; tables get ``num_groups`` frequency groups.
        min_bits: the floor (0 allows pruning rare groups); max_bits: the ceiling.
        reserved_fraction: share of each rank's memory TorchRec reserves for dense parts.
        module_path: where the collection sits in the model (keys the sharding plan).
        remap_in_module: ids are raw (not frequency-ranked): count a 4 B/row map per table.
        sequence_module_path: where the ``EmbeddingCollection`` sits (keys its tables' sharding;
            required when ``tables`` holds ``EmbeddingConfig`` s).

    Raises:
        InfeasibleBudgetError: nothing at or above ``min_bits`` fits; says what would.

    Example::

        topo = Topology(world_size=8, compute_device="cuda", hbm_cap=40 * GiB)
        mp = plan_precision(tables, topo, LowPrecisionConfig(optimizer="rowwise_adagrad"))
    """
    cfg = config or LowPrecisionConfig()
    if min_bits not in LADDER or max_bits not in LADDER or min_bits > max_bits or max_bits == 0:
        raise ValueError(
            f"min_bits={min_bits} / max_bits={max_bits} must be in {list(LADDER)} with min <= max, max > 0"
        )
    bag_tables, sequence = pooled_twins(tables)
    prefix = f"{module_path}.row_groups" if module_path else "row_groups"
    check_sequence_plan(precision_plan, sequence, sequence_module_path, prefix)
    device = topology.compute_device
    cap = topology.devices[0].storage.hbm if device in HBM_DEVICES else topology.devices[0].storage.ddr
    align = row_alignment(device)
    start = initial_precision(tables, precision_plan, frequencies, num_groups, max_bits, remap_in_module)
    # Raw id -> rank maps live beside the sharded tables on every rank: reserved up front.
    map_bytes = sum(4 * tp.rows for tp in start.tables.values() if tp.remapped)
    if map_bytes >= cap * (1 - reserved_fraction):
        raise InfeasibleBudgetError(
            f"the raw id -> rank maps alone take {fmt_bytes(map_bytes)} per rank of a {fmt_bytes(cap)} budget; "
            "frequency-rank the ids in the data pipeline (data.remap_by_rank) instead"
        )
    reserved = reserved_fraction + map_bytes / cap
    usable = cap * topology.world_size * (1 - reserved)
    lowering = _Lowering(start, cfg, min_bits, align, tuple(sequence))
    target = usable
    placement_error: PlannerError | None = None
    while True:
        fits_total = lowering.lower_until(int(target))
        precision = lowering.plan()
        if fits_total or lowering.total() <= usable:
            try:
                sharding, model = run_sharding_planner(
                    bag_tables, precision, cfg, topology, batch_size, reserved
                )
                break
            except PlannerError as e:
                # Storage: too big in total; strict constraints: it fits in total but no
                # placement packs it (a table shard bigger than a rank's room). Both: lower more.
                if e.error_type not in (
                    PlannerErrorType.INSUFFICIENT_STORAGE,
                    PlannerErrorType.STRICT_CONSTRAINTS,
                ):
                    raise
                placement_error = e
        if not fits_total:
            floor = lowering.total()
            if placement_error is not None and floor <= usable:
                raise InfeasibleBudgetError(
                    _placement_message(placement_error, floor, cap, reserved_fraction, topology, batch_size)
                )
            raise InfeasibleBudgetError(
                f"no precision >= {min_bits} bits fits: the tables need at least {fmt_bytes(floor / topology.world_size)} "
                f"per rank at the floor (total {fmt_bytes(floor)} over {topology.world_size} ranks, I/O not counted), but "
                f"the budget is {fmt_bytes(cap)} per rank ({fmt_bytes(cap * (1 - reserved_fraction))} after reserving "
                f"{100 * reserved_fraction:.0f}%). Add ranks or memory, lower min_bits (0 allows pruning), or "
                "use a cheaper optimizer (rowwise_adagrad keeps 4 B/row)"
            )
        # TorchRec could not place what fits in total (I/O, packing): aim lower.
        target = min(target, lowering.total()) * 0.95
    per_rank = planned_bytes_per_rank(sharding, model, topology.world_size, device)
    (module_plan,) = sharding.plan.values()  # the one collection planned
    # Pooled tables under the mixed-precision collection's row groups, sequence tables under
    # their EmbeddingCollection (a whole table's physical name is its own).
    parts: dict[str, EmbeddingModuleShardingPlan] = {}
    placements: dict[str, set[int]] = {}
    by_table: dict[str, int] = {}
    for name, ps in module_plan.items():
        logical = model.logical_table(name)
        key = sequence_module_path if logical in sequence else prefix
        parts.setdefault(key, EmbeddingModuleShardingPlan())[name] = ps
        placements.setdefault(logical, set()).update(s.placement.rank() for s in ps.sharding_spec.shards)
        by_table[logical] = by_table.get(logical, 0) + sum(
            shard_bytes(model.row_groups, name, *s.shard_sizes, device) for s in ps.sharding_spec.shards
        )
    rekeyed = ShardingPlan(parts)
    return MemoryPlan(
        precision, rekeyed, module_path, device, topology.world_size, int(cap), reserved_fraction,
        [b + map_bytes for b in per_rank], {n: sorted(r) for n, r in placements.items()}, by_table, map_bytes,
        sequence, sequence_module_path if sequence else "",
    )  # fmt: skip
