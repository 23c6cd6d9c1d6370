"""Every config of the one transform verb, :func:`torchrec_lowprec.convert` (no torch import).

Small frozen dataclasses, validated at construction, each with a ``VERSION`` and
``to_dict`` / ``from_dict`` (torchao's ``AOBaseConfig`` habit): a config can be logged,
saved beside a checkpoint and rebuilt. Tensors (row maps, frequency counts) are never config
fields: they are inputs of ``convert`` (``convert(model, config, row_maps=...)``).

* :class:`LowPrecisionConfig` / :class:`PerTableConfig`: float collections -> low precision;
* :class:`MixedPrecisionConfig`: -> mixed precision from a ``PrecisionPlan``;
* :class:`MPESearchConfig`: -> the MPE bit-width search;
* :class:`CodebookConfig`: -> MEC product-quantization codebooks;
* :class:`InferenceConfig`: low precision -> TorchRec's quantized inference modules.

All of them live in this one module by design (one home for configs, docs/design.md), which is
why it is longer than the ~400 lines a module usually keeps to; each class is self-contained.

Example::

    cfg = LowPrecisionConfig(bits=4, learning_rate=0.05)
    LowPrecisionConfig.from_dict(cfg.to_dict()) == cfg   # True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar

from torchrec_lowprec._deprecation import warn_deprecated
from torchrec_lowprec.types import FORMATS, SEARCH_BITS, SUPPORTED_BITS, OptimizerType, storable_bits

ROUNDING_MODES = ("stochastic", "nearest", "dithered")
STEP_SIZE_INITS = ("lsq", "absmax")
BOUNDS_CHECK_MODES = ("raise", "warn", "ignore")


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _allowed(field: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"LowPrecisionConfig.{field}={value!r} is not supported; allowed: {list(allowed)}")


def _encode(value: Any) -> Any:
    if isinstance(value, TransformConfig):
        return value.to_dict()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if hasattr(value, "to_dict"):  # a PrecisionPlan
        return value.to_dict()
    return value


class TransformConfig:
    """Base of every config :func:`torchrec_lowprec.convert` dispatches on (torchao's
    ``AOBaseConfig``). A frozen dataclass subclass plus a handler registered with
    :func:`torchrec_lowprec.transform.register_transform` is a new transform.

    ``VERSION`` is bumped when a field changes meaning; :meth:`from_dict` refuses a document
    of another version rather than guess.

    Example::

        isinstance(LowPrecisionConfig(bits=4), TransformConfig)  # True
    """

    VERSION: ClassVar[int] = 1
    #: Fields holding other configs ("config", "configs": a name -> config map) or a plan.
    _NESTED: ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict[str, Any]:
        """``{"type", "version", <fields>}`` of plain JSON values."""
        out: dict[str, Any] = {"type": type(self).__name__, "version": self.VERSION}
        for f in fields(self):  # type: ignore[arg-type]
            out[f.name] = _encode(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> TransformConfig:
        """The config :meth:`to_dict` wrote; ``ValueError`` naming a wrong type, version or key."""
        if not isinstance(doc, Mapping) or doc.get("type") != cls.__name__:
            got = doc.get("type") if isinstance(doc, Mapping) else type(doc).__name__
            raise ValueError(f"{cls.__name__}.from_dict: not a {cls.__name__} document (type {got!r})")
        if doc.get("version") != cls.VERSION:
            raise ValueError(
                f"{cls.__name__}.from_dict: version {doc.get('version')!r}, this library reads "
                f"version {cls.VERSION}"
            )
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(doc) - known - {"type", "version"}
        if unknown:
            raise ValueError(
                f"{cls.__name__}.from_dict: unknown field(s) {sorted(unknown)}; fields: {sorted(known)}"
            )
        values = {}
        for name in known & set(doc):
            v, kind = doc[name], cls._NESTED.get(name)
            if v is not None and kind == "config":
                v = LowPrecisionConfig.from_dict(v)
            elif v is not None and kind == "configs":
                v = {k: LowPrecisionConfig.from_dict(c) for k, c in v.items()}
            elif v is not None and kind == "plan":
                from torchrec_lowprec.planner.schema import PrecisionPlan

                v = PrecisionPlan.from_dict(v)
            elif isinstance(v, list):
                v = tuple(v)
            values[name] = v
        return cls(**values)

    def replace(self, **changes: object) -> TransformConfig:
        """A copy with ``changes`` applied (validated like the constructor)."""
        known = {f.name for f in fields(self)}  # type: ignore[arg-type]
        unknown = set(changes) - known
        if unknown:
            raise ValueError(
                f"{type(self).__name__} has no field(s) {sorted(unknown)}; fields: {sorted(known)}"
            )
        values = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        values.update(changes)
        return type(self)(**values)


POPULARITY_WEIGHTINGS = ("log", "count", "uniform")
CODEBOOK_INITS = ("kmeans", "random")


def _power_of_two(k: int) -> bool:
    return k > 1 and (k & (k - 1)) == 0


@dataclass(frozen=True)
class LowPrecisionConfig(TransformConfig):
    """How a table is stored and trained.

    Args:
        bits: storage precision: 8, 4 or 2 (integer codes times a per-row step size, in
            FBGEMM's IntNBit row layout) or 16 / 32 (plain fp16 / fp32 rows).
        rounding: how updated rows are written back: ``"stochastic"`` (LPT-SR / ALPT;
            unbiased) or ``"nearest"`` (LPT-DR). For 16 bits, stochastic rounding to fp16.
            ``"dithered"``: stochastic rounding whose draw for an element is not fresh each
            step but ``frac(c + step * 0.618...)`` (``c`` the element's hash; a golden-ratio,
            low-discrepancy sequence): still unbiased over elements, but an element updated at
            many steps in a row rounds up in the share of steps its updates ask for, so its
            rounding errors partly cancel instead of adding up as a random walk.
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
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(
                f"LowPrecisionConfig.bits={self.bits!r} must be an int, one of {list(SUPPORTED_BITS)}"
            )
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
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"LowPrecisionConfig.seed={self.seed!r} must be an int >= 0")

    @property
    def is_integer(self) -> bool:
        """True for 8/4/2-bit tables (codes + step sizes), False for fp16/fp32."""
        return FORMATS[self.bits].integer

    @property
    def keeps_master_step_size(self) -> bool:
        """Whether an fp32 master step size per row is stored (ALPT on an integer table)."""
        return self.is_integer and self.learn_step_size


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

    _NESTED: ClassVar[dict[str, str]] = {"tables": "configs", "default": "config"}

    def __post_init__(self) -> None:
        _check_tables("PerTableConfig", self.tables)
        if self.default is not None and not isinstance(self.default, LowPrecisionConfig):
            raise TypeError(
                f"PerTableConfig.default must be a LowPrecisionConfig or None, got {self.default!r}"
            )


