"""Statistics every harness reports with: medians of timings, means with Student-t intervals, paired differences.

Speed is quoted as a median of side-by-side ratios (``median``); quality as a mean over seeds with a 95% t-CI
(``mean_ci``), and a comparison of two rows as the mean of their same-seed differences with its own CI
(``paired``), which is *real* only when that CI excludes 0. One value never gets an interval.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

# Student t, 97.5% quantile, dof 1..30 (used when scipy is not installed).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def t_quantile(dof: int) -> float:
    """97.5% quantile of Student's t with ``dof`` degrees of freedom (scipy if installed, else the table;
    beyond 30 dof the Cornish-Fisher expansion z + (z^3 + z) / (4 dof))."""
    if dof < 1:
        raise ValueError("a t quantile needs at least 1 degree of freedom")
    try:
        from scipy import stats

        return float(stats.t.ppf(0.975, dof))
    except ImportError:
        pass
    if dof <= len(T975):
        return T975[dof - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * dof)


def mean_ci(values: list[float]) -> dict[str, Any]:
    """Mean, sample sd and the 95% t-CI half-width (n-1 dof). One value: no sd, no CI (never faked)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci95": None, "lo": None, "hi": None}
    mean = sum(values) / n
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "ci95": None, "lo": None, "hi": None, "note": "1 seed: no CI"}
    sd = statistics.stdev(values)
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95": half, "lo": mean - half, "hi": mean + half}


def paired(cells_a: dict[int, dict], cells_b: dict[int, dict], key: str) -> dict[str, Any] | None:
    """Mean and t-CI of a[key] - b[key] over the seeds both rows have; ``real`` only if the CI excludes 0."""
    seeds = sorted(set(cells_a) & set(cells_b))
    if not seeds:
        return None
    stats = mean_ci([cells_a[s][key] - cells_b[s][key] for s in seeds])
    stats["seeds"] = seeds
    stats["real"] = bool(stats["ci95"] is not None and (stats["lo"] > 0 or stats["hi"] < 0))
    return stats


def fmt_ci(stats: dict[str, Any] | None, digits: int = 4) -> str:
    """``mean ± half-width``, or ``mean (n=1)`` where there is no interval; empty for no values."""
    if not stats or stats.get("mean") is None:
        return ""
    if stats.get("ci95") is None:
        return f"{stats['mean']:.{digits}f} (n=1)"
    return f"{stats['mean']:.{digits}f} ± {stats['ci95']:.{digits}f}"


def fmt_diff(stats: dict[str, Any] | None, with_n: bool = False) -> str:
    """A paired difference as ``+mean [lo, hi]`` (``with_n``: and how many seeds), **real** when its CI
    excludes 0; ``0 (reference)`` for a row against itself; empty for no common seed."""
    if not stats:
        return ""
    if stats.get("reference"):
        return "0 (reference)"
    if stats.get("ci95") is None:
        return f"{stats['mean']:+.4f} (n={stats['n']}, no CI)"
    seeds = f" (n={stats['n']})" if with_n else ""
    return f"{stats['mean']:+.4f} [{stats['lo']:+.4f}, {stats['hi']:+.4f}]{seeds}" + (" **real**" if stats["real"] else "")
