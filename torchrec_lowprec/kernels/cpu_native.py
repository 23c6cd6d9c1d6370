"""The native CPU fused update (``kernels/cpu/fused_update.cpp``), built on first use.

The extension is compiled with ``torch.utils.cpp_extension.load`` into a cache directory
``$TORCHREC_LOWPREC_EXT_DIR/ext-<hash>`` (default ``~/.cache/torchrec_lowprec/ext-<hash>``),
the hash covering the source text, the compile flags, the torch and Python versions and the
CPU (the build uses ``-march=native``). A file lock serialises concurrent builds.

``is_available()`` tries the build/load once and remembers a failure (no compiler, no
ninja, ...); ``load_error()`` tells why. ``python -m torchrec_lowprec.kernels.cpu_native
--build`` (or :func:`build`) builds it ahead of time and prints the path of the library
(``make setup`` runs it). A process that has to build it, or waits on the file lock while
another one builds it, says so on stderr (``building the native update kernel, once, about a
minute``), so the first step of a cold run is not a silent stall; a training script calls
:func:`ensure_built` before it starts its clock so that the build is not counted as training
time.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

from torchrec_lowprec.kernels.spec import TableUpdate

SOURCE = Path(__file__).resolve().parent / "cpu" / "fused_update.cpp"
#: Every C++ source of the extension (``SOURCE`` holds the Python bindings).
SOURCES = (SOURCE, SOURCE.parent / "pooled_lookup.cpp")
#: Headers they include (part of the build hash; not compiled on their own).
HEADERS = (SOURCE.parent / "half.h", SOURCE.parent / "prefetch.h")
#: ``-ffp-contract=off`` and no fast-math: every fp32 op must round like PyTorch's
#: (``-fno-trapping-math`` changes no value; it lets GCC vectorise the clamp/select loops).
CFLAGS = ("-O3", "-ffp-contract=off", "-fno-trapping-math", "-march=native", "-fopenmp")
LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None
_tried = False


def _cpuinfo() -> str:
    """The first CPU's ``model name`` and feature-flag lines of /proc/cpuinfo ("" elsewhere)."""
    lines = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    lines += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return lines


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the machine and its CPU feature flags."""
    return f"{platform.machine()}|{platform.processor()}|{_cpuinfo()}"


#: (name, /proc/cpuinfo flag) of the vector extensions a figure's machine is described by.
VECTOR_EXTENSIONS = (("AVX2", "avx2"), ("AVX-512F", "avx512f"), ("AVX-512-BF16", "avx512_bf16"),
                     ("AVX-512-FP16", "avx512_fp16"), ("AMX", "amx_tile"), ("F16C", "f16c"))  # fmt: skip


def _cpu_model_and_flags() -> tuple[str, set[str]]:
    """The first CPU's model name and feature flags (from /proc/cpuinfo where there is one)."""
    model, flags = platform.processor() or platform.machine(), set()
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        elif line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
    return model, flags


def cpu_vector_class() -> str:
    """``"avx512"``, ``"avx2"`` or ``"other"``: the widest x86 vector extension this CPU has
    (``-march=native`` builds, and the benchmark sections keyed by machine kind, differ by it)."""
    flags = _cpu_model_and_flags()[1]
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"


def cpu_description() -> str:
    """The machine a measurement came from, e.g. ``Intel(R) Xeon(R) Processor; vector
    extensions: AVX2, F16C; 2 logical cores (2 usable)`` (benchmark sections, the demo table)."""
    model, flags = _cpu_model_and_flags()
    ext = [name for name, flag in VECTOR_EXTENSIONS if flag in flags]
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return (
        f"{model}; vector extensions: {', '.join(ext) or 'none of AVX2/AVX-512/AMX'}; "
        f"{cores} logical cores ({usable} usable)"
    )


def build_hash() -> str:
    """Short hash of everything the built library depends on."""
    h = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        h.update(source.read_bytes())
    for part in (
        " ".join(CFLAGS),
        " ".join(LDFLAGS),
        torch.__version__,
        f"{sys.version_info.major}.{sys.version_info.minor}",
        _cpu_id(),
    ):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:12]


def build_dir() -> Path:
    """The cache directory of this build (created on demand)."""
    base = os.environ.get("TORCHREC_LOWPREC_EXT_DIR")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "torchrec_lowprec"
    return root / f"ext-{build_hash()}"