@dataclass(frozen=True)
class MixedPrecisionConfig(TransformConfig):
    """Mixed precision: row groups of each table stored at the widths of ``plan`` (MPE's
    selection or the precision planner's); ``base`` / ``per_table`` the training settings
    (``None``: :class:`LowPrecisionConfig`'s defaults; their ``bits`` is not used, the plan's
    widths are). Tables planned ``remapped`` take their raw id -> frequency rank maps as the
    ``row_maps`` input of :func:`~torchrec_lowprec.convert` (tensors are inputs, not config).

    Example::

        convert(model, MixedPrecisionConfig(PrecisionPlan.load("plan.json"), base=LowPrecisionConfig()))
        convert(model, MixedPrecisionConfig(plan), row_maps={"t_item": id_to_rank})
    """

    plan: Any  # a planner.schema.PrecisionPlan (checked below)
    base: LowPrecisionConfig | None = None
    per_table: Mapping[str, LowPrecisionConfig] | None = None

    _NESTED: ClassVar[dict[str, str]] = {"plan": "plan", "base": "config", "per_table": "configs"}

    def __post_init__(self) -> None:
        from torchrec_lowprec.planner.schema import PrecisionPlan

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
class MPESearchConfig(TransformConfig):
    """Hyper-parameters of the MPE search (``convert(model, MPESearchConfig(), frequencies=counts)``).

    Args:
        candidate_bits: the widths searched (paper: 0..6; default 0, 2, 4, 8). Widths the
            storage lacks (1, 3, 5, 6, 7) are stored at the next wider storable width.
        num_groups: frequency groups per table (paper: 128, equal row counts).
        min_rows_per_group: tables too small for ``num_groups`` groups of this many rows get fewer.
        temperature: softmax temperature ``T`` of the bit-width distribution.
        reg_lambda: ``lambda`` of the bit regulariser.
        sparse_weights: the tables' gradients are sparse (``torch.optim.SparseAdam`` /
            ``Adagrad`` / ``SGD`` then update only the looked-up rows; a dense optimizer over a
            large table costs a full pass per step).
        target_bits: a byte budget: the average *stored* bits per embedding value of each
            search collection's selection, metadata included as a served table holds it
            (``TablePrecision.serving_bytes``: codes plus the fp16 scale and bias of every
            integer row; pruned rows 0). ``mpe_budget.uniform_bits(tables, 4)`` is int4's bytes
            (5.0 at dim 32); ``32 / 40`` is 40x compression. The regulariser is then
            ``lambda * E[stored bits per value]`` (the budget's Lagrangian term, in place of the
            paper's ``b / c_g``), ``lambda`` starts at ``reg_lambda`` (e.g. 1e-2) and follows
            dual ascent toward the target (``budget_step``), and ``select`` never exceeds the
            budget. ``None``: the paper's fixed ``lambda``.
        budget_lr: dual-ascent rate of ``log lambda`` per ``budget_step`` call, on the relative
            gap ``(expected bits - target) / target``.

    Example::

        MPESearchConfig(candidate_bits=(0, 2, 4, 8), num_groups=64, reg_lambda=1e-4)
        MPESearchConfig(candidate_bits=(0, 2, 4, 8), target_bits=5.0)  # int4's bytes at dim 32
    """

    candidate_bits: tuple[int, ...] = (0, 2, 4, 8)
    num_groups: int = 64
    min_rows_per_group: int = 16
    temperature: float = 1.0
    reg_lambda: float = 1e-4
    sparse_weights: bool = False
    target_bits: float | None = None
    budget_lr: float = 0.1

    def __post_init__(self) -> None:
        try:
            bits = tuple(sorted(set(self.candidate_bits)))
        except TypeError:
            bits = ()
        bad = [b for b in bits if isinstance(b, bool) or not isinstance(b, int) or b not in SEARCH_BITS]
        if bad or len(bits) < 2:
            raise ValueError(
                f"MPESearchConfig.candidate_bits={self.candidate_bits!r}: need >= 2 distinct int widths from "
                f"{list(SEARCH_BITS)}"
            )
        object.__setattr__(self, "candidate_bits", bits)
        if self.num_groups < 1 or self.min_rows_per_group < 1:
            raise ValueError("MPESearchConfig.num_groups and min_rows_per_group must be >= 1")
        if not 0 < self.temperature < math.inf or not 0 <= self.reg_lambda < math.inf:
            raise ValueError(
                f"MPESearchConfig.temperature={self.temperature!r} must be finite and > 0 and "
                f"reg_lambda={self.reg_lambda!r} finite and >= 0"
            )
        if not _is_number(self.budget_lr) or not 0 < self.budget_lr < math.inf:
            raise ValueError(f"MPESearchConfig.budget_lr={self.budget_lr!r} must be finite and > 0")
        if self.target_bits is not None:
            self._check_target(bits)

    def _check_target(self, bits: tuple[int, ...]) -> None:
        """A budget no selection can meet (or one that constrains nothing) is refused here;
        the per-table bounds (metadata depends on dim) are checked by the search collection."""
        t = self.target_bits
        if not _is_number(t) or not 0 < t <= 32:
            raise ValueError(
                f"MPESearchConfig.target_bits={t!r}: expected stored bits per value in (0, 32] "
                "(32: fp32 rows; 0 would prune everything)"
            )
        narrowest = storable_bits(bits[0])
        if t < narrowest:
            raise ValueError(
                f"MPESearchConfig.target_bits={t!r} is below the narrowest candidate width "
                f"({bits[0]} bits, stored at {narrowest}, plus per-row metadata): no selection fits; "
                "add 0 (pruning) to candidate_bits or raise target_bits"
            )
        if self.reg_lambda <= 0:
            raise ValueError(
                "MPESearchConfig.reg_lambda must be > 0 with target_bits (it is where the dual "
                "ascent of lambda starts)"
            )


