"""The wheel, installed into a fresh virtual environment that holds only the stack, works outside the checkout.

The environment is a venv of the base interpreter (no system site-packages) plus a ``.pth``
pointing at a folder of links to this interpreter's site-packages minus torchrec-lowprec itself
(its editable finder and metadata): torch / torchrec / fbgemm / torchx are reused, the package
comes only from the wheel. Everything runs from a folder outside the checkout, without
``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "torchrec_lowprec", "examples/dlrm")
TRAIN = [
    "--train-rows", "3000", "--val-rows", "500", "--test-rows", "500", "--vocab-sizes", "200,50,8",
    "--num-dense", "2", "--embedding-dim", "8", "--dense-arch", "8", "--over-arch", "8",
    "--batch-size", "500", "--precision", "int8", "--no-progress", "--threads", "1",
]  # fmt: skip


def _run(cmd: list[str], cwd: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _stack_folder(dest: str, only: tuple[str, ...] | None = None) -> str:
    """Links to this interpreter's site-packages entries, minus torchrec-lowprec's own (or only
    the entries whose lower-cased name starts with one of ``only``)."""
    site = sysconfig.get_paths()["purelib"]
    os.makedirs(dest)
    for name in os.listdir(site):
        low = name.lower()
        if low.startswith(("torchrec_lowprec", "__editable__", "torchrec-lowprec")) or low.endswith(".pth"):
            continue
        if only is not None and not low.startswith(only):
            continue
        os.symlink(os.path.join(site, name), os.path.join(dest, name))
    return dest


def _make_venv(tmp, wheel: str, env: dict, stack: str) -> str:
    """A venv of the base interpreter whose only other packages are those linked in ``stack``."""
    base = getattr(sys, "_base_executable", sys.executable)
    vdir = tmp / f"venv-{os.path.basename(stack)}"
    _run([base, "-m", "venv", "--without-pip", str(vdir)], cwd=str(tmp), env=env)
    py = str(vdir / "bin" / "python")
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, env=env, check=True).stdout.strip()  # fmt: skip
    with open(os.path.join(purelib, "zz_stack.pth"), "w") as f:
        f.write(stack + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel],
         cwd=str(tmp), env=env)  # fmt: skip
    return str(vdir)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for rel in SOURCES:  # a clean copy: no stale build/ of the checkout ends up in the wheel
        a = os.path.join(ROOT, rel)
        if os.path.isdir(a):
            shutil.copytree(a, src / rel, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            os.makedirs(src, exist_ok=True)
            shutil.copy(a, src / rel)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
          str(src)], cwd=str(tmp), env=env)  # fmt: skip
    (wheel,) = [str(tmp / "dist" / f) for f in os.listdir(tmp / "dist") if f.endswith(".whl")]
    vdir = Path(_make_venv(tmp, wheel, env, _stack_folder(str(tmp / "stack"))))
    py = str(vdir / "bin" / "python")
    # Only the package's own dependencies (numpy, pyyaml): no torch at all.
    bare = _make_venv(
        tmp, wheel, env, _stack_folder(str(tmp / "bare"), only=("numpy", "yaml", "_yaml", "pyyaml"))
    )
    # torchx's local scheduler runs `torchrun` from PATH: the one of this environment.
    torchrun = vdir / "bin" / "torchrun"
    torchrun.write_text(f"#!{py}\nimport sys\nfrom torch.distributed.run import main\nsys.exit(main())\n")
    torchrun.chmod(0o755)
    work = tmp / "work"
    work.mkdir()
    env["PATH"] = str(vdir / "bin") + os.pathsep + env.get("PATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return {"py": py, "bin": str(vdir / "bin"), "work": str(work), "env": env, "wheel": wheel, "bare": bare}


def test_wheel_contents_and_metadata(venv):
    import zipfile

    names = zipfile.ZipFile(venv["wheel"]).namelist()
    from torchrec_lowprec.kernels import cpu_native

    for src in (*cpu_native.SOURCES, *cpu_native.HEADERS):  # what the build at import time compiles
        assert f"torchrec_lowprec/kernels/cpu/{src.name}" in names
    assert "torchrec_lowprec/components.py" in names and "torchrec_lowprec_examples/dlrm/train.py" in names
    meta = zipfile.ZipFile(venv["wheel"]).read("torchrec_lowprec-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: BSD-3-Clause" in meta
    assert 'Requires-Dist: torchrec<1.9,>=1.8; extra == "cuda"' in meta
    assert 'Requires-Dist: fbgemm-gpu-cpu<1.9,>=1.8; extra == "cpu"' in meta
    assert "Requires-Dist: tqdm\n" not in meta  # only the example uses it: [examples]


def test_import_and_cli_from_the_wheel(venv):
    p = _run([venv["py"], "-c", "import sys, torchrec_lowprec as lp, torchrec_lowprec_examples.dlrm.train as t; "
              "assert 'torch' in sys.modules; print(lp.__file__); print(t.__file__); print(lp.LowPrecisionConfig)"],
             cwd=venv["work"], env=venv["env"])  # fmt: skip
    lp_file, t_file = p.stdout.splitlines()[:2]
    assert lp_file.startswith(os.path.dirname(os.path.dirname(venv["bin"]))), lp_file  # the wheel's copy
    assert not lp_file.startswith(ROOT) and not t_file.startswith(ROOT)
    p = _run([os.path.join(venv["bin"], "torchrec-lowprec"), "--help"], cwd=venv["work"], env=venv["env"])
    assert "build-kernels" in p.stdout
    p = _run(
        [os.path.join(venv["bin"], "torchrec-lowprec"), "plan", "--help"], cwd=venv["work"], env=venv["env"]
    )
    assert "--tables" in p.stdout


def test_torchx_resolves_the_component_by_name(venv):
    tx = [venv["py"], "-m", "torchx.cli.main"]
    p = _run([*tx, "run", "--dryrun", "-s", "local_cwd", "torchrec_lowprec.dlrm", "-j", "1x2", "--",
              "--precision", "int4", "--checkpoint-dir", "ck"], cwd=venv["work"], env=venv["env"])  # fmt: skip
    # The dry run pretty-prints the command as adjacent string literals: join them.
    out = re.sub(r"['\"]\s*\n\s*['\"]", "", p.stdout + p.stderr)
    assert "torchrun --max-restarts 3 " in out, out
    assert "-m torchrec_lowprec_examples.dlrm.train --precision int4 --checkpoint-dir ck --resume auto" in out
    # Registering components must not hide TorchX's builtins.
    p = _run([*tx, "run", "--dryrun", "-s", "local_cwd", "dist.ddp", "--script", "x.py"],
             cwd=venv["work"], env=venv["env"])  # fmt: skip
    assert "torchrun" in p.stdout + p.stderr


def test_tiny_training_run_from_the_wheel(venv):
    summary = os.path.join(venv["work"], "s.json")
    _run([venv["py"], "-m", "torchrec_lowprec_examples.dlrm.train", *TRAIN, "--summary", summary, "--quiet"],
         cwd=venv["work"], env=venv["env"])  # fmt: skip
    s = json.load(open(summary))
    assert s["train"]["steps"] == 6 and s["world_size"] == 1
    assert s["test"]["rows"] == 500 and 0.0 < s["test"]["logloss"] < 1.0
    assert (
        s["embedding_bytes"]["ratio"] < 0.6
    )  # int8 rows (+ scale/bias, step, state) vs fp32 + RowWiseAdagrad


def test_cli_help_with_only_the_package(venv):
    """No torch installed: --help works, a subcommand names what to install (exit 2, one line)."""
    cli = os.path.join(venv["bare"], "bin", "torchrec-lowprec")
    probe = subprocess.run([os.path.join(venv["bare"], "bin", "python"), "-c", "import torch"], cwd=venv["work"],
                           env=venv["env"], capture_output=True, text=True)  # fmt: skip
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    assert "plan" in _run([cli, "--help"], cwd=venv["work"], env=venv["env"]).stdout
    assert "--world-size" in _run([cli, "plan", "--help"], cwd=venv["work"], env=venv["env"]).stdout
    p = subprocess.run(
        [cli, "build-kernels"], cwd=venv["work"], env=venv["env"], capture_output=True, text=True
    )
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "pip install 'torchrec-lowprec[cpu]'" in p.stderr
