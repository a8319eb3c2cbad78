"""What every bench figure shares: the non-interactive backend and one way to save."""
from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only: no display is needed or used)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """Lay out, write ``path`` (PNG, 110 dpi) and free the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
