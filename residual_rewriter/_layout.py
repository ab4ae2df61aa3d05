"""Where ``residual_rewriter.passes`` and ``residual_rewriter.kernels`` come from.

In the repository they are the top-level folders ``passes/`` and ``kernels/``, deliberately WITHOUT an
``__init__.py``: a regular package at the checkout root would be imported as the bare name ``kernels``
by any Python started there (``python -m pytest``, a notebook) and hide an installed distribution of
that name (Hugging Face's ``kernels``, which transformers >= 5.25 imports). Folders without
``__init__.py`` are namespace packages, which never win against an installed regular package.

A wheel installs them inside this package, where the import system finds them. setuptools' editable
install maps each to its folder but cannot resolve a namespace package under a regular one
(pypa/setuptools#4943), and a checkout used without installing has no mapping at all: in both cases
they are mounted here from the folders beside this package.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

SUBPACKAGES = ("passes", "kernels")


def mount_checkout_subpackages() -> None:
    package = __name__.rpartition(".")[0]  # residual_rewriter
    checkout = Path(__file__).resolve().parent.parent
    for name in SUBPACKAGES:
        full = f"{package}.{name}"
        if full in sys.modules or importlib.util.find_spec(full) is not None:
            continue  # an installed wheel: found inside the package
        folder = checkout / name
        if not folder.is_dir():
            raise ImportError(f"{full} is neither installed nor in a checkout beside {package} ({folder})")
        spec = importlib.machinery.ModuleSpec(full, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        sys.modules[full] = module = importlib.util.module_from_spec(spec)
        setattr(sys.modules[package], name, module)  # as the import system does for a loaded submodule
