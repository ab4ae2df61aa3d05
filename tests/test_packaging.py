"""passes/ and kernels/ are importable as residual_rewriter.passes / .kernels only: a real
(non-editable) wheel installs them there, and no top-level folder of the checkout can hide an installed
distribution of the same name (Hugging Face's ``kernels``) from a Python started in the checkout."""
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
    # every module in the source tree is in the wheel (the packages list in pyproject is explicit)
    for top, installed in (("residual_rewriter", "residual_rewriter"), ("passes", "residual_rewriter/passes"), ("kernels", "residual_rewriter/kernels")):
        for module in (ROOT / top).rglob("*.py"):
            rel = module.relative_to(ROOT / top).as_posix()
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


def _checkout_folders() -> list[str]:
    return sorted(d.name for d in ROOT.iterdir() if d.is_dir() and d.name.isidentifier() and d.name != "residual_rewriter")


def test_checkout_root_hides_no_installed_package(tmp_path):
    """A Python started in the checkout root (``python -m pytest``, ``python -c``, a notebook) has the root
    first on sys.path. A top-level folder that is a regular package (an ``__init__.py``) would then be
    imported instead of an installed distribution of that name: transformers >= 5.25 imports Hugging
    Face's ``kernels`` and failed on our ``kernels/``. Every top-level folder must lose to an installed
    package of the same name, and residual_rewriter.passes / .kernels must still import from there."""
    folders = _checkout_folders()
    assert {"passes", "kernels"} <= set(folders)
    site = tmp_path / "site"
    for name in folders:  # a stand-in for an installed distribution of each name
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("INSTALLED = True\n")
    code = (
        "import importlib, sys\n"
        "assert sys.path[0] == '', sys.path[:2]\n"
        f"for name in {folders!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    assert getattr(module, 'INSTALLED', False), f'{name} came from {module.__spec__.submodule_search_locations}'\n"
        "import residual_rewriter.passes.detect, residual_rewriter.kernels.attn_res\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


def test_hugging_face_kernels_from_checkout_root():
    """The real case, where Hugging Face's ``kernels`` is installed (transformers >= 5.25 requires it)."""
    found = subprocess.run(
        [sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('kernels', None) is not None)"],
        cwd="/", capture_output=True, text=True,
    )
    if found.stdout.strip() != "True":
        pytest.skip("Hugging Face's kernels is not installed")
    code = "import kernels, transformers.integrations.hub_kernels; print(kernels.__file__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not result.stdout.strip().startswith(str(ROOT / "kernels")), result.stdout