@dataclass(frozen=True)
class CodebookConfig(TransformConfig):
    """MEC (Wang et al.): tables of at least ``min_rows`` rows replaced by product-quantization
    codes, learned from the tables' current values weighted by the ``frequencies`` input of
    :func:`~torchrec_lowprec.convert` (feature -> per-id counts; none: every row weighs 1).

    Each table of at least ``min_rows`` rows is split into ``num_subspaces`` (L) column blocks;
    each block gets a codebook of ``codebook_size`` (K) codewords and every row stores one code
    per block. Rows are served as the concatenation of their L codewords.

    Args:
        num_subspaces: L, sub-codebooks per table (must divide each compressed table's dim).
        codebook_size: K, codewords per sub-codebook: a power of two, 2..65536 (codes are
            uint8 for K <= 256, else uint16).
        min_rows: tables with fewer rows are kept as they are (in their original module form).
        steps: optimisation steps of the code learner (0: k-means codes only).
        batch_size: rows per step.
        lr: Adam learning rate of the codebooks and the encoder.
        popularity: ``"count"`` (default) weighs a row's reconstruction error by ``1 + count``
            (the expected error over the training accesses: best test AUC in
            benchmarks/compression.py); ``"log"`` by ``1 + ln(1 + count)`` (the paper's log
            weighting, keeping unseen rows in); ``"uniform"`` weighs every row 1.
        commitment_weight: weight of ``||z - sg(c)||^2`` (VQ-VAE commitment: keeps the encoder
            output near its codeword).
        balance_weight: weight of the code-usage term ``log K - H(mean soft assignment)``.
        contrastive_weight: weight of the InfoNCE term against rows re-coded with a *different*
            random code in one sub-space.
        num_negatives: negatives per row of the contrastive term.
        temperature: softness of the assignments in the balance / contrastive terms, relative
            to the sub-space's mean squared distance.
        kmeans_iters: Lloyd iterations of the (popularity-weighted) k-means initialisation.
        init: ``"kmeans"`` or ``"random"`` (Gaussian codewords; for tests and ablations).
        refit: after learning, run Lloyd iterations on the rows themselves (nearest codeword,
            weighted mean) and serve nearest-codeword codes; ``False`` keeps the encoder's codes
            and the learned codebooks.
        seed: every random draw of the learner derives from it.

    Example::

        cfg = CodebookConfig(num_subspaces=4, codebook_size=256, min_rows=100_000)
        convert(model, cfg, frequencies=counts)
    """

    num_subspaces: int = 4
    codebook_size: int = 256
    min_rows: int = 10_000
    steps: int = 200
    batch_size: int = 1024
    lr: float = 5e-3
    popularity: str = "count"
    commitment_weight: float = 0.25
    balance_weight: float = 0.1
    contrastive_weight: float = 0.05
    num_negatives: int = 8
    temperature: float = 0.5
    kmeans_iters: int = 10
    init: str = "kmeans"
    refit: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.num_subspaces, int) or self.num_subspaces < 1:
            raise ValueError(
                f"CodebookConfig.num_subspaces={self.num_subspaces!r} must be an int >= 1 dividing the table dims"
            )
        if not isinstance(self.codebook_size, int) or not _power_of_two(self.codebook_size):
            raise ValueError(
                f"CodebookConfig.codebook_size={self.codebook_size!r} must be a power of two > 1 (e.g. 256); "
                "codes are stored in whole bits"
            )
        if self.codebook_size > 65536:
            raise ValueError(
                f"CodebookConfig.codebook_size={self.codebook_size} exceeds 65536 (uint16 codes); use fewer "
                "codewords or more sub-spaces"
            )
        for name in ("min_rows", "steps", "kmeans_iters"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"CodebookConfig.{name}={getattr(self, name)!r} must be an int >= 0")
        for name in ("batch_size", "num_negatives"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"CodebookConfig.{name}={getattr(self, name)!r} must be an int >= 1")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"CodebookConfig.lr={self.lr!r} must be finite and > 0")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"CodebookConfig.temperature={self.temperature!r} must be finite and > 0")
        for name in ("commitment_weight", "balance_weight", "contrastive_weight"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(
                    f"CodebookConfig.{name}={getattr(self, name)!r} must be finite and >= 0 (0 turns the term off)"
                )
        if self.popularity not in POPULARITY_WEIGHTINGS:
            raise ValueError(
                f"CodebookConfig.popularity={self.popularity!r} is not supported; allowed: {list(POPULARITY_WEIGHTINGS)}"
            )
        if self.init not in CODEBOOK_INITS:
            raise ValueError(
                f"CodebookConfig.init={self.init!r} is not supported; allowed: {list(CODEBOOK_INITS)}"
            )

    def check_dim(self, table: str, dim: int) -> None:
        """Raise ``ValueError`` if table ``table`` of dim ``dim`` cannot be split into L blocks."""
        if dim % self.num_subspaces != 0:
            divisors = [d for d in range(1, dim + 1) if dim % d == 0]
            raise ValueError(
                f"CodebookConfig.num_subspaces={self.num_subspaces} does not divide embedding_dim={dim} of table "
                f"{table!r}; choose one of {divisors} (or raise min_rows to keep that table uncompressed)"
            )


@dataclass(frozen=True)
class InferenceConfig(TransformConfig):
    """Export: low-precision collections -> TorchRec's quantized inference
    ``EmbeddingBagCollection`` / ``EmbeddingCollection`` holding the same bytes; the model is
    put in eval mode.
    ``output_dtype`` (``"float32"`` or ``"float16"``, or the torch dtype) ``None`` is fp32;
    ``row_alignment`` ``None`` is the device's.

    Example::

        served = convert(trained_model, InferenceConfig(output_dtype="float16"))
    """

    output_dtype: str | None = None
    row_alignment: int | None = None
    register_tbes: bool = False

    def __post_init__(self) -> None:
        if self.output_dtype is not None and not isinstance(self.output_dtype, str):
            # a torch.dtype: kept by name so the config stays plain data
            object.__setattr__(self, "output_dtype", str(self.output_dtype).removeprefix("torch."))
        if self.output_dtype not in (None, "float32", "float16"):
            raise ValueError(
                f"InferenceConfig.output_dtype={self.output_dtype!r} must be 'float32' or 'float16' (or None)"
            )
        if self.row_alignment is not None and (
            isinstance(self.row_alignment, bool)
            or not isinstance(self.row_alignment, int)
            or self.row_alignment < 1
        ):
            raise ValueError(
                f"InferenceConfig.row_alignment={self.row_alignment!r} must be an int >= 1 or None"
            )


#: Old names, kept one release with a DeprecationWarning.
_DEPRECATED = {"MECConfig": "CodebookConfig"}


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        warn_deprecated(f"torchrec_lowprec.configs.{name}", f"{_DEPRECATED[name]} (the same fields)")
        return globals()[_DEPRECATED[name]]
    raise AttributeError(f"module 'torchrec_lowprec.configs' has no attribute {name!r}")
