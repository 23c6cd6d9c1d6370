"""Writing one benchmark's results into its own section of docs/benchmarks.md."""

from __future__ import annotations

import os
import re

from torchrec_lowprec.files import atomic_write_bytes


def write_section(path: str, key: str, title: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- key:start -->`` and ``<!-- key:end -->``.

    Written to a temporary file and renamed, so an interrupted run never leaves half a file.
    """
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n## {title}\n\n{body.rstrip()}\n{end}"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = (
        pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    )
    atomic_write_bytes(path, text.encode())


def publish(
    write_to: str | None, key: str, title: str, script: str, argv: list[str], lines: list[str]
) -> None:
    """Print a benchmark's section (led by the command that produced it) and, if ``write_to``
    names a markdown file, replace the section there."""
    body = f"Command: `python {script} {' '.join(argv)}`\n\n" + "\n".join(lines)
    print(body)
    if write_to:
        write_section(write_to, key, title, body)


# ----- the machine a figure comes from (printed in every generated section) -----


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def cpu_stat() -> tuple[int, int]:
    """``(total, steal)`` jiffies of all CPUs from /proc/stat (0, 0 where unreadable)."""
    for line in _read("/proc/stat").splitlines():
        if line.startswith("cpu "):
            vals = [int(v) for v in line.split()[1:]]
            return sum(vals), (vals[7] if len(vals) > 7 else 0)
    return 0, 0


def contention(start: tuple[int, int], end: tuple[int, int]) -> str:
    """Load average now and the CPU steal share between two :func:`cpu_stat` readings."""
    load = " ".join(_read("/proc/loadavg").split()[:3]) or "n/a"
    total, steal = end[0] - start[0], end[1] - start[1]
    share = f"{100.0 * steal / total:.1f}%" if total > 0 else "n/a"
    return f"load average (1/5/15 min) at the end {load}; CPU steal during the run {share}"


def machine_info(threads: int | None = None) -> list[str]:
    """Markdown lines naming the CPU, its vector extensions, cores, page setting, library
    versions and the commit, for the top of a generated benchmark section."""
    import platform
    import subprocess

    import torch

    info = _read("/proc/cpuinfo")
    model, flags = platform.processor() or platform.machine(), set()
    for line in info.splitlines():
        if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
            model = line.split(":", 1)[1].strip()
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            break
    ext = [n for n, f in (("AVX2", "avx2"), ("AVX-512F", "avx512f"), ("AVX-512-BF16", "avx512_bf16"),
                          ("AVX-512-FP16", "avx512_fp16"), ("AMX", "amx_tile"), ("F16C", "f16c")) if f in flags]  # fmt: skip
    thp = _read("/sys/kernel/mm/transparent_hugepage/enabled").strip() or "n/a"
    alloc = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    versions = [f"torch {torch.__version__}"]
    for mod in ("fbgemm_gpu", "torchrec"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except (ImportError, AttributeError):
            pass
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        commit = (commit + ("+uncommitted" if dirty else "")) or "n/a"
    except (OSError, subprocess.SubprocessError):
        commit = "n/a"
    cores = os.cpu_count() or 0
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return [
        f"Machine: {model}; vector extensions: {', '.join(ext) or 'none of AVX2/AVX-512/AMX'}; "
        f"{cores} logical cores ({avail} usable){f', {threads} threads per process' if threads else ''}; "
        f"transparent huge pages `{thp}`, torch allocator THP_MEM_ALLOC_ENABLE={alloc}.  ",
        f"Software: {', '.join(versions)}, Python {platform.python_version()}; commit {commit}.  ",
    ]
