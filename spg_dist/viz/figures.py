"""The one way every picture is written: an Agg canvas (no pyplot global state, works headless on workers)."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def save_figure(fig: Figure, out_path: str | os.PathLike, dpi: int = 110) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=dpi)
    return out
