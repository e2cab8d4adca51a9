"""An attention map as a PNG file (matplotlib): one layer's head, or all its heads in a grid, with the prompt's
tokens along the axes. For people who want a picture in a file rather than the explain page."""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from npllama.errors import NpllamaError

INSTALL = "pip install matplotlib (or, from the source checkout, pip install -e '.[plot]')"


class PlotUnavailable(NpllamaError):
    """matplotlib is not installed."""


def _label(s: str) -> str:
    s = s.replace(" ", "\u00b7").replace("\n", "\u21b5").replace("\t", "\u21e5")
    s = s.replace("$", r"\$")                       # matplotlib would read $...$ as math
    return s if len(s) <= 12 else s[:11] + "\u2026"


def save_png(result: dict[str, Any], path: str, layer: int, head: int | None = None) -> None:
    """Write the attention map of (layer, head), or of every head of `layer` when head is None, to `path`."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(f"--png needs matplotlib, which is not installed: {INSTALL}") from None
    from npllama.io.atomic import atomic_path
    att = np.asarray(result["attention"][layer])                  # (H, T, T)
    heads = list(range(att.shape[0])) if head is None else [head]
    labels = [_label(s) for s in result["tokens"]]
    T = len(labels)
    cols = min(3, len(heads))
    rows = math.ceil(len(heads) / cols)
    side = max(4.0, 0.18 * T + 1.5)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows), squeeze=False)
    masked = np.ma.masked_array(att, mask=np.broadcast_to(np.triu(np.ones((T, T), dtype=bool), 1), att.shape))
    cmap = matplotlib.colormaps["Blues"].copy()
    cmap.set_bad("#e6e6e6")                          # above the diagonal: keys a query cannot see
    for n, (ax, h) in enumerate(zip(axes.flat, heads)):
        im = ax.imshow(masked[h], cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"layer {layer}, head {h}", fontsize=10)
        ax.set_xticks(range(T), labels, rotation=90, fontsize=7, family="monospace")
        ax.set_yticks(range(T), labels, fontsize=7, family="monospace")
        if n // cols == rows - 1 or n + cols >= len(heads):
            ax.set_xlabel("key")
        if n % cols == 0:
            ax.set_ylabel("query")
    for ax in list(axes.flat)[len(heads):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="attention weight")
    with atomic_path(os.fspath(path), suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
