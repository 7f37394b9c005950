"""Pictures of a tying run: the tie map over training, and unique layers / trainable parameters."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..tie_map import maps_per_step  # noqa: E402


def tie_map_matrix(records: Sequence[dict[str, Any]], final_step: int) -> tuple[np.ndarray, list[int]]:
    """Roots per position (rows) over steps (columns); each map holds until the next record."""
    matrix = np.asarray(maps_per_step(records, final_step), dtype=np.int64).T
    return matrix, list(range(matrix.shape[1]))


def plot_tie_map(records: Sequence[dict[str, Any]], final_step: int, path: str | Path, title: str = "") -> Path:
    """Positions x optimizer steps, each cell coloured by the layer whose weights the position runs."""
    matrix, _ = tie_map_matrix(records, final_step)
    num_layers = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.35 * num_layers))
    cmap = plt.get_cmap("viridis", num_layers)
    im = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5, vmax=num_layers - 0.5,
                   origin="lower")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("position")
    ax.set_yticks(range(0, num_layers, max(1, num_layers // 12)))
    ax.set_title(title or "Tie map over training (colour: layer whose weights the position runs)")
    cbar = fig.colorbar(im, ax=ax, ticks=range(0, num_layers, max(1, num_layers // 12)))
    cbar.set_label("root layer")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_unique_layers(
    records: Sequence[dict[str, Any]], final_step: int, path: str | Path, params_per_layer: int, params_outside: int
) -> Path:
    """Unique layers (left axis) and trainable parameters (right axis) over optimizer steps."""
    matrix, steps = tie_map_matrix(records, final_step)
    unique = np.array([len(set(col)) for col in matrix.T])
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.step(steps, unique, where="post", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("unique layers", color="tab:blue")
    ax.set_ylim(0, matrix.shape[0] + 0.5)
    ax2 = ax.twinx()
    ax2.step(steps, (unique * params_per_layer + params_outside) / 1e6, where="post", color="tab:orange", alpha=0.6)
    ax2.set_ylabel("trainable parameters (M)", color="tab:orange")
    ax2.set_ylim(0, (matrix.shape[0] * params_per_layer + params_outside) / 1e6 * 1.05)
    ax.set_title(f"Unique layers over training (mean {unique.mean():.2f} of {matrix.shape[0]})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
