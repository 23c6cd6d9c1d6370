"""Checks of the installed torch / torchrec / fbgemm-gpu against the versions we test.

Cheap (package metadata only, nothing imported) and run once, when the first module that
needs TorchRec is imported (``torchrec_lowprec.modules``). A version outside the tested range
warns; a combination known not to load raises ``ImportError``. ``TORCHREC_LOWPREC_SKIP_VERSION_CHECK=1``
turns both off.

Example::

    from torchrec_lowprec._versions import installed_versions
    installed_versions()  # {'torch': '2.13.0+cpu', 'torchrec': '1.8.0', 'fbgemm_gpu': '1.8.0 (fbgemm-gpu-cpu)'}
"""

from __future__ import annotations

import os
import re
import warnings
from importlib import metadata

#: distribution -> (lowest tested, first untested) major.minor; kept in step with pyproject.toml.
SUPPORTED = {"torch": ((2, 13), (2, 14)), "torchrec": ((1, 8), (1, 9)), "fbgemm_gpu": ((1, 8), (1, 9))}
#: an fbgemm-gpu release is compiled against one torch minor (its ops fail to register on another).
FBGEMM_TORCH = {(1, 8): (2, 13)}
FBGEMM_DISTS = (
    "fbgemm-gpu",
    "fbgemm-gpu-cpu",
    "fbgemm-gpu-genai",
    "fbgemm-gpu-nightly",
    "fbgemm-gpu-nightly-cpu",
)
INSTALL_HINT = (
    "supported: torch 2.13.x, torchrec 1.8.x, fbgemm-gpu 1.8.x (CUDA) or fbgemm-gpu-cpu 1.8.x (CPU); "
    "see the README's 'pip install' section"
)

_checked = False


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def installed_versions() -> dict[str, str | None]:
    """Versions of the stack as installed (``None`` where a package is missing)."""
    fbgemm = None
    for d in FBGEMM_DISTS:
        v = _dist_version(d)
        if v is not None:
            fbgemm = f"{v} ({d})"
            break
    return {"torch": _dist_version("torch"), "torchrec": _dist_version("torchrec"), "fbgemm_gpu": fbgemm}


def _major_minor(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def problems(versions: dict[str, str | None]) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` for a ``{name: version}`` map like :func:`installed_versions`'s."""
    errors, warns = [], []
    mm = {k: _major_minor(v) if v else None for k, v in versions.items()}
    for name, (lo, hi) in SUPPORTED.items():
        v = mm.get(name)
        if v is not None and not lo <= v < hi:
            warns.append(f"{name} {versions[name]} is outside the tested range {lo[0]}.{lo[1]}.x")
    if mm.get("torchrec") and mm.get("fbgemm_gpu") and mm["torchrec"] != mm["fbgemm_gpu"]:
        errors.append(
            f"torchrec {versions['torchrec']} with fbgemm-gpu {versions['fbgemm_gpu']}: torchrec needs the "
            "fbgemm-gpu release of its own version"
        )
    want = FBGEMM_TORCH.get(mm.get("fbgemm_gpu") or (0, 0))
    if want is not None and mm.get("torch") and mm["torch"] != want:
        errors.append(
            f"fbgemm-gpu {versions['fbgemm_gpu']} is built for torch {want[0]}.{want[1]}, "
            f"not torch {versions['torch']}"
        )
    return errors, warns


def check_versions() -> None:
    """Warn about untested versions, raise ``ImportError`` for known-broken combinations (once)."""
    global _checked
    if _checked or os.environ.get("TORCHREC_LOWPREC_SKIP_VERSION_CHECK", "") not in ("", "0"):
        return
    _checked = True
    errors, warns = problems(installed_versions())
    if warns:
        warnings.warn(
            "torchrec_lowprec: " + "; ".join(warns) + f" ({INSTALL_HINT})", RuntimeWarning, stacklevel=3
        )
    if errors:
        raise ImportError(
            "torchrec_lowprec: " + "; ".join(errors) + f" ({INSTALL_HINT}; "
            "TORCHREC_LOWPREC_SKIP_VERSION_CHECK=1 skips this check)"
        )
