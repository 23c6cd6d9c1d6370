"""The one reader of the small YAML/JSON files users write (``tables.yaml``, a ``TabularSchema``),
and the bounded excerpt every input error quotes. No torch import (the CLI reads with it).

A hand-written input must not cost more than its size suggests, so :func:`load_document`:

* refuses a file over ``max_bytes`` (:data:`MAX_DOCUMENT_BYTES`, 4 MiB) before reading it;
* refuses YAML anchors and aliases (``&name`` / ``*name``, merge keys ``<<: *name``): a 500-byte
  file of nested aliases ("billion laughs") would stand for billions of values;
* refuses collections nested deeper than :data:`MAX_DEPTH`;

each with one ``ValueError`` naming the file (and the line). Lengths and number ranges are the
caller's to check, before any work; messages quote values through :func:`excerpt`.
"""

from __future__ import annotations

import json
import os
import reprlib

#: Largest YAML/JSON input file read (bytes). A tables file of 10,000 tables is about 500 KiB.
MAX_DOCUMENT_BYTES = 4 << 20
#: Deepest nesting of lists/mappings (a tables file needs 3, a schema 2).
MAX_DEPTH = 20

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 60, 40, 60


def excerpt(value: object) -> str:
    """``repr(value)`` cut to about 200 characters at most, however large or nested the value
    (``[[1, 2, ...], ...]``), for error messages."""
    return _REPR.repr(value)


def _size(n: int) -> str:
    if n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


def _check_events(text: str, path: str, loader) -> None:
    """Refuse aliases, anchors and deep nesting from the parser's events, before anything is built."""
    import yaml

    depth = 0
    for ev in yaml.parse(text, Loader=loader):
        line = ev.start_mark.line + 1 if ev.start_mark is not None else "?"
        if isinstance(ev, yaml.AliasEvent):
            raise ValueError(
                f"{path}: line {line}: YAML alias *{excerpt(ev.anchor)[1:-1]} refused: aliases and "
                "anchors (&name, *name, <<: *name) are not supported in input files; write the values out"
            )
        if isinstance(ev, yaml.NodeEvent) and ev.anchor is not None:
            raise ValueError(
                f"{path}: line {line}: YAML anchor &{excerpt(ev.anchor)[1:-1]} refused: anchors and "
                "aliases (&name, *name) are not supported in input files; write the values out"
            )
        if isinstance(ev, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ValueError(f"{path}: line {line}: lists/mappings nested deeper than {MAX_DEPTH} levels")
        elif isinstance(ev, yaml.CollectionEndEvent):
            depth -= 1


def _json_depth_ok(text: str) -> bool:
    """Whether no bracket nests deeper than :data:`MAX_DEPTH` (brackets in strings count too: a
    conservative bound that a real tables file or schema never reaches)."""
    depth = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def read_text(path: str | os.PathLike, what: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> str:
    """The UTF-8 text of ``path`` if it has at most ``max_bytes``; ``FileNotFoundError`` /
    ``ValueError`` naming ``what`` and ``path`` otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            size = max(os.fstat(f.fileno()).st_size, len(data))
            raise ValueError(
                f"{path}: the {what} is {_size(size)}; a {what} may be at most {_size(max_bytes)} "
                "(is this the right file?)"
            )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: the {what} is not UTF-8 text (byte {e.start})") from None


def load_document(
    path: str | os.PathLike, what: str, syntax: str = "yaml", max_bytes: int = MAX_DOCUMENT_BYTES
) -> object:
    """The document at ``path``, read with the bounds above: ``syntax`` ``"yaml"`` (which reads
    JSON too) or ``"json"``. Plain lists, dicts, str, int, float, bool and None come back.

    Example::

        doc = load_document("tables.yaml", "tables file")
    """
    path = os.fspath(path)
    text = read_text(path, what, max_bytes)
    if syntax == "json":
        if not _json_depth_ok(text):
            raise ValueError(f"{path}: lists/objects nested deeper than {MAX_DEPTH} levels")
        try:
            return json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: cannot parse the {what}: not JSON ({excerpt(str(e))[1:-1]})") from None
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        _check_events(text, path, loader)  # ValueError of its own, not caught below
    except yaml.YAMLError as e:
        raise ValueError(_syntax_error(path, what, e)) from None
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as e:
        raise ValueError(_syntax_error(path, what, e)) from None
    except ValueError as e:  # a number too long to convert (Python's int digit limit)
        raise ValueError(
            f"{path}: the {what} holds a value that cannot be read ({excerpt(str(e))[1:-1]})"
        ) from None


def _syntax_error(path: str, what: str, e: Exception) -> str:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    return f"{path}: cannot parse the {what}: not YAML/JSON{where} ({excerpt(first)[1:-1]})"
