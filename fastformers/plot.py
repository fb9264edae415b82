"""Loss curves as PNG files, drawn with matplotlib (the ``train`` extra:
``pip install 'fastformers[train]'``)."""
from __future__ import annotations

import importlib.util
import io
from typing import Dict, Sequence, Tuple

INSTALL_HINT = "pip install 'fastformers[train]'"


def available() -> bool:
    """Whether matplotlib is installed (training still runs without it, with no loss curve)."""
    return importlib.util.find_spec("matplotlib") is not None


def line_chart_png(series: Dict[str, Sequence[Tuple[float, float]]], x_label: str, y_label: str) -> bytes:
    """PNG of one line per named series of ``(x, y)`` points; empty series are left out."""
    # Figure without pyplot: no global figure registry, no interactive backend, safe in any thread.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), dpi=100, layout="tight")
    axes = figure.add_subplot()
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            # a lone point has no line to draw: mark it
            axes.plot(xs, ys, label=name, marker="o" if len(points) == 1 else None)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.grid(alpha=0.3)
    axes.legend()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    return png.getvalue()
