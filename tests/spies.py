"""Launch spies: prove that a test's numbers came from the Triton kernel, not from a reference."""
from __future__ import annotations

import contextlib


class LaunchSpy:
    """Stands in for a JITFunction: records every ``kernel[grid]`` launch, then delegates."""

    def __init__(self, kernel):
        self.kernel, self.grids, self.constexprs = kernel, [], []

    def __getitem__(self, grid):
        self.grids.append(grid)
        launch = self.kernel[grid]

        def record(*args, **kwargs):  # keyword arguments: the constexpr flags and launch options
            self.constexprs.append(kwargs)
            return launch(*args, **kwargs)

        return record


@contextlib.contextmanager
def spy_on(monkeypatch, module, *names):
    spies = {n: LaunchSpy(getattr(module, n)) for n in names}
    for n, s in spies.items():
        monkeypatch.setattr(module, n, s)
    yield spies
    for n, s in spies.items():
        assert s.grids, f"kernel {n} was never launched"
