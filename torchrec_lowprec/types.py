"""The vocabulary shared by every layer (no torch or torchrec import): the configs that
:func:`torchrec_lowprec.convert` takes, the training config of a table, and precision plans.

Configs of the one transform verb (see :mod:`torchrec_lowprec.transform`):

* :class:`LowPrecisionConfig` / :class:`PerTableConfig`: float collections -> low precision;
* :class:`MixedPrecisionConfig`: -> mixed precision from a :class:`PrecisionPlan`;
* ``MPESearchConfig`` (defined in ``modules/mpe_search.py``, re-exported here): -> MPE search;
* :class:`CodebookConfig`: -> MEC codebooks (wraps ``compress.MECConfig``);
* :class:`InferenceConfig`: low precision -> TorchRec's quantized inference modules.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from torchrec_lowprec.files import read_json, write_json

SUPPORTED_BITS = (32, 16, 8, 4, 2)
ROUNDING_MODES = ("stochastic", "nearest")
STEP_SIZE_INITS = ("lsq", "absmax")
BOUNDS_CHECK_MODES = ("raise", "warn", "ignore")


class OptimizerType(str, Enum):
    """The fused sparse optimizers a low-precision table can run in its backward pass."""

    SGD = "sgd"
    ADAGRAD = "adagrad"
    ROWWISE_ADAGRAD = "rowwise_adagrad"
    ADAM = "adam"


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _allowed(field: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"LowPrecisionConfig.{field}={value!r} is not supported; allowed: {list(allowed)}")


class TransformConfig:
    """Base of every config :func:`torchrec_lowprec.convert` dispatches on (torchao's
    ``AOBaseConfig``). A subclass plus a handler registered with
    :func:`torchrec_lowprec.transform.register_transform` is a new transform.

    Example::

        isinstance(LowPrecisionConfig(bits=4), TransformConfig)  # True
    """


@dataclass(frozen=True)
class LowPrecisionConfig(TransformConfig):
    """How a table is stored and trained.

    Args:
        bits: storage precision: 8, 4 or 2 (integer codes times a per-row step size, in
            FBGEMM's IntNBit row layout) or 16 / 32 (plain fp16 / fp32 rows).
        rounding: how updated rows are written back: ``"stochastic"`` (LPT-SR / ALPT;
            unbiased) or ``"nearest"`` (LPT-DR). For 16 bits, stochastic rounding to fp16.
        learn_step_size: ALPT: learn each row's step size with the LSQ gradient (an fp32
            master step of 4 bytes per row is then kept). ``False`` is LPT (fixed step).
        step_size_lr: learning rate of the step size (plain SGD on the LSQ gradient). The
            default 1e-2 was chosen on validation by ``benchmarks/lowbit.py`` among 1e-4, 1e-2
            and 1e-1 (the LSQ gradient is small: at 1e-4 a step barely moves).
        step_size_init: ``"lsq"`` (``2*mean|w|/sqrt(Qp)``), ``"absmax"`` (``max|w|/Qp``) or
            a positive float used for every row.
        grow_step_size: when an updated row needs a grid more than ``growth_threshold`` times
            wider than its step gives, grow the row's step just enough to hold it. ``False``
            always clips, as the papers do. TorchRec's default init (``|w| <= 1/sqrt(rows)``)
            gives a large table an initial grid far narrower than its trained rows; growth
            fixes that at once, while rows that overshoot by less are clipped as ALPT intends.
        growth_threshold: the factor above (>= 1; 1 = never clip).
        optimizer: the fused optimizer of the table (``OptimizerType`` or its value).
        learning_rate, weight_decay, eps, beta1, beta2: its hyper-parameters (weight decay
            is L2 added to the gradient; betas are Adam's).
        seed: seed of the counter-based rounding draws.
        bounds_check: what an id outside ``[0, num_embeddings)`` does: ``"raise"``
            (default), ``"warn"`` (drop it from its bag, count it, warn) or ``"ignore"``
            (drop it and count it silently).

    Example::

        cfg = LowPrecisionConfig(bits=4, rounding="stochastic", learning_rate=0.05)
    """

    bits: int = 8
    rounding: str = "stochastic"
    learn_step_size: bool = True
    step_size_lr: float = 1e-2
    step_size_init: str | float = "lsq"
    grow_step_size: bool = True
    growth_threshold: float = 2.0
    optimizer: OptimizerType | str = OptimizerType.ROWWISE_ADAGRAD
    learning_rate: float = 0.01
    weight_decay: float = 0.0
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999
    seed: int = 0
    bounds_check: str = "raise"

    def __post_init__(self) -> None:
        _allowed("bits", self.bits, SUPPORTED_BITS)
        _allowed("rounding", self.rounding, ROUNDING_MODES)
        _allowed("bounds_check", self.bounds_check, BOUNDS_CHECK_MODES)
        try:
            object.__setattr__(self, "optimizer", OptimizerType(self.optimizer))
        except ValueError:
            _allowed("optimizer", self.optimizer, tuple(o.value for o in OptimizerType))
        if isinstance(self.step_size_init, str):
            _allowed("step_size_init", self.step_size_init, STEP_SIZE_INITS)
        elif not (_is_number(self.step_size_init) and 0 < self.step_size_init < math.inf):
            raise ValueError(
                f"LowPrecisionConfig.step_size_init={self.step_size_init!r} must be 'lsq', 'absmax' or a "
                "finite float > 0"
            )
        for name in ("learning_rate", "step_size_lr", "weight_decay"):
            v = getattr(self, name)
            if not (_is_number(v) and 0 <= v < math.inf):
                raise ValueError(f"LowPrecisionConfig.{name}={v!r} must be a finite number >= 0")
        if not (_is_number(self.eps) and 0 < self.eps < math.inf):
            # Adagrad / RowWiseAdagrad / Adam divide by sqrt(state) + eps: with eps = 0 a row
            # whose gradient and state are exactly zero becomes 0/0 = NaN.
            raise ValueError(
                f"LowPrecisionConfig.eps={self.eps!r} must be a finite number > 0 (e.g. 1e-8); the "
                "optimizers divide by sqrt(state) + eps"
            )
        if not self.growth_threshold >= 1:
            raise ValueError(f"LowPrecisionConfig.growth_threshold={self.growth_threshold!r} must be >= 1")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ValueError(f"LowPrecisionConfig.{name}={v!r} must be in [0, 1)")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"LowPrecisionConfig.seed={self.seed!r} must be an int >= 0")

    @property
    def is_integer(self) -> bool:
        """True for 8/4/2-bit tables (codes + step sizes), False for fp16/fp32."""
        return self.bits <= 8

    @property
    def keeps_master_step_size(self) -> bool:
        """Whether an fp32 master step size per row is stored (ALPT on an integer table)."""
        return self.is_integer and self.learn_step_size

    def replace(self, **changes: object) -> LowPrecisionConfig:
        """A copy with ``changes`` applied (validated like the constructor)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"LowPrecisionConfig has no field(s) {sorted(unknown)}; fields: {sorted(known)}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return LowPrecisionConfig(**values)


@dataclass(frozen=True)
class OptimizerParams:
    """The numbers a fused update needs, resolved from a config or an in-backward optimizer."""

    kind: OptimizerType
    lr: float
    weight_decay: float = 0.0
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999

    @staticmethod
    def from_config(cfg: LowPrecisionConfig) -> OptimizerParams:
        return OptimizerParams(
            OptimizerType(cfg.optimizer), cfg.learning_rate, cfg.weight_decay, cfg.eps, cfg.beta1, cfg.beta2
        )


#: Bit widths a precision plan may give a row group (0 = pruned: the rows read as zeros).
PLAN_BITS = (0, 2, 4, 8, 16, 32)
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
        object.__setattr__(self, "group_ends", tuple(int(e) for e in self.group_ends))
        object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))
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
        if any(0 < b <= 8 for b in self.bits) and self.dim % 4:
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
                    int(t["rows"]), int(t["dim"]), tuple(t["group_ends"]), tuple(t["bits"]),
                    tuple(mass) if mass is not None else None, bool(t.get("remapped", False)),
                )  # fmt: skip
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{source}: table {name!r} is malformed ({e})") from None
        return PrecisionPlan(tables)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str) -> None:
        """Write the plan as JSON (atomically: a temp file renamed over ``path``)."""
        write_json(path, self.to_dict())

    @staticmethod
    def load(path: str) -> PrecisionPlan:
        doc = read_json(path, "precision plan")
        if isinstance(doc, dict) and doc.get("format") != PLAN_FORMAT and "precision" in doc:
            doc = doc["precision"]  # a planner output file: the plan travels beside the sharding
        return PrecisionPlan.from_dict(doc, path)


