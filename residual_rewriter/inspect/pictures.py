"""Pictures as bytes: matplotlib figures drawn off-screen, and the ``Picture`` they come back in.

Drawing never touches pyplot or the global matplotlib backend (a user's notebook keeps its own):
figures are ``matplotlib.figure.Figure`` objects on an Agg canvas, written to PNG or SVG in memory.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

FORMATS = ("png", "svg")


@dataclass
class Picture:
    """An image: ``data`` (PNG or SVG bytes), its ``format``, and the ``backend`` that drew it."""

    data: bytes
    format: str
    backend: str  # "graphviz" or "matplotlib"
    notes: list[str] = field(default_factory=list)  # e.g. why a preferred backend was not used

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.write_bytes(self.data)
        return path


def check_format(fmt: str) -> str:
    fmt = fmt.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"picture format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def format_of(path: Union[str, Path], default: str = "png") -> str:
    """The picture format a file name asks for (``x.svg`` -> svg), else ``default``."""
    suffix = Path(path).suffix.lower().lstrip(".")
    return check_format(suffix) if suffix else check_format(default)


def new_figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas, or a clear error naming what to install."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # report it: a missing picture must not look like an empty one
        raise RuntimeError(
            f"drawing needs matplotlib ({e}); install it with: pip install 'residual-rewriter[viz]'"
        ) from e
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def figure_bytes(fig, fmt: str) -> bytes:
    buf = io.BytesIO()
    # metadata without a date keeps SVG output reproducible
    metadata = {"Date": None} if fmt == "svg" else {}
    fig.savefig(buf, format=fmt, bbox_inches="tight", dpi=120, metadata=metadata)
    return buf.getvalue()