def _say(msg: str) -> None:
    """One line on stderr, prefixed with the rank when torch.distributed is up (or RANK is set)."""
    rank = os.environ.get("RANK")
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank = str(dist.get_rank())
    except Exception:  # noqa: BLE001 - the message must never fail the build
        pass
    prefix = f"[rank {rank}] " if rank is not None else ""
    print(f"{prefix}torchrec_lowprec: {msg}", file=sys.stderr, flush=True)


BUILD_MESSAGE = "building the native update kernel, once, about a minute"


def _build(verbose: bool = True) -> ModuleType:
    from torch.utils.cpp_extension import load

    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    name = f"torchrec_lowprec_cpu_{build_hash()}"
    lock_path = directory.parent / f"{directory.name}.lock"
    with open(lock_path, "a+") as lock_file:
        try:
            import fcntl
        except ImportError:  # not POSIX: rely on torch's own baton
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # Another process holds the lock: it is building (or loading) the library.
                if verbose and not (directory / f"{name}.so").exists():
                    _say(f"{BUILD_MESSAGE}: waiting for another process that is building it ({directory})")
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            # We hold the exclusive lock, so a baton file left there is stale (a build that
            # was killed); torch would wait on it forever.
            stale = directory / "lock"
            if stale.exists():
                stale.unlink()
        try:
            built = directory / f"{name}.so"
            if built.exists():
                # The directory is keyed by a hash of everything the library depends on, so a
                # library there is current: import it without asking ninja (a different ninja
                # on PATH would otherwise trigger a full rebuild).
                return _import_built(name, built)
            if verbose:
                _say(f"{BUILD_MESSAGE} (cached in {directory})")
            # The venv's ninja (requirements) even when the venv is not activated.
            path = os.environ.get("PATH", "")
            os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + path
            try:
                return load(
                    name=name,
                    sources=[str(s) for s in SOURCES],
                    extra_cflags=list(CFLAGS),
                    extra_ldflags=list(LDFLAGS),
                    build_directory=str(directory),
                    verbose=False,
                )
            finally:
                os.environ["PATH"] = path
        finally:
            if fcntl is not None:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _import_built(name: str, path: Path) -> ModuleType:
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(verbose: bool = True) -> ModuleType:
    global _module, _error, _tried
    with _lock:
        if _module is not None:
            return _module
        if _tried and _error is not None:
            raise RuntimeError(f"the native CPU kernel is not available: {_error}")
        _tried = True
        try:
            _module = _build(verbose)
        except Exception as e:  # noqa: BLE001 - any failure means "not available"
            _error = f"{type(e).__name__}: {e}".strip()
            raise RuntimeError(f"the native CPU kernel is not available: {_error}") from e
        return _module


def is_available() -> bool:
    """Whether the extension builds and loads here (tried once per process)."""
    try:
        _load()
    except RuntimeError:
        return False
    return True


def load_error() -> str | None:
    """Why :func:`is_available` returned False (``None`` if it loaded or was not tried)."""
    return _error


def library_path() -> str:
    """Path of the built shared library (builds it if needed)."""
    return str(_load().__file__)


def build(verbose: bool = True) -> str:
    """Build (or find in the cache) and load the native kernel; return the library's path.

    Raises ``RuntimeError`` saying why when it cannot be built (no C++ compiler, no ninja).
    ``verbose`` prints what it does on stderr (see the module docstring). Example::

        path = build()  # ~1 min the first time on a machine, instant afterwards
    """
    return str(_load(verbose).__file__)


