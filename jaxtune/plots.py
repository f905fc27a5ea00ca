"""Plots written to a run directory (PNG, through matplotlib's Agg canvas: no display, no global
pyplot state)."""

from __future__ import annotations

import numpy as np


def confusion_png(matrix, labels, path: str, title: str = "") -> None:
    """A confusion matrix (rows: true label, columns: predicted) as a heat map with the counts written in
    each cell, shaded by the fraction of its row (so rare classes are as readable as common ones)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.asarray(matrix, np.int64)
    k = len(labels)
    rows = m / np.maximum(m.sum(1, keepdims=True), 1)
    side = min(max(3.0, 0.6 * k + 2.0), 20.0)
    fig = Figure(figsize=(side + 1.0, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(rows, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true label")
    ax.set_xticks(range(k), labels=[str(x) for x in labels], rotation=45 if k > 4 else 0, ha="right")
    ax.set_yticks(range(k), labels=[str(x) for x in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if k <= 30:  # counts stay legible up to about 30 classes
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(m[i, j]),
                    ha="center",
                    va="center",
                    color="white" if rows[i, j] > 0.5 else "black",
                )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
