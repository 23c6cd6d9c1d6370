"""Make the packages named in ``GPU_CHECK_HIDE`` look uninstalled (the GPU check's dry run).

``scripts/gpu_check.py`` puts this folder first on ``PYTHONPATH`` of its child processes when
``GPU_CHECK_HIDE=fbgemm_gpu,torchrec`` (comma-separated top-level module names) is set, so
the dry run behaves as on a GPU image without those packages: ``import torchrec`` raises
``ModuleNotFoundError``, ``importlib.util.find_spec("torchrec")`` returns ``None`` and
``importlib.metadata`` finds no distribution whose normalised name starts with a hidden name
(``fbgemm_gpu`` hides ``fbgemm-gpu-cpu`` too). It wraps every finder on ``sys.meta_path``
(after the ``.pth`` files have run, so editable-install finders are wrapped too) instead of
mocking the packages: nothing of theirs is loaded at all.

Python imports the first ``sitecustomize`` on ``sys.path``; this one then runs the next one
on the path, if any, so a site's own ``sitecustomize`` still applies.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import sys
from typing import Any

HIDDEN = tuple(m.strip() for m in os.environ.get("GPU_CHECK_HIDE", "").split(",") if m.strip())


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def is_hidden(module: str) -> bool:
    """Whether ``module`` (dotted) is a hidden package or inside one."""
    return module.split(".", 1)[0] in HIDDEN


class _Hiding:
    """A ``sys.meta_path`` finder that answers ``None`` for hidden modules and otherwise
    defers to the finder it wraps (``find_spec`` and ``find_distributions``)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if is_hidden(name) or not hasattr(self.inner, "find_spec"):
            return None
        return self.inner.find_spec(name, path, target)

    def find_distributions(self, *args: Any, **kwargs: Any) -> Any:
        find = getattr(self.inner, "find_distributions", None)
        if find is None:
            return iter(())
        hidden = tuple(_norm(h) for h in HIDDEN)
        return (d for d in find(*args, **kwargs) if not _norm(d.metadata["Name"] or "").startswith(hidden))

    def invalidate_caches(self) -> None:
        if hasattr(self.inner, "invalidate_caches"):
            self.inner.invalidate_caches()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def install() -> None:
    """Wrap every finder on ``sys.meta_path`` and drop hidden modules already imported."""
    if not HIDDEN:
        return
    sys.meta_path[:] = [f if isinstance(f, _Hiding) else _Hiding(f) for f in sys.meta_path]
    for name in [m for m in sys.modules if is_hidden(m)]:
        del sys.modules[name]


def _chain_next_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if not entry or os.path.abspath(entry) == here:
            continue
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [entry])
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return


install()
_chain_next_sitecustomize()
