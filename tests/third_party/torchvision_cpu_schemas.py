"""Let ``import torchvision`` work beside a CPU-only torch, in every process of the environment.

PyPI's torchvision 0.28.0 (the release for torch 2.13) is a CUDA build: beside the CPU torch its C
extension does not load (it links libtorch_cuda), and ``torchvision/_meta_registrations.py`` then dies
registering a fake kernel for ``torchvision::nms``, an operator nothing defined. timm imports
torchvision, and so does transformers whenever torchvision is installed (``image_utils``, from
``modeling_utils``): every Hugging Face model import would die, in the test process and in the scripts
the tests run as subprocesses. Defining the two schemas it registers kernels for lets the pure-Python
code import; detection ops stay unusable.

``torchvision_cpu_schemas.pth`` imports this module at interpreter start; it only puts a finder on
``sys.meta_path`` (torch is not imported then). On the first ``import torchvision`` the finder defines
the schemas, unless torchvision's own extension loads (a CPU or matching CUDA build), and steps aside.
"""
from __future__ import annotations

import importlib.machinery
import os
import sys

_schemas = None  # the torch.library.Library that holds the definitions: kept alive while the process runs


class _BeforeTorchvision:
    done = False

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision" or self.done:
            return None
        self.done = True
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.submodule_search_locations:
            _define_schemas_unless_the_extension_loads(spec.submodule_search_locations[0])
        return None  # the usual finders import torchvision


def _define_schemas_unless_the_extension_loads(package: str) -> None:
    global _schemas
    import torch

    # _C.so up to torchvision 0.28 (torch 2.13); _C_stable.so (built on torch's stable ABI) from 0.29
    for name in ("_C.so", "_C_stable.so"):
        try:
            torch.ops.load_library(os.path.join(package, name))  # torchvision loads it again: a no-op
            return
        except OSError:
            pass
    _schemas = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        _schemas.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


if not any(isinstance(finder, _BeforeTorchvision) for finder in sys.meta_path):
    sys.meta_path.insert(0, _BeforeTorchvision())