def ensure_built(device: torch.device | str | None = None) -> bool:
    """Build the update kernel of ``device`` now (CPU: this native kernel), so that a training
    loop can start its clock after it; returns whether the fast kernel is available.

    Call it before timing starts (the first step would otherwise include the build). A
    machine that cannot build it falls back to the reference later, with its own warning.
    Example::

        ensure_built()  # then: t0 = time.perf_counter(); train ...
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cpu":
        return True
    return is_available()


def fused_update(update: TableUpdate, grad: torch.Tensor, bounded: torch.Tensor | None = None) -> int:
    """The fused update of :mod:`torchrec_lowprec.kernels.spec`, in place, on CPU tensors.

    Same arguments and result as :func:`torchrec_lowprec.kernels.reference.reference_update`
    (the number of rows skipped for a non-finite gradient; ``bounded[0]`` counts the rows
    whose step hit ``max_step_size(bits)``), bit-identical to it.
    """
    ext = _load()
    spec = update.spec
    skipped, n_bounded = ext.fused_update(*update.tensors(grad), spec.float_args(), spec.int_args())
    if bounded is not None:
        bounded[0] += n_bounded
    return int(skipped)


def fused_update_many(
    updates: list[TableUpdate], grad: torch.Tensor, bounded: torch.Tensor | None = None
) -> list[int]:
    """:func:`fused_update` for many tables in one native call, all reading the same ``grad``.

    One parallel region groups the tables' occurrences (in parallel across tables), then
    updates the touched rows of all the tables from one shared work queue. The result (rows,
    step sizes, states, and the returned skipped-row count per table) is bit-identical to
    calling :func:`fused_update` once per item, in order. Tables must not share the memory
    they write (rows, step sizes, optimizer states): the call raises if they overlap.

    ``bounded[i]`` (optional int64 tensor) is increased by table ``i``'s rows whose step hit
    ``max_step_size(bits)``.

    Errors: bad arguments (dtypes, shapes, overlap) raise before anything is written. The
    ids / grad_offsets range check is made table by table, as the loop of single calls
    would: if table ``k`` fails it, tables ``0..k-1`` are updated, ``k`` and later are not,
    and the call raises for table ``k``.
    """
    if not updates:
        return []
    ext = _load()
    cols = tuple(list(c) for c in zip(*(u.tensors(grad)[:7] for u in updates)))
    specs = [u.spec for u in updates]
    counts, n_bounded = ext.fused_update_many(
        *cols, grad, [s.float_args() for s in specs], [s.int_args() for s in specs]
    )
    if bounded is not None:
        bounded += torch.tensor(n_bounded, dtype=bounded.dtype)
    return [int(k) for k in counts]


def pooled_lookup(
    weights: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    table_offsets: list[int],
    bits: list[int],
    dims: list[int],
    rows: list[int],
    row_alignment: int,
    mean: bool,
    per_sample_weights: torch.Tensor | None,
) -> torch.Tensor:
    """``[B, sum(dims)]`` fp32 pooled embeddings, bit-identical to FBGEMM's CPU IntNBit lookup
    on the same buffer, but parallel over bags (FBGEMM 1.8 runs its tables on one thread).

    Feature ``t`` reads ``rows[t]`` rows of ``bits[t]`` (2/4/8/16/32) x ``dims[t]`` at byte
    ``table_offsets[t]`` of ``weights``; ``offsets`` has ``T * B + 1`` entries, key-major. An
    id outside its table raises ``IndexError`` (callers check ids first).
    """
    return _load().pooled_lookup(
        weights, indices, offsets, table_offsets, bits, dims, rows, row_alignment, mean, per_sample_weights
    )


def sequence_lookup(
    weights: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    table_offsets: list[int],
    bits: list[int],
    dims: list[int],
    rows: list[int],
    row_alignment: int,
) -> torch.Tensor:
    """``[N, dim]`` fp32, one row per id (FBGEMM's ``PoolingMode.NONE``): :func:`pooled_lookup`'s
    arguments, all ``dims`` equal, no pooling or weights; parallel over bags."""
    return _load().sequence_lookup(weights, indices, offsets, table_offsets, bits, dims, rows, row_alignment)


def count_out_of_range(values: torch.Tensor, lengths: torch.Tensor, rows: list[int], batch: int) -> int:
    """How many of ``values`` lie outside ``[0, rows[t])`` of their feature ``t`` (one pass)."""
    return int(_load().count_out_of_range(values, lengths, rows, batch))


def kjt_length_stats(
    lengths: torch.Tensor, offsets: torch.Tensor | None, num_keys: int
) -> tuple[int, int, int, int, int, list[int]]:
    """A KJT's lengths (key-major, ``num_keys`` x batch) in one pass: ``(smallest length, its
    first position, sum, offsets[0], offsets[-1], per-key sums)``; no ``offsets``: ``0`` and
    the sum in their places. CPU tensors: read in place, no tensor-to-host copy."""
    empty = torch.empty(0, dtype=torch.int64)
    low, low_at, total, first, last, per_key = _load().kjt_length_stats(
        lengths, offsets if offsets is not None else empty, num_keys
    )
    return low, low_at, total, first, last, list(per_key)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m torchrec_lowprec.kernels.cpu_native")
    parser.add_argument("--build", action="store_true", help="build the extension and print its path")
    args = parser.parse_args(argv)
    if not args.build:
        parser.print_help()
        return 0
    try:
        path = build(verbose=True)
    except RuntimeError:
        print(f"building the native CPU kernel failed: {load_error()}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
