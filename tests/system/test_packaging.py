"""What the wheel ships: the package, its kernels and types, the license, no tests."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import cupysyncbn

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(out)], capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    (whl,) = out.glob("cupysyncbn-*.whl")
    with zipfile.ZipFile(whl) as z:
        return z.namelist()


def test_wheel_ships_license_types_kernels_and_every_subpackage(wheel_names):
    names = set(wheel_names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE")
               for n in names), sorted(n for n in names if "dist-info" in n)
    assert "cupysyncbn/py.typed" in names
    for f in ("stats.cu", "backward.cu", "elementwise.cu", "fused.cu", "common.cuh"):
        assert f"cupysyncbn/kernels/{f}" in names
    package = ROOT / "cupysyncbn"
    for init in package.rglob("__init__.py"):
        assert init.relative_to(ROOT).as_posix() in names  # setup.cfg lists every subpackage
    for py in package.rglob("*.py"):
        assert py.relative_to(ROOT).as_posix() in names
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n]


def test_license_is_apache_and_declared():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0" in text
    assert "license = Apache-2.0" in (ROOT / "setup.cfg").read_text()


def test_public_namespace_has_no_stray_names():
    public = {n for n in dir(cupysyncbn) if not n.startswith("_")}
    assert "annotations" not in public
    assert set(cupysyncbn.__all__) <= set(dir(cupysyncbn))
