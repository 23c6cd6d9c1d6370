"""``torchrec-lowprec --help`` with torch not importable; the version check of the stack."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from torchrec_lowprec import _versions

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A meta-path finder that makes torch / torchrec / fbgemm_gpu unimportable, as on a machine
# where only the package (numpy, pyyaml) is installed.
BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchrec', 'fbgemm_gpu'):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Block())
from torchrec_lowprec.cli import main
rc = main(sys.argv[1:])
assert 'torch' not in sys.modules
sys.exit(rc)
"""


def _cli(*argv: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, "-c", BLOCK, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_help_without_torch():
    p = _cli("--help")
    assert p.returncode == 0, p.stderr
    assert "plan" in p.stdout and "build-kernels" in p.stdout
    assert "torchrec-lowprec[cpu]" in p.stdout and "`" not in p.stdout
    p = _cli("plan", "--help")
    assert p.returncode == 0, p.stderr
    assert "--tables" in p.stdout and "file formats" in p.stdout
    p = _cli("--version")
    assert p.returncode == 0 and p.stdout.startswith("torchrec-lowprec 0.1.0 (torch "), p.stdout


def test_subcommands_say_what_is_missing(tmp_path):
    tables = tmp_path / "t.yaml"
    tables.write_text("- {name: t, rows: 100, dim: 8}\n")
    for argv in (
        ["plan", "--tables", str(tables), "--world-size", "2", "--hbm-gb", "1", "--out", str(tmp_path / "o")],
        ["build-kernels"],
    ):
        p = _cli(*argv)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("torchrec-lowprec: error: "), p.stderr
        assert "No module named 'torch'" in lines[0] and "pip install 'torchrec-lowprec[cpu]'" in lines[0]
        assert "--no-deps torchrec==1.8.0" in lines[0]


def test_package_root_is_lazy():
    code = (
        "import sys, torchrec_lowprec as lp; assert 'torch' not in sys.modules; print(lp.LowPrecisionConfig)"
    )
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": ROOT},
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0 and "LowPrecisionConfig" in p.stdout, p.stderr


def test_build_kernels_prints_the_library(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "-m", "torchrec_lowprec.cli", "build-kernels"], env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr
    path = p.stdout.strip().splitlines()[-1]
    assert path.endswith(".so") and os.path.isfile(path), p.stdout
    from torchrec_lowprec.kernels import cpu_native

    assert path == cpu_native.library_path()


@pytest.mark.parametrize(
    "versions,errors,warns",
    [
        ({"torch": "2.13.0+cpu", "torchrec": "1.8.0", "fbgemm_gpu": "1.8.0 (fbgemm-gpu-cpu)"}, 0, 0),
        ({"torch": "2.13.1", "torchrec": "1.8.2", "fbgemm_gpu": "1.8.1 (fbgemm-gpu)"}, 0, 0),
        ({"torch": "2.14.0", "torchrec": "1.9.0", "fbgemm_gpu": "1.9.0 (fbgemm-gpu)"}, 0, 3),
        ({"torch": "2.13.0", "torchrec": "1.8.0", "fbgemm_gpu": "1.7.0 (fbgemm-gpu)"}, 1, 1),
        ({"torch": "2.12.0", "torchrec": "1.8.0", "fbgemm_gpu": "1.8.0 (fbgemm-gpu)"}, 1, 1),
        ({"torch": "2.13.0", "torchrec": None, "fbgemm_gpu": None}, 0, 0),
    ],
)
def test_version_problems(versions, errors, warns):
    e, w = _versions.problems(versions)
    assert (len(e), len(w)) == (errors, warns), (e, w)


def test_check_versions_warns_and_raises(monkeypatch):
    monkeypatch.delenv("TORCHREC_LOWPREC_SKIP_VERSION_CHECK", raising=False)
    bad = {"torch": "2.13.0", "torchrec": "1.8.0", "fbgemm_gpu": "1.7.0 (fbgemm-gpu)"}
    monkeypatch.setattr(_versions, "installed_versions", lambda: bad)
    monkeypatch.setattr(_versions, "_checked", False)
    with pytest.raises(ImportError, match=r"torchrec 1.8.0 with fbgemm-gpu 1.7.0.*supported: torch 2.13.x"):
        _versions.check_versions()
    new = {"torch": "2.14.0", "torchrec": "1.8.0", "fbgemm_gpu": "1.8.0 (fbgemm-gpu)"}
    monkeypatch.setattr(_versions, "installed_versions", lambda: new)
    monkeypatch.setattr(_versions, "_checked", False)
    with pytest.warns(RuntimeWarning, match="torch 2.14.0 is outside the tested range 2.13.x"):
        with pytest.raises(ImportError):  # fbgemm 1.8 is built for torch 2.13
            _versions.check_versions()
    ok = {"torch": "2.13.0", "torchrec": "1.8.0", "fbgemm_gpu": "1.8.0 (fbgemm-gpu)"}
    monkeypatch.setattr(_versions, "installed_versions", lambda: ok)
    monkeypatch.setattr(_versions, "_checked", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _versions.check_versions()
    monkeypatch.setenv("TORCHREC_LOWPREC_SKIP_VERSION_CHECK", "1")
    monkeypatch.setattr(_versions, "installed_versions", lambda: bad)
    monkeypatch.setattr(_versions, "_checked", False)
    _versions.check_versions()  # skipped
