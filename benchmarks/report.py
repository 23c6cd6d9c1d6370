"""Writing one benchmark's results into its own section of docs/benchmarks.md."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence

from torchrec_lowprec.files import atomic_write_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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

#: Machine kind (``cpu_native.cpu_vector_class()``, or ``"cuda"``) -> (section key suffix, title
#: words): a timing benchmark keeps one section per kind, so a run on one machine kind never
#: replaces another's figures. The AVX-512 section keeps the historical key.
SECTION_OF_KIND = {
    "cuda": ("_cuda", "CUDA"),
    "avx512": ("", "CPU"),
    "avx2": ("_avx2", "CPU, AVX2 only"),
    "other": ("_other", "CPU, no AVX2"),
}


def machine_section(key: str, title: str, device: str = "cpu", quick: bool = False) -> tuple[str, str]:
    """``(key, title)`` of a timing benchmark's section for the machine kind this runs on."""
    from torchrec_lowprec.kernels.cpu_native import cpu_vector_class

    suffix, where = SECTION_OF_KIND["cuda" if device == "cuda" else cpu_vector_class()]
    return key + suffix + ("_quick" if quick else ""), f"{title} ({where}{', quick' if quick else ''})"


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


def commit_label(where: str) -> str:
    """The short commit of the repository holding ``where``, with ``+uncommitted`` when tracked
    files other than documentation differ from it (a benchmark's own section written by an
    earlier benchmark of the same session, or prose, does not change what was measured);
    ``n/a`` outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", where, "status", "--porcelain", "--untracked-files=no", "--",
             ":(top)", ":(top,exclude)docs", ":(top,exclude,glob)**/*.md"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "n/a"
    return (commit + ("+uncommitted" if dirty else "")) or "n/a"


def machine_info(threads: int | None = None) -> list[str]:
    """Markdown lines naming the CPU, its vector extensions, cores, page setting, library
    versions and the commit, for the top of a generated benchmark section."""
    import platform

    import torch

    from torchrec_lowprec.kernels.cpu_native import cpu_description

    thp = _read("/sys/kernel/mm/transparent_hugepage/enabled").strip() or "n/a"
    alloc = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    versions = [f"torch {torch.__version__}"]
    for mod in ("fbgemm_gpu", "torchrec"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except (ImportError, AttributeError):
            pass
    commit = commit_label(os.path.dirname(os.path.abspath(__file__)))
    return [
        f"Machine: {cpu_description()}{f', {threads} threads per process' if threads else ''}; "
        f"transparent huge pages `{thp}`, torch allocator THP_MEM_ALLOC_ENABLE={alloc}.  ",
        f"Software: {', '.join(versions)}, Python {platform.python_version()}; commit {commit}.  ",
    ]


CODE_PATHS = ("torchrec_lowprec", os.path.join("examples", "dlrm"))
CODE_SUFFIXES = (".py", ".cpp", ".h", ".cu")
CODE_EXCLUDE = ("demo.py",)  # prints a table; trains through train.py


def code_version() -> dict:
    """What code a run used: ``hash`` (sha256 of every library and DLRM-example source file,
    path and content: the cache key), the short ``commit`` and whether those files had
    uncommitted changes (``dirty``). A run is reused only by code with the same hash."""
    h = hashlib.sha256()
    for top in CODE_PATHS:
        for d, dirs, files in sorted(os.walk(os.path.join(ROOT, top))):
            dirs[:] = sorted(x for x in dirs if x != "__pycache__")
            for name in sorted(files):
                if name.endswith(CODE_SUFFIXES) and name not in CODE_EXCLUDE:
                    path = os.path.join(d, name)
                    h.update(os.path.relpath(path, ROOT).encode() + b"\0")
                    with open(path, "rb") as f:
                        h.update(f.read() + b"\0")

    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    return {
        "hash": h.hexdigest()[:16],
        "commit": git("rev-parse", "--short", "HEAD") or "unknown",
        "dirty": any(
            not line.endswith(CODE_EXCLUDE)
            for line in git("status", "--porcelain", "--", *CODE_PATHS).splitlines()
        ),
    }


def describe_code(records: Sequence[dict]) -> str:
    """Which commits (and source hashes) produced ``records`` (each run's ``code``)."""
    n: dict[str, int] = {}
    for r in records:
        c = r.get("code") or {}
        label = f"{c.get('commit', 'unknown')}{' + uncommitted changes' if c.get('dirty') else ''}"
        label += f" (source {c.get('hash', '?')})"
        n[label] = n.get(label, 0) + 1
    return "; ".join(f"{k}: {v} run(s)" for k, v in n.items())


def _plans_by_content(parts: object) -> object:
    """``parts`` with every ``--precision-plan PATH`` flag keyed by the plan file's content: a run
    is defined by the plan it trained with, not by where that plan was written (a plan rewritten
    with other rows must not reuse the old runs; the same plan elsewhere may)."""
    if not isinstance(parts, list):
        return parts
    out = [_plans_by_content(p) for p in parts]
    for i in range(len(out) - 1):
        if out[i] == "--precision-plan" and isinstance(out[i + 1], str) and os.path.exists(out[i + 1]):
            with open(out[i + 1], "rb") as f:
                out[i + 1] = "sha256:" + hashlib.sha256(f.read()).hexdigest()
    return out


class ResultCache:
    """Finished runs as JSON lines at ``path``, keyed by what defines a run (``key_parts``: data,
    flags, seed, ...) *and* the source hash of :func:`code_version`, so an interrupted benchmark
    continues, a rerun on unchanged code recomputes nothing, and changed code reruns everything.
    Each result carries its ``code`` (commit, dirty flag, hash) for :func:`describe_code`."""

    def __init__(self, path: str) -> None:
        self.path, self.code = path, code_version()
        self.done: dict[str, dict] = {}
        self._load()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def _load(self) -> None:
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    rec = json.loads(line)
                    self.done[rec["key"]] = rec["result"]

    def key(self, key_parts: list) -> str:
        parts = [*_plans_by_content(key_parts), self.code["hash"]]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def get(self, key_parts: list, compute: Callable[[], dict], **meta: object) -> dict:
        """The cached result of ``key_parts`` on this code, or ``compute()`` (then stored)."""
        key = self.key(key_parts)
        if key not in self.done:
            self._load()  # another process sharing the file may have finished it
        if key not in self.done:
            t0 = time.perf_counter()
            r = compute()
            r["seconds"] = time.perf_counter() - t0
            r["code"] = self.code
            self.done[key] = r
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": key, **meta, "parts": key_parts, "result": r}) + "\n")
        return self.done[key]
