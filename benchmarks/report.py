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
