"""The precision plan: per-table, per-row-group bit widths, and its JSON (no torch import).

What MPE selects, what the precision planner fits into a budget, what a mixed-precision
collection stores and carries in its checkpoints. The schema lives with the planner; it is
plain data, so the layers below (``configs``, ``modules/``) read it without importing the
planning code (``planner/__init__`` resolves its names lazily).
"""

from __future__ import annotations

import math
import operator
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass

from torchrec_lowprec.files import read_json, write_json
from torchrec_lowprec.types import INT_BITS, PLAN_BITS

PLAN_FORMAT = "torchrec_lowprec.precision_plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class TablePrecision:
    """Bit widths of one table's row groups.

    Groups are contiguous ranges of *frequency-ranked* ids (id 0 = most frequent): group ``g``
    holds rows ``[group_ends[g-1], group_ends[g])``. ``bits[g]`` is 0 (pruned), 2, 4, 8, 16 or
    32. ``group_mass`` (optional) is each group's share of the table's lookups, the importance
    the precision planner lowers by. ``remapped`` means the raw ids are *not* frequency-ranked
    by the data pipeline, so the module keeps an explicit raw id -> rank map (4 B/row, counted).

    Example::

        TablePrecision(rows=1000, dim=64, group_ends=(100, 1000), bits=(8, 2))
    """

    rows: int
    dim: int
    group_ends: tuple[int, ...]
    bits: tuple[int, ...]
    group_mass: tuple[float, ...] | None = None
    remapped: bool = False

    def __post_init__(self) -> None:
        # Integers only: a plan saying 8.9 bits or a group ending at row 5.5 is a broken file,
        # not something to truncate.
        for name in ("rows", "dim"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"TablePrecision: {name}={_short(getattr(self, name))} must be an integer")
        for name in ("group_ends", "bits"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
                raise ValueError(f"TablePrecision: {name}={_short(value)} must be a list of integers")
            object.__setattr__(self, name, tuple(operator.index(v) for v in value))
        if self.group_mass is not None:
            object.__setattr__(self, "group_mass", tuple(float(m) for m in self.group_mass))
        if self.rows <= 0 or self.dim <= 0:
            raise ValueError(f"TablePrecision: rows={self.rows} and dim={self.dim} must be > 0")
        ends = self.group_ends
        if not ends or len(ends) != len(self.bits):
            raise ValueError(
                f"TablePrecision: {len(ends)} group ends but {len(self.bits)} bit widths; give one per group"
            )
        if any(b <= a for a, b in zip((0,) + ends, ends)) or ends[-1] != self.rows:
            raise ValueError(
                f"TablePrecision: group_ends {list(ends)} must increase strictly and end at rows={self.rows}"
            )
        bad = sorted({b for b in self.bits if b not in PLAN_BITS})
        if bad:
            raise ValueError(f"TablePrecision: bit widths {bad} are not storable; allowed: {list(PLAN_BITS)}")
        if any(b in INT_BITS for b in self.bits) and self.dim % 4:
            raise ValueError(
                f"TablePrecision: dim={self.dim} cannot be stored at 8/4/2 bits (FBGEMM needs a multiple of 4)"
            )
        if self.group_mass is not None and len(self.group_mass) != len(ends):
            raise ValueError(
                f"TablePrecision: group_mass has {len(self.group_mass)} entries for {len(ends)} groups"
            )

    @property
    def num_groups(self) -> int:
        return len(self.group_ends)

    def group_starts(self) -> tuple[int, ...]:
        return (0,) + self.group_ends[:-1]

    def segments(self) -> list[tuple[int, int, int, int]]:
        """Runs of consecutive groups with equal bits: ``(first_group, start_row, end_row, bits)``."""
        out: list[tuple[int, int, int, int]] = []
        for g, (a, e, b) in enumerate(zip(self.group_starts(), self.group_ends, self.bits)):
            if out and out[-1][3] == b:
                out[-1] = (out[-1][0], out[-1][1], e, b)
            else:
                out.append((g, a, e, b))
        return out

    def serving_bytes(self) -> int:
        """Bytes of the stored rows (codes + fp16 scale/bias, unpadded; pruned rows 0), plus the
        raw id -> rank map when ``remapped``: what an exported table holds."""
        from torchrec_lowprec.quant.layout import RowFormat  # imports torch: not at module level

        rows = sum(
            (e - a) * RowFormat(b, self.dim).row_bytes
            for a, e, b in zip(self.group_starts(), self.group_ends, self.bits)
            if b
        )
        return rows + (4 * self.rows if self.remapped else 0)

    def with_bits(self, bits: tuple[int, ...]) -> TablePrecision:
        return TablePrecision(self.rows, self.dim, self.group_ends, bits, self.group_mass, self.remapped)


@dataclass(frozen=True)
class PrecisionPlan:
    """Per-table, per-row-group bit widths: what MPE selects and the precision planner fits.

    Saves to / loads from JSON and travels inside checkpoints of mixed-precision collections.

    Example::

        plan = PrecisionPlan({"t_user": TablePrecision(1000, 64, (100, 1000), (8, 2))})
        plan.save("plan.json"); PrecisionPlan.load("plan.json") == plan
    """

    tables: dict[str, TablePrecision]

    @staticmethod
    def uniform(shapes: dict[str, tuple[int, int]], bits: int) -> PrecisionPlan:
        """Every table (name -> (rows, dim)) in one group at ``bits``."""
        return PrecisionPlan({n: TablePrecision(r, d, (r,), (bits,)) for n, (r, d) in shapes.items()})

    @staticmethod
    def hot_rows(
        shapes: dict[str, tuple[int, int]], bits: int, hot: Sequence[tuple[float, int]]
    ) -> PrecisionPlan:
        """Every table (name -> (rows, dim)) at ``bits``, except its most frequent rows: ``hot`` is
        ``[(share of the table's rows, bits), ...]``, hottest first (each group at least one row).

        The low-bit recipes of docs/precision.md: int4 with a fixed step and its hottest 60% of
        rows at 8 bits is ``hot_rows(shapes, 4, [(0.6, 8)])`` with ``learn_step_size=False``.
        Groups are ranges of frequency-ranked ids, as in every plan.

        Example::

            PrecisionPlan.hot_rows({"t_user": (1000, 64)}, 2, [(0.2, 8), (0.5, 4)])
            # t_user: rows [0, 200) at 8 bits, [200, 700) at 4, [700, 1000) at 2
        """
        if bits not in PLAN_BITS:
            raise ValueError(
                f"hot_rows: the tables' width {bits!r} is not one of {', '.join(map(str, PLAN_BITS))}"
            )
        hot = list(hot)
        if not hot:
            raise ValueError("hot_rows: no hot groups given: use PrecisionPlan.uniform for one width")
        for share, width in hot:
            if width not in PLAN_BITS or width == 0:
                hot_widths = ", ".join(str(b) for b in PLAN_BITS if b > 0)
                raise ValueError(
                    f"hot_rows: hot width {width!r} is not one of {hot_widths} (0 would prune them)"
                )
            if isinstance(share, bool) or not (
                isinstance(share, (int, float)) and math.isfinite(share) and 0 < share <= 1
            ):
                raise ValueError(f"hot_rows: share {share!r} of the rows at {width} bits must be in (0, 1]")
        total = sum(share for share, _ in hot)
        if total > 1 + 1e-9:
            raise ValueError(f"hot_rows: the hot shares add up to {total:g} of the rows; at most 1")
        out = {}
        for name, (rows, dim) in shapes.items():
            ends: list[int] = []
            group_bits: list[int] = []
            start = 0
            for share, width in hot:
                end = min(rows, start + max(1, round(share * rows)))
                if end > start:
                    ends.append(end)
                    group_bits.append(width)
                start = end
            if start < rows:
                ends.append(rows)
                group_bits.append(bits)
            out[name] = TablePrecision(rows, dim, tuple(ends), tuple(group_bits))
        return PrecisionPlan(out)

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "tables": {
                n: {"rows": t.rows, "dim": t.dim, "group_ends": list(t.group_ends), "bits": list(t.bits),
                    "group_mass": list(t.group_mass) if t.group_mass is not None else None,
                    "remapped": t.remapped, "serving_bytes": t.serving_bytes()}
                for n, t in self.tables.items()
            },
        }  # fmt: skip

    @staticmethod
    def from_dict(doc: object, source: str = "precision plan") -> PrecisionPlan:
        if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
            raise ValueError(f"{source} is not a {PLAN_FORMAT} document")
        if doc.get("version") != PLAN_VERSION:
            raise ValueError(f"{source} has plan version {doc.get('version')}, expected {PLAN_VERSION}")
        tables = {}
        for name, t in doc.get("tables", {}).items():
            try:
                mass = t.get("group_mass")
                tables[name] = TablePrecision(
                    t["rows"], t["dim"], tuple(t["group_ends"]), tuple(t["bits"]),
                    tuple(mass) if mass is not None else None, bool(t.get("remapped", False)),
                )  # fmt: skip
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise ValueError(f"{source}: table {name!r} is malformed ({e})") from None
        return PrecisionPlan(tables)

    def save(self, path: str) -> None:
        """Write the plan as JSON (atomically: a temp file renamed over ``path``)."""
        write_json(path, self.to_dict())

    @staticmethod
    def load(path: str) -> PrecisionPlan:
        doc = read_json(path, "precision plan")
        if isinstance(doc, dict) and doc.get("format") != PLAN_FORMAT and "precision" in doc:
            doc = doc["precision"]  # a planner output file: the plan travels beside the sharding
        return PrecisionPlan.from_dict(doc, path)


def _is_int(v: object) -> bool:
    """An integer (Python, numpy or a 0-d integer tensor: anything with ``__index__``), not a bool or float."""
    if isinstance(v, bool):
        return False
    try:
        operator.index(v)
    except TypeError:
        return False
    return True


def _short(v: object) -> str:
    return reprlib.repr(v)
