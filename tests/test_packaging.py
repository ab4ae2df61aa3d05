"""A real (non-editable) wheel installs passes/ and kernels/ under residual_rewriter only."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("residual_rewriter-*.whl")
    return whl


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "passes" not in tops and "kernels" not in tops
    for module in ("passes/detect.py", "passes/rewrite.py", "kernels/attn_res/reference.py", "kernels/attn_res/op.py"):
        assert f"residual_rewriter/{module}" in names
    # every package in the source tree is in the wheel (the packages list in pyproject is explicit)
    for top, installed in (("residual_rewriter", "residual_rewriter"), ("passes", "residual_rewriter/passes"), ("kernels", "residual_rewriter/kernels")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.relative_to(ROOT / top).as_posix()
            assert f"{installed}/{rel}" in names, f"{top}/{rel} is missing from the wheel: add its package to pyproject.toml"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "residual-rewriter = residual_rewriter.cli:main" in text
    assert "attnres = residual_rewriter.backend:attnres_backend" in text


def test_installed_wheel_imports(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import importlib.util, residual_rewriter, residual_rewriter.passes.detect, residual_rewriter.kernels;"
        "assert residual_rewriter.__file__.startswith(%r), residual_rewriter.__file__;"
        "assert importlib.util.find_spec('passes') is None;"
        "import residual_rewriter.models; print('ok')" % str(target)
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    # run outside the repo so the source tree is not importable
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
