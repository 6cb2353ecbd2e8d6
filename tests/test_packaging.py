"""A regular (non-editable) install ships both import packages: nncurv and nncurv.callbacks."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_and_imports_both_packages(tmp_path):
    pytest.importorskip("setuptools")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("nncurv-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "nncurv/__init__.py" in names
    assert "nncurv/callbacks/__init__.py" in names
    assert "nncurv/operators/hessian.py" in names
    assert "nncurv/linalg/__init__.py" in names
    assert not any(n.startswith(("callbacks/", "tests/")) for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # import from the unpacked wheel only, from a directory without the source tree
    code = (
        "import nncurv, nncurv.callbacks, nncurv.linalg; "
        "print(nncurv.__file__); print(nncurv.callbacks.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
        cwd=tmp_path, check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    files = out.stdout.split()
    assert len(files) == 2 and all(f.startswith(str(site)) for f in files), files
