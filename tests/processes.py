"""Helpers for the multi-process (gloo) tests."""
from __future__ import annotations

import os
import tempfile


def rendezvous() -> str:
    """An ``init_method`` for one process group: a FileStore in a new folder. (A free TCP port picked here could be
    taken by another group's gloo before rank 0 binds it, with test files running side by side under xdist.)"""
    return "file://" + os.path.join(tempfile.mkdtemp(prefix="rr-rendezvous-"), "store")
