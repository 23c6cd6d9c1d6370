"""The description of a delimited text file of CTR rows, and the numeric transforms it names.

A :class:`TabularSchema` says which column is the label, which are numeric ("dense") and
which categorical (one value, or several split on a separator), the delimiter and whether
line 1 is a header. Columns are named (header names, or ``columns`` for a headerless file)
or given by 0-based index. Criteo is one such schema (:func:`torchrec_lowprec.data.criteo.criteo_schema`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from .._yaml import excerpt, load_document

INT_FEATURE_MODES = ("dense", "categorical")
DENSE_PARSERS = ("int", "float")
#: Most columns a schema lists per key, and the bound of a 0-based column index.
MAX_COLUMNS = 10_000

Column = str | int


def log1p_clamped(x: np.ndarray) -> np.ndarray:
    """DLRM's dense transform ``log(1 + max(x, 0))`` (float64)."""
    return np.log1p(np.maximum(np.asarray(x, dtype=np.float64), 0.0))


def log_squared_bucket(x: float) -> int:
    """The papers' numeric bucket: ``floor(ln(x)**2)`` for ``x > 2``, else ``floor(x)``.

    Buckets of large values share ids with small raw values (``3 -> 1``), as in the
    reference preprocessing.
    """
    if x > 2:
        return int(math.floor(math.log(x) ** 2))
    return int(math.floor(x))


def _columns(value, name: str) -> tuple[Column, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, int)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"TabularSchema.{name}: expected a list of columns, got {excerpt(value)}")
    if len(value) > MAX_COLUMNS:
        raise ValueError(f"TabularSchema.{name} lists {len(value)} columns; at most {MAX_COLUMNS}")
    out = tuple(value)
    for c in out:
        if not isinstance(c, (str, int)) or isinstance(c, bool):
            raise ValueError(f"TabularSchema.{name}: columns are names or 0-based indices, got {excerpt(c)}")
        if isinstance(c, int) and not 0 <= c < MAX_COLUMNS:
            raise ValueError(f"TabularSchema.{name}: column index {excerpt(c)} is outside [0, {MAX_COLUMNS})")
    return out