def _check_tables(owner: str, tables: object) -> None:
    if not isinstance(tables, Mapping) or not all(isinstance(v, LowPrecisionConfig) for v in tables.values()):
        raise TypeError(
            f"{owner}: per-table configs must map table name -> LowPrecisionConfig, got {tables!r}"
        )


@dataclass(frozen=True)
class PerTableConfig(TransformConfig):
    """Low precision with settings per table (torchao's ``FqnToConfig``, one level down).

    ``tables`` maps table name -> :class:`LowPrecisionConfig`; other tables take ``default``,
    or, when ``default`` is ``None``, the width of their ``EmbeddingBagConfig.data_type``.
    Precedence: ``tables[name]`` > ``default`` > the table's ``data_type``.

    Example::

        convert(model, PerTableConfig({"t_user": LowPrecisionConfig(bits=8)}, LowPrecisionConfig(bits=4)))
    """

    tables: Mapping[str, LowPrecisionConfig] = field(default_factory=dict)
    default: LowPrecisionConfig | None = None

    def __post_init__(self) -> None:
        _check_tables("PerTableConfig", self.tables)
        if self.default is not None and not isinstance(self.default, LowPrecisionConfig):
            raise TypeError(
                f"PerTableConfig.default must be a LowPrecisionConfig or None, got {self.default!r}"
            )


