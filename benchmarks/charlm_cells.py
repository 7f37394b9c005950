"""The char-level harness's cells file: one JSON line per finished (row, seed) cell, appended as it finishes.

``charlm.py`` resumes from it and summarises it, ``charlm_pool.py`` merges its processes' files into it, and
``charlm_report.py`` pairs its cells for the tables. Reading a stored file also corrects cells written before
the trainer recorded the start map (``with_start_map``): the GPU, screen and relaxed stages in docs/results
hold such cells.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from charlm_family import DEFAULT_FAMILY, cell_family

DYNAMIC_POLICIES = ("grow", "greedy", "qlearning", "random")


def stage_name(stage: str, budget: int, quick: bool, family: str = DEFAULT_FAMILY) -> str:
    """``charlm_<stage>[_quick]_u<budget>``, the stem of a stage's files; another family than GPT-2 appends
    ``_<family>``. A GPT-2 stem always ends in ``_u<digit>`` and another family's never does, so no stage
    name of one family can name the other's file: families never share a cells file, a summary or a pair.
    ``charlm.py`` and ``charlm_pool.py`` both name files with this."""
    name = f"charlm_{stage}{'_quick' if quick else ''}_u{budget}"
    return name if family == DEFAULT_FAMILY else f"{name}_{family}"


def check_one_family(cells: list[dict[str, Any]], path: Path, family: str | None = None) -> None:
    """SystemExit (one line) when ``path``'s cells are of several families, or of another than ``family``:
    a Llama cell paired with a GPT-2 cell would compare unlike models (a cell without the key is GPT-2)."""
    found = sorted({cell_family(c) for c in cells} | ({family} if family and cells else set()))
    if len(found) > 1:
        raise SystemExit(f"charlm: {path} would mix block families {found}: a cells file holds one family "
                         f"(files of another family than {DEFAULT_FAMILY} end in _<family>)")


def read_cells(path: Path) -> list[dict[str, Any]]:
    """Every cell of ``path`` (none if it does not exist yet); a line cut by a crash mid-write is skipped, so
    that cell reruns."""
    if not path.exists():
        return []
    cells = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                cells.append(with_start_map(json.loads(line)))
            except json.JSONDecodeError:
                print(f"charlm: ignoring a truncated line in {path}", flush=True)
    return cells


def with_start_map(cell: dict[str, Any]) -> dict[str, Any]:
    """Cells written before 2026-12-07: their tie history began at the first decision, and the trainer's mean
    unique layers treated that decision's map as held from step 0 (for ``grow``, which starts all tied, an
    overestimate of up to 0.17 layers). Such a cell gets its start map (every dynamic row starts all tied) at
    step 0, and its step-weighted means are recomputed: unique layers from the maps, trainable parameters
    moved by the same number of GPT-2 blocks (12 d^2 + 13 d each, less a relaxed delta's 16 d r). Every such
    cell is GPT-2 (``--family`` came later, and its cells start at step 0)."""
    from hf_dyntie.tie_map import maps_per_step, num_unique_layers

    settings = cell.get("settings") or {}
    history = cell.get("tie_history") or []
    if (cell_family(cell) != DEFAULT_FAMILY or settings.get("tie_policy") not in DYNAMIC_POLICIES or settings.get("tie_init") != "all_tied" or not history
            or history[0]["step"] == 0 or cell.get("start_corrected")):
        return cell
    records = [{"step": 0, "tie_map": [0] * cell["num_layers"]}, *history]
    maps = maps_per_step(records, cell["steps"])
    mean_unique = sum(num_unique_layers(m) for m in maps) / len(maps)
    d, rank = cell["hparams"]["embd"], int(settings.get("tie_lora_rank") or 0)
    per_layer = 12 * d * d + 13 * d - 16 * d * rank
    shift = mean_unique - cell["mean_unique_layers"]
    return {**cell, "tie_history": records, "mean_unique_layers": mean_unique,
            "mean_trainable_parameters": cell["mean_trainable_parameters"] + shift * per_layer,
            "start_corrected": True}


def append_cell(path: Path, cell: dict[str, Any]) -> None:
    """One line, flushed: a run killed later loses no finished cell."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(cell) + "\n")
        f.flush()


def by_row(cells: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """row -> seed -> cell, in the order rows first appear; a duplicate (row, seed) keeps the later line."""
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for c in cells:
        rows.setdefault(c["row"], {})[c["seed"]] = c
    return rows
