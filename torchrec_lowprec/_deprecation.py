"""The one way an old spelling warns (no torch import).

Every message starts with ``torchrec_lowprec:``; the test suite turns exactly those
DeprecationWarnings into errors (pyproject.toml ``filterwarnings``), so nothing in this
project calls an old spelling unless a test expects the warning.
"""

from __future__ import annotations

import warnings

#: The release that removes what is deprecated now.
REMOVED_IN = "0.2"


def warn_deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``old`` is deprecated in favour of ``new`` (``stacklevel`` 3: the caller of
    the function that calls this)."""
    warnings.warn(
        f"torchrec_lowprec: {old} is deprecated and will be removed in {REMOVED_IN}; use {new}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
