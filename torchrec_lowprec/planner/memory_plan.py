"""What the precision planner returns: :class:`MemoryPlan` (the precision, TorchRec's sharding
plan and the bytes per rank), its JSON file and its summary."""

from __future__ import annotations

from dataclasses import dataclass, field

from torchrec.distributed.types import ShardingPlan

from torchrec_lowprec.files import read_json, write_json
from torchrec_lowprec.planner.plan_file import sharding_plan_from_dict, sharding_plan_to_dict
from torchrec_lowprec.planner.schema import PrecisionPlan

MEMORY_PLAN_FORMAT = "torchrec_lowprec.memory_plan"
GiB = 1 << 30


@dataclass
class MemoryPlan:
    """What :func:`plan_precision` returns: the precision, the sharding and the bytes per rank.

    ``sharding`` is keyed by ``module_path + ".row_groups"``: the physical tables of the
    :class:`MixedPrecisionEmbeddingBagCollection` that ``lp.convert(model,
    lp.MixedPrecisionConfig(plan.precision, cfg))`` puts at ``module_path``; the
    ``sequence_tables`` (an ``EmbeddingCollection``'s, one width each: ``planner.sequence.
    sequence_config``) by ``sequence_module_path``.

    Example::

        mp = plan_precision(tables, Topology(world_size=8, compute_device="cuda", hbm_cap=40 * GiB))
        mp.save("plan.json"); print(mp.summary())
    """

    precision: PrecisionPlan
    sharding: ShardingPlan
    module_path: str
    compute_device: str
    world_size: int
    budget_bytes: int
    reserved_fraction: float
    per_rank_bytes: list[int]
    placements: dict[str, list[int]] = field(default_factory=dict)
    table_bytes: dict[str, int] = field(default_factory=dict)
    row_map_bytes: int = 0
    sequence_tables: list[str] = field(default_factory=list)
    sequence_module_path: str = ""

    def to_dict(self) -> dict:
        return {
            "format": MEMORY_PLAN_FORMAT,
            "version": 1,
            "module_path": self.module_path,
            "compute_device": self.compute_device,
            "world_size": self.world_size,
            "budget_bytes_per_rank": self.budget_bytes,
            "reserved_fraction": self.reserved_fraction,
            "table_bytes_per_rank": self.per_rank_bytes,
            "row_map_bytes_per_rank": self.row_map_bytes,
            "sequence_tables": self.sequence_tables,
            "sequence_module_path": self.sequence_module_path,
            "placements": self.placements,
            "table_bytes": self.table_bytes,
            "precision": self.precision.to_dict(),
            "sharding": sharding_plan_to_dict(self.sharding),
        }

    def save(self, path: str) -> None:
        """Write JSON atomically (temp file + rename)."""
        write_json(path, self.to_dict())

    @staticmethod
    def load(path: str) -> MemoryPlan:
        doc = read_json(path, "plan file")
        if not isinstance(doc, dict) or doc.get("format") != MEMORY_PLAN_FORMAT:
            raise ValueError(
                f"{path} is not a {MEMORY_PLAN_FORMAT} file (written by `torchrec-lowprec plan`)"
            )
        try:
            return MemoryPlan(
                precision=PrecisionPlan.from_dict(doc["precision"], path),
                sharding=sharding_plan_from_dict(doc["sharding"], path),
                module_path=doc["module_path"],
                compute_device=doc["compute_device"],
                world_size=int(doc["world_size"]),
                budget_bytes=int(doc["budget_bytes_per_rank"]),
                reserved_fraction=float(doc["reserved_fraction"]),
                per_rank_bytes=[int(x) for x in doc["table_bytes_per_rank"]],
                placements={k: list(v) for k, v in doc.get("placements", {}).items()},
                table_bytes={k: int(v) for k, v in doc.get("table_bytes", {}).items()},
                row_map_bytes=int(doc.get("row_map_bytes_per_rank", 0)),
                sequence_tables=list(doc.get("sequence_tables", [])),
                sequence_module_path=str(doc.get("sequence_module_path", "")),
            )
        except KeyError as e:
            raise ValueError(f"{path} lacks field {e}") from None

    def summary(self) -> str:
        """A readable table: table, rows, dim, bits by group, bytes, ranks; then per-rank totals."""
        lines = [f"{'table':<24} {'rows':>12} {'dim':>4}  {'bits (share of rows)':<34} {'bytes':>10}  ranks"]
        for name, tp in self.precision.tables.items():
            share: dict[int, int] = {}
            for a, e, b in zip(tp.group_starts(), tp.group_ends, tp.bits):
                share[b] = share.get(b, 0) + (e - a)
            bits = " ".join(f"{b}:{100 * n / tp.rows:.0f}%" for b, n in sorted(share.items(), reverse=True))
            ranks = ",".join(str(r) for r in self.placements.get(name, []))
            lines.append(
                f"{name:<24} {tp.rows:>12,} {tp.dim:>4}  {bits:<34} {fmt_bytes(self.table_bytes.get(name, 0)):>10}  {ranks}"
            )
        usable = self.budget_bytes * (1 - self.reserved_fraction)
        lines.append("")
        if self.row_map_bytes:
            lines.append(
                f"every rank also holds {fmt_bytes(self.row_map_bytes)} of raw id -> rank maps (counted)"
            )
        for r, b in enumerate(self.per_rank_bytes):
            lines.append(
                f"rank {r}: {fmt_bytes(b):>10} of {fmt_bytes(self.budget_bytes)} ({100 * b / self.budget_bytes:.1f}%; "
                f"{fmt_bytes(usable)} usable after reserving {100 * self.reserved_fraction:.0f}% for dense parts and I/O)"
            )
        return "\n".join(lines)


def fmt_bytes(n: float) -> str:
    """``n`` bytes as GiB / MiB / KiB / B, two decimals."""
    for unit, div in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"
