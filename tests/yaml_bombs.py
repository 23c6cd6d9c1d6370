"""Input files that must not hang or exhaust memory (issue 23)."""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def laughs(levels: int = 9) -> str:
    """A YAML flow list whose last element stands for 9**levels strings through nested aliases
    ("billion laughs", a few hundred bytes)."""
    parts = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        parts.append(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "[" + ", ".join(parts) + "]"


def run_guarded(code: str, what: str) -> subprocess.CompletedProcess:
    """``code`` (dedented) in a child interpreter with the checkout on ``sys.path``, so that a
    regression cannot eat this process's memory; fails the test naming ``what`` if it is still
    running after 90 s."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=90
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} was still being read after 90 s")
