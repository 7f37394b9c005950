"""Helpers every benchmark shares: where the data lives, what machine ran it, how results are written.

Kept deliberately small: each benchmark script stays readable on its own, and this file only removes
the boilerplate that would otherwise be copied five times (machine description, JSON/markdown output,
the tiny GPT-2 configs used everywhere). The shared statistics are in ``stats.py``, the datasets and
corpora in ``data.py``, the figures in ``plots.py``.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "results"
# Benchmarks (never the package) may read the data shared beside the checkout.
SHARED_DIR = Path(os.environ.get("DYNTIE_SHARED", REPO_ROOT.parent / "shared"))


def shared_path(relative: str) -> Path:
    """A file under the shared data folder, or a clear SystemExit saying it is missing (benchmarks skip)."""
    path = SHARED_DIR / relative
    if not path.exists():
        raise SystemExit(f"SKIP: {path} is missing (set DYNTIE_SHARED to the folder holding data/ and tokenizers/)")
    return path


def machine_info() -> dict[str, Any]:
    """What ran this: the numbers mean little without it (CPU timings here are shared and noisy)."""
    return {
        "machine": f"{os.cpu_count()}-core CPU VM" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
    }


def report_failure(harness: str, what: str, error: Exception, failed: list[str]) -> None:
    """A cell that raised: one line in the log and in ``failed`` (said again at the end), the traceback on
    stderr; the harness goes on with the next cell."""
    first = (str(error).splitlines() or [""])[0]
    failed.append(f"{what}: {type(error).__name__}: {first}")
    print(f"{harness}: FAILED {what}: {type(error).__name__}: {first}", flush=True)
    traceback.print_exc(file=sys.stderr)


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads. On a small shared CPU (2 cores, other jobs running) one thread per
    process is far more stable than OpenMP threads spinning against each other: with 2 threads under
    contention we measured steps 3x slower than with 1."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(threads)


def machine_line(info: dict[str, Any]) -> str:
    return f"{info['machine']}, torch {info['torch']}, transformers {info['transformers']}"


def md_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns`` (floats get 4 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, list):
            return " ".join(str(x) for x in v)
        return "" if v is None else str(v)

    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_results(output: Path, name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """``<name>.json`` (everything) and ``<name>.md`` (the table, machine and command) in ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    json_path = output / f"{name}.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(json_path)  # never leave a half-written JSON behind if interrupted
    info = payload["machine"]
    md_path = output / f"{name}.md"
    md_path.write_text(
        f"# {name}\n\nMachine: {machine_line(info)} ({info['platform']}).\n\n"
        f"Command: `{info['command']}`\n\n{markdown}\n"
    )
    return json_path, md_path


class Timer:
    """``with Timer() as t: ...; t.seconds`` (perf_counter)."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def gpt2_config_kwargs(n_layer: int, n_embd: int, n_head: int, n_positions: int, vocab_size: int) -> dict[str, Any]:
    """Same GPT-2 shape for stock and DynTie models; dropout off so timing and memory are deterministic."""
    return dict(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        vocab_size=vocab_size,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


FAMILIES = ("gpt2", "llama")  # the families the speed and memory benchmarks build (any of hf_dyntie.families works)


def family_models(family: str, n_layer: int, n_embd: int, n_head: int, n_positions: int, vocab_size: int,
                  tie_mode: str = "share") -> tuple[Any, Any, type, type]:
    """Configs and LM-head classes of one family, stock and DynTie, with the same shape:
    ``(stock_config, dyntie_config, stock_class, dyntie_class)``. Llama gets grouped-query attention (half as
    many key/value heads) and a SwiGLU width of 8/3 n_embd (rounded up to 16), so a layer has about as many
    parameters as GPT-2's; dropout is off in both."""
    from hf_dyntie.families import CAUSAL_LM, family_named

    entry = family_named(family)
    head = entry.head(CAUSAL_LM)
    if family == "gpt2":
        kw = gpt2_config_kwargs(n_layer, n_embd, n_head, n_positions, vocab_size)
    else:
        kw = dict(num_hidden_layers=n_layer, hidden_size=n_embd, num_attention_heads=n_head,
                  num_key_value_heads=max(1, n_head // 2), intermediate_size=(8 * n_embd // 3 + 15) // 16 * 16,
                  max_position_embeddings=n_positions, vocab_size=vocab_size, attention_dropout=0.0)
    return (entry.stock_config(**kw), entry.config_class()(**kw, tie_mode=tie_mode), head.stock,
            entry.dyntie_class(head))
