"""The benchmarks' figures: curves over training steps (with a t-CI band over seeds where there are seeds),
unique layers over time, and tie maps as a grid. Headless (Agg), 110 dpi, written beside the results.

matplotlib is imported inside ``pyplot()`` so a script's ``--help`` and its fail-fast checks stay quick.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from stats import mean_ci


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display on these machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> str:
    """Lay out, write and close ``fig``; its file name (what the summaries list)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path.name


def mean_curves(series: dict[str, list[dict[int, float]]], path: Path, ylabel: str, title: str) -> str:
    """One line per name: the mean over its seeds' curves ({step: value}) at the steps they all share, with a
    95% t-CI band when there are two or more seeds. The y axis is clipped to 1.2 above the lowest point:
    the end of training is what matters, not the first, steep part of the curves."""
    fig, ax = pyplot().subplots(figsize=(9, 5.5))
    for name, curves in series.items():
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        if not steps:
            continue
        stats = [mean_ci([c[s] for c in curves]) for s in steps]
        line, = ax.plot(steps, [s["mean"] for s in stats], marker=".", label=f"{name} (n={len(curves)})")
        if stats[0]["ci95"] is not None:
            ax.fill_between(steps, [s["lo"] for s in stats], [s["hi"] for s in stats], alpha=0.15,
                            color=line.get_color())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    lows = [y for coll in ax.collections for p in coll.get_paths() for y in p.vertices[:, 1]]
    lows += [y for line in ax.get_lines() for y in line.get_ydata()]
    if lows:
        ax.set_ylim(min(lows) - 0.02, min(lows) + 1.2)
    return save(fig, path)


def paired_differences(rows: list[tuple[str, dict[str, Any] | None]], path: Path, xlabel: str, title: str) -> str:
    """One line per row, top to bottom: a paired difference's mean (dot) and 95% t-CI (bar), a vertical line at
    0; a row with one seed is a dot alone and one without a comparison is left out. The figure a reader
    scans before the table: which rows are better than the reference, and by how much more than the noise."""
    shown = [(name, d) for name, d in rows if d and d.get("mean") is not None and not d.get("reference")]
    fig, ax = pyplot().subplots(figsize=(9, 0.45 * len(shown) + 1.4))
    for y, (name, d) in enumerate(reversed(shown)):
        ci = d.get("ci95")
        ax.errorbar([d["mean"]], [y], xerr=None if ci is None else [[ci], [ci]], fmt="o", capsize=3,
                    color="tab:green" if d.get("real") and d["mean"] < 0 else
                    "tab:red" if d.get("real") else "tab:gray")
    ax.set_yticks(range(len(shown)), [f"{name} (n={d['n']})" for name, d in reversed(shown)], fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return save(fig, path)


def step_lines(series: dict[str, list[list[tuple[int, int]]]], path: Path, ylabel: str, title: str) -> str:
    """Step functions (one per seed, one colour per name) from (step, value) change points; each list of
    points must end at the last step."""
    fig, ax = pyplot().subplots(figsize=(9, 4.5))
    for i, (name, runs) in enumerate(series.items()):
        for j, pts in enumerate(runs):
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color=f"C{i % 10}", alpha=0.7,
                    label=name if j == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return save(fig, path)


def tie_map_grid(maps: dict[str, list[int]], positions: int, path: Path, title: str) -> str:
    """One row per labelled map, a column per position, coloured and numbered by the root it runs."""
    rows = [m + [float("nan")] * (positions - len(m)) for m in maps.values()]
    fig, ax = pyplot().subplots(figsize=(6, 0.3 * len(rows) + 1.2))
    ax.imshow(rows, cmap="tab10", vmin=0, vmax=9, aspect="auto")
    for i, m in enumerate(rows):
        for j, v in enumerate(m):
            if v == v:
                ax.text(j, i, int(v), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), list(maps), fontsize=7)
    ax.set_xticks(range(positions))
    ax.set_xlabel("position (number, colour: the root whose weights it runs)")
    ax.set_title(title)
    return save(fig, path)


def perplexity_curves(rows: list[dict[str, Any]], path: Path, title: str) -> str:
    """``quality.py``: each row's eval perplexity over training (log scale), its test perplexity in the legend."""
    fig, ax = pyplot().subplots(figsize=(9, 5))
    for row in rows:
        if row["eval_curve"]:
            steps, losses = zip(*row["eval_curve"])
            ax.plot(steps, [math.exp(x) for x in losses], marker=".", label=f"{row['row']} ({row['test_ppl']:.1f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eval perplexity (curve subset)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save(fig, path)
