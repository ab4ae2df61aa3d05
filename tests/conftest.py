"""Suite-wide test selection.

``-m hf`` selects the Hugging Face-facing tests: ``.ci/run`` runs them again against the oldest and
the newest transformers release that pyproject.toml declares, so that a release that breaks the
converter shows up the day it appears. A test module is Hugging Face-facing when it is listed here
(each converts transformers models throughout).
"""
from __future__ import annotations

import os

import pytest
import torch

HF_FACING_MODULES = {
    "test_architectures.py",  # every architecture the README lists
    "test_checkpointing.py",  # HF layers' activation checkpointing
    "test_convert_exact.py",
    "test_convert.py",
    "test_detect.py",
    "test_export.py",
    "test_hf_generate.py",  # convert: generate, KV cache, save/from_pretrained
    "test_hf_checkpoints.py",  # save_pretrained -> from_pretrained for every listed architecture
    "test_inplace.py",  # convert_: layer by layer on HF models
    "test_oracle.py",  # the non-zero-query oracle on HF families
    "test_traced_once.py",  # export, fullgraph compile and pipeline() of a freshly converted HF model
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in HF_FACING_MODULES:
            item.add_marker(pytest.mark.hf)


def pytest_configure(config):
    # pytest-xdist (-n N) runs N worker processes: they share the cores (N x all cores' threads oversubscribe them)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))
