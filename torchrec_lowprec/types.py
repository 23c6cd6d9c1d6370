"""Configuration types shared by every layer (no torchrec import)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum

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


def _allowed(field: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"LowPrecisionConfig.{field}={value!r} is not supported; allowed: {list(allowed)}")


@dataclass(frozen=True)
class LowPrecisionConfig:
    """How a table is stored and trained.

    Args:
        bits: storage precision: 8, 4 or 2 (integer codes times a per-row step size, in
            FBGEMM's IntNBit row layout) or 16 / 32 (plain fp16 / fp32 rows).
        rounding: how updated rows are written back: ``"stochastic"`` (LPT-SR / ALPT;
            unbiased) or ``"nearest"`` (LPT-DR). For 16 bits, stochastic rounding to fp16.
        learn_step_size: ALPT: learn each row's step size with the LSQ gradient (an fp32
            master step of 4 bytes per row is then kept). ``False`` is LPT (fixed step).
        step_size_lr: learning rate of the step size (plain SGD on the LSQ gradient).
        step_size_init: ``"lsq"`` (``2*mean|w|/sqrt(Qp)``), ``"absmax"`` (``max|w|/Qp``) or
            a positive float used for every row.
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
    step_size_lr: float = 1e-4
    step_size_init: str | float = "lsq"
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
        elif not self.step_size_init > 0:
            raise ValueError(
                f"LowPrecisionConfig.step_size_init={self.step_size_init!r} must be 'lsq', 'absmax' or a float > 0"
            )
        for name in ("learning_rate", "step_size_lr", "weight_decay", "eps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"LowPrecisionConfig.{name}={v!r} must be a number >= 0")
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