@dataclass(frozen=True)
class MixedPrecisionConfig(TransformConfig):
    """Mixed precision: row groups of each table stored at the widths of ``plan`` (MPE's
    selection or the precision planner's); ``row_maps`` (table -> raw id -> frequency rank) for
    tables the data pipeline does not rank; ``base`` / ``per_table`` the training settings.

    Example::

        convert(model, MixedPrecisionConfig(PrecisionPlan.load("plan.json"), base=LowPrecisionConfig()))
    """

    plan: PrecisionPlan
    row_maps: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    base: LowPrecisionConfig | None = None
    per_table: Mapping[str, LowPrecisionConfig] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.plan, PrecisionPlan):
            raise TypeError(
                f"MixedPrecisionConfig.plan must be a PrecisionPlan, got {type(self.plan).__name__}"
            )
        if self.base is not None and not isinstance(self.base, LowPrecisionConfig):
            raise TypeError(
                f"MixedPrecisionConfig.base must be a LowPrecisionConfig or None, got {self.base!r}"
            )
        if self.per_table is not None:
            _check_tables("MixedPrecisionConfig", self.per_table)


@dataclass(frozen=True)
class CodebookConfig(TransformConfig):
    """MEC: tables of at least ``mec.min_rows`` rows replaced by product-quantization codes,
    learned from the tables' current values weighted by ``frequencies`` (feature -> per-id
    counts; ``None``: every row weighs 1). ``mec`` is a ``compress.MECConfig`` (``None``: its
    defaults).

    Example::

        convert(model, CodebookConfig(MECConfig(num_subspaces=4), frequencies=counts))
    """

    mec: Any = None
    frequencies: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class InferenceConfig(TransformConfig):
    """Export: low-precision collections -> TorchRec's quantized inference
    ``EmbeddingBagCollection`` holding the same bytes; the model is put in eval mode.
    ``output_dtype`` ``None`` is ``torch.float32``; ``row_alignment`` ``None`` is the device's.

    Example::

        served = convert(trained_model, InferenceConfig())
    """

    output_dtype: Any = None
    row_alignment: int | None = None
    register_tbes: bool = False


#: Configs defined next to the code they configure, re-exported here on first use.
_ELSEWHERE = {
    "MPESearchConfig": "torchrec_lowprec.modules.mpe_search",
    "MECConfig": "torchrec_lowprec.compress.config",
}


def __getattr__(name: str) -> Any:
    if name in _ELSEWHERE:
        return getattr(importlib.import_module(_ELSEWHERE[name]), name)
    raise AttributeError(f"module 'torchrec_lowprec.types' has no attribute {name!r}")