def _finite_number(value: object, name: str) -> float:
    """``value`` as a finite float (a number, or a string such as ``"1e3"`` that reads as one)."""
    try:
        ok = not isinstance(value, bool) and isinstance(value, (int, float, str, np.number))
        number = float(value) if ok else math.nan
    except (ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(
            f"TabularSchema.{name} must be a finite number, e.g. 0 or -1 (nan, inf and words are "
            f"refused), got {excerpt(value)}"
        )
    return number


@dataclass(frozen=True)
class TabularSchema:
    """Which columns of a CSV/TSV file are the label, dense and categorical features.

    Args:
        label: the label column (0/1, or any number).
        dense: numeric columns. With ``int_features="dense"`` they become the dense features
            (``log(1+max(x,0))``); with ``"categorical"`` each becomes a categorical feature
            whose value is :func:`log_squared_bucket` of the number.
        categorical: single-valued categorical columns (the raw string is the value; an
            empty field is the value ``""``).
        multi_valued: ``{column: separator}``: categorical columns holding a list of values
            (an empty field is an empty bag).
        delimiter: the field separator.
        header: whether line 1 of every file holds the column names.
        columns: names of a headerless file's columns; also fixes the column count.
        dense_parse: ``"int"`` (a non-integer is a malformed row) or ``"float"``.
        missing_dense: the value of an empty numeric field (a finite number; nan/inf are refused).
        name: a label for messages and saved vocabularies.

    Example::

        avazu = TabularSchema(label="click", categorical=("site_id", "app_id", "C1"),
                              multi_valued={"tags": "|"}, delimiter=",", header=True)
        schema = TabularSchema.from_file("avazu.yaml")
    """

    label: Column
    dense: tuple[Column, ...] = ()
    categorical: tuple[Column, ...] = ()
    multi_valued: dict[Column, str] = field(default_factory=dict)
    delimiter: str = ","
    header: bool = True
    columns: tuple[str, ...] | None = None
    int_features: str = "dense"
    dense_parse: str = "float"
    missing_dense: float = 0.0
    name: str = "tabular"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "dense", _columns(self.dense, "dense"))
        set_(self, "categorical", _columns(self.categorical, "categorical"))
        if self.columns is not None:
            names = self.columns if isinstance(self.columns, (list, tuple)) else [self.columns]
            if len(names) > MAX_COLUMNS or not all(isinstance(c, (str, int)) for c in names):
                raise ValueError(
                    f"TabularSchema.columns must be a list of at most {MAX_COLUMNS} names, got {excerpt(self.columns)}"
                )
            set_(self, "columns", tuple(str(c) for c in names))
        if not isinstance(self.multi_valued or {}, dict) or len(self.multi_valued or {}) > MAX_COLUMNS:
            raise ValueError(
                f"TabularSchema.multi_valued must be a mapping {{column: separator}} of at most {MAX_COLUMNS} "
                f"columns, got {excerpt(self.multi_valued)}"
            )
        mv = dict(self.multi_valued or {})
        for col, sep in mv.items():
            _columns(col, "multi_valued")
            if not isinstance(sep, str) or not sep:
                raise ValueError(
                    f"TabularSchema.multi_valued[{excerpt(col)}] needs a non-empty separator string"
                )
        set_(self, "multi_valued", mv)
        if not isinstance(self.label, (str, int)) or isinstance(self.label, bool):
            raise ValueError(
                f"TabularSchema.label: one column name or 0-based index, got {excerpt(self.label)}"
            )
        _columns(self.label, "label")
        set_(self, "missing_dense", _finite_number(self.missing_dense, "missing_dense"))
        if self.int_features not in INT_FEATURE_MODES:
            raise ValueError(
                f"TabularSchema.int_features must be one of {INT_FEATURE_MODES}, got {excerpt(self.int_features)}"
            )
        if self.dense_parse not in DENSE_PARSERS:
            raise ValueError(
                f"TabularSchema.dense_parse must be one of {DENSE_PARSERS}, got {excerpt(self.dense_parse)}"
            )
        if not isinstance(self.delimiter, str) or not self.delimiter:
            raise ValueError("TabularSchema.delimiter must be a non-empty string")
        if not (self.categorical or self.multi_valued or self.dense):
            raise ValueError("TabularSchema names no feature columns (dense, categorical or multi_valued)")
        used = [self.label, *self.dense, *self.categorical, *self.multi_valued]
        if len(set(used)) != len(used):
            raise ValueError(f"TabularSchema uses a column twice: {excerpt(used)}")
        if not self.header and self.columns is None and any(isinstance(c, str) for c in used):
            raise ValueError(
                "TabularSchema names columns but the file has no header: give `columns` "
                "(the names in file order) or refer to columns by 0-based index"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dense"], d["categorical"] = list(self.dense), list(self.categorical)
        d["columns"] = list(self.columns) if self.columns is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "schema") -> TabularSchema:
        """Build from a plain dict (as loaded from YAML/JSON); unknown keys are an error."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: a schema is a mapping of keys to values, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = [k for k in d if k not in known]
        if unknown:
            raise ValueError(f"{source}: unknown schema keys {excerpt(unknown)}; known keys: {sorted(known)}")
        if "label" not in d:
            raise ValueError(f"{source}: the schema needs a `label` column")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TabularSchema:
        """Load a schema from a ``.yaml``/``.yml`` or ``.json`` file."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"schema file {path} does not exist: write one (see TabularSchema's keys)"
            )
        # At most 4 MiB, no YAML aliases (torchrec_lowprec._yaml); JSON for a .json path.
        d = load_document(path, "schema file", "json" if path.endswith(".json") else "yaml")
        return cls.from_dict(d, source=path)

    def save(self, path: str | os.PathLike) -> None:
        """Write the schema as JSON (or YAML for a ``.yaml``/``.yml`` path)."""
        from .common import atomic_write_bytes

        path = os.fspath(path)
        if path.endswith((".yaml", ".yml")):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=1)
        atomic_write_bytes(path, text.encode("utf-8"))
