"""Progress of the library's long operations (MEC compression, frequency/vocabulary passes, MPE search).

A tqdm bar on stderr when stderr is a terminal (and tqdm is installed), and a ``logging`` record
on the ``torchrec_lowprec`` logger when the operation ends. ``TORCHREC_LOWPREC_PROGRESS=0``
turns the bars off, ``=1`` shows them even when stderr is not a terminal (e.g. a log file).
No torch import.

Example::

    from torchrec_lowprec.progress import progress
    for table in progress(tables, "MEC: learning codebooks", unit="table"):
        ...
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("torchrec_lowprec")
ENV = "TORCHREC_LOWPREC_PROGRESS"


def mode() -> str:
    """``"off"``, ``"on"`` or ``"auto"`` (a bar only on a terminal), from ``$TORCHREC_LOWPREC_PROGRESS``."""
    v = os.environ.get(ENV, "").strip().lower()
    if v in ("0", "off", "false", "no"):
        return "off"
    if v in ("1", "on", "true", "yes"):
        return "on"
    return "auto"


def bars_enabled() -> bool:
    """Whether :func:`progress` draws a bar here."""
    m = mode()
    return m == "on" or (m == "auto" and sys.stderr.isatty())


def progress(
    items: Iterable[T], desc: str, total: int | None = None, unit: str = "it", enabled: bool = True
) -> Iterator[T]:
    """Yield ``items`` with a progress bar (see the module doc); ``enabled=False``: none."""
    t0 = time.perf_counter()
    n = 0
    bar = None
    if enabled and bars_enabled():
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            if total is None and hasattr(items, "__len__"):
                total = len(items)  # type: ignore[arg-type]
            bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        for item in items:
            yield item
            n += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    log.info("%s: %d %s in %.1f s", desc, n, unit, time.perf_counter() - t0)


def note(message: str) -> None:
    """A one-line status of a long step without iterations (stderr when bars are on; always logged)."""
    log.info(message)
    if bars_enabled():
        print(f"torchrec_lowprec: {message}", file=sys.stderr, flush=True)
