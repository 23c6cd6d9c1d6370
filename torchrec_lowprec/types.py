"""The two tables every layer reads (no torch or torchrec import): storage formats and
optimizer kinds.

A storage width or a fused optimizer is *one entry here* (plus its kernels): the modules,
the planner, export, the CLI and the kernels derive everything else from these tables, and
``tests/test_catalog.py`` checks that each of them agrees with every entry. TorchRec's and
FBGEMM's own enums are named by member (``DataType.INT4``, ``SparseType.INT4``,
``EmbOptimType.EXACT_ROWWISE_ADAGRAD``) and resolved where torch is loaded
(``modules/data_type.py``, ``kernels/lookup.py``), so this module stays importable by the CLI.

Example::

    from torchrec_lowprec.types import FORMATS, OPTIMIZERS, OptimizerType
    FORMATS[4].data_type                              # "INT4"
    OPTIMIZERS[OptimizerType.ADAM].state_names        # ("momentum1", "momentum2")
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from enum import Enum
from typing import Any

from torchrec_lowprec._deprecation import warn_deprecated


@dataclass(frozen=True)
class StorageFormat:
    """How rows of one width are stored.

    Args:
        bits: the width (0: pruned, rows read as zeros and store nothing).
        data_type: TorchRec ``DataType`` member name (``None``: no TorchRec type).
        sparse_type: FBGEMM ``SparseType`` member name (``None``: no FBGEMM type).
        integer: codes times a per-row fp16 scale with an fp16 bias (FBGEMM's IntNBit row);
            otherwise plain floats.
        trainable: a :class:`~torchrec_lowprec.configs.LowPrecisionConfig` width (a whole
            table trains at it).
        plannable: a width a precision plan may give a row group.
    """

    bits: int
    data_type: str | None
    sparse_type: str | None
    integer: bool
    trainable: bool
    plannable: bool


#: Every width, widest first. Adding one (e.g. fp8 rows) is an entry here plus its kernels.
FORMATS: dict[int, StorageFormat] = {
    32: StorageFormat(32, "FP32", "FP32", integer=False, trainable=True, plannable=True),
    16: StorageFormat(16, "FP16", "FP16", integer=False, trainable=True, plannable=True),
    8: StorageFormat(8, "INT8", "INT8", integer=True, trainable=True, plannable=True),
    4: StorageFormat(4, "INT4", "INT4", integer=True, trainable=True, plannable=True),
    2: StorageFormat(2, "INT2", "INT2", integer=True, trainable=True, plannable=True),
    0: StorageFormat(0, None, None, integer=False, trainable=False, plannable=True),
}

#: Widths a table can be stored and trained at.
SUPPORTED_BITS = tuple(b for b, f in FORMATS.items() if f.trainable)
#: Widths a precision plan may give a row group (0 = pruned).
PLAN_BITS = tuple(sorted(b for b, f in FORMATS.items() if f.plannable))
#: Integer (IntNBit) widths and float widths among the stored ones.
INT_BITS = tuple(b for b, f in FORMATS.items() if f.integer)
FLOAT_BITS = tuple(b for b, f in FORMATS.items() if f.trainable and not f.integer)


#: Widths the MPE search can fake-quantize; those the storage lacks (1, 3, 5, 6, 7) are stored
#: at the next wider plannable width (:func:`storable_bits`).
SEARCH_BITS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 16, 32)


def storable_bits(bits: int) -> int:
    """The narrowest plannable width holding ``bits`` (a searched width -> its stored width)."""
    return min(b for b in PLAN_BITS if b >= bits)


#: Row padding in bytes, by compute device type: FBGEMM pads rows to 16 bytes on CUDA (and
#: TorchRec's other HBM devices) for vector loads, not on CPU. Devices absent here pad to 1.
ROW_ALIGNMENT: dict[str, int] = {"cuda": 16, "mtia": 16, "cpu": 1}
#: Compute devices whose tables TorchRec places in HBM (others: DDR).
HBM_DEVICES = ("cuda", "mtia")


def row_alignment(device_type: str) -> int:
    """Bytes each stored row is padded to on ``device_type`` (``"cuda"``, ``"cpu"``, ...)."""
    return ROW_ALIGNMENT.get(device_type, 1)


class OptimizerType(str, Enum):
    """The fused sparse optimizers a low-precision table can run in its backward pass."""

    SGD = "sgd"
    ADAGRAD = "adagrad"
    ROWWISE_ADAGRAD = "rowwise_adagrad"
    ADAM = "adam"


@dataclass(frozen=True)
class OptimizerKind:
    """One fused optimizer: how the kernels, the state and TorchRec's spellings name it.

    Args:
        kind: the :class:`OptimizerType`.
        code: the integer the kernels switch on (C++, Triton and the reference agree).
        state: ``(name, per-row floats, per-dimension floats)`` of each fp32 state tensor, in
            the kernels' ``(state1, state2)`` order: RowWiseAdagrad ``momentum1`` is 1 float a
            row, Adam's two moments D each.
        uses: the hyper-parameters its update reads (FBGEMM's names).
        class_names: lower-cased in-backward optimizer class names (torch.optim, torchrec.optim).
        emb_opt_types: FBGEMM ``EmbOptimType`` values (as TorchRec writes them in ``fused_params``).
    """

    kind: OptimizerType
    code: int
    state: tuple[tuple[str, int, int], ...]
    uses: frozenset[str]
    class_names: tuple[str, ...]
    emb_opt_types: tuple[str, ...]

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.state)

    def state_floats(self, dim: int) -> int:
        """fp32 values of state per row of ``dim``."""
        return sum(per_row + per_dim * dim for _, per_row, per_dim in self.state)


_LR_WD = frozenset({"learning_rate", "weight_decay"})

#: Every fused optimizer. Adding one is an entry here plus its kernel branch (kernels/spec.py).
OPTIMIZERS: dict[OptimizerType, OptimizerKind] = {
    OptimizerType.SGD: OptimizerKind(
        OptimizerType.SGD, 0, (), _LR_WD, ("sgd",), ("sgd", "exact_sgd")
    ),
    OptimizerType.ADAGRAD: OptimizerKind(
        OptimizerType.ADAGRAD, 1, (("momentum1", 0, 1),), _LR_WD | {"eps"}, ("adagrad",), ("exact_adagrad",)
    ),
    OptimizerType.ROWWISE_ADAGRAD: OptimizerKind(
        OptimizerType.ROWWISE_ADAGRAD, 2, (("momentum1", 1, 0),), _LR_WD | {"eps"},
        ("rowwiseadagrad",), ("exact_row_wise_adagrad", "row_wise_adagrad"),
    ),
    OptimizerType.ADAM: OptimizerKind(
        OptimizerType.ADAM, 3, (("momentum1", 0, 1), ("momentum2", 0, 1)),
        _LR_WD | {"eps", "beta1", "beta2"}, ("adam",), ("adam",),
    ),
}  # fmt: skip


def optimizer_kind(optimizer: object) -> OptimizerKind:
    """The entry of ``optimizer`` (an :class:`OptimizerType` or its value)."""
    try:
        return OPTIMIZERS[OptimizerType(getattr(optimizer, "value", optimizer))]
    except ValueError:
        raise ValueError(
            f"unknown optimizer {optimizer!r}; known: {[o.value for o in OptimizerType]}"
        ) from None


#: Names that lived here before the configs moved to ``torchrec_lowprec.configs`` and the plan
#: schema to ``torchrec_lowprec.planner.schema``: still importable for one release, with a
#: DeprecationWarning.
_MOVED = {
    **{
        n: "torchrec_lowprec.configs"
        for n in (
            "TransformConfig", "LowPrecisionConfig", "PerTableConfig", "MixedPrecisionConfig",
            "CodebookConfig", "InferenceConfig", "MPESearchConfig", "MECConfig",
            "ROUNDING_MODES", "STEP_SIZE_INITS", "BOUNDS_CHECK_MODES",
        )
    },
    "OptimizerParams": "torchrec_lowprec.kernels.spec",
    **{n: "torchrec_lowprec.planner.schema" for n in ("TablePrecision", "PrecisionPlan", "PLAN_FORMAT", "PLAN_VERSION")},
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warn_deprecated(f"torchrec_lowprec.types.{name}", f"{_MOVED[name]}.{name}")
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'torchrec_lowprec.types' has no attribute {name!r}")
