"""Checkpoint benchmark: compact (roots only) against expanded (every layer) size, and load time.

For each tie map: ``save_pretrained`` of the DynTie model (compact) and ``hf_dyntie.convert.expand`` of it
(a plain ``GPT2LMHeadModel`` folder). We compare ``model.safetensors`` with the analytic roots-only size
((roots x per-layer + outside-the-stack parameters) x 4 bytes) and time ``from_pretrained`` of both folders,
alternating compact / expanded loads and taking medians. Loading the compact folder is also checked to
reproduce the saved model's logits.

    python benchmarks/checkpoints.py            # 24 layers x n_embd 256 (about a minute)
    python benchmarks/checkpoints.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_OUTPUT, gpt2_config_kwargs, machine_info, md_table, set_threads, write_results  # noqa: E402
from stats import median  # noqa: E402

from hf_dyntie import DynTieGPT2Config, DynTieGPT2LMHeadModel  # noqa: E402
from hf_dyntie.convert import expand  # noqa: E402
from hf_dyntie.training.policies.static import sequence_map  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402


def roots_only_bytes(model: DynTieGPT2LMHeadModel) -> int:
    summary = model.tie_summary()
    return summary["stored_parameters"] * 4


def safetensors_data_bytes(path: Path) -> int:
    """File size minus the 8-byte length and the JSON header: the tensor bytes alone."""
    with path.open("rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


def time_loads(compact: Path, expanded: Path, repeats: int) -> tuple[list[float], list[float]]:
    a, b = [], []
    for i in range(repeats):
        for path, sink in ((compact, a), (expanded, b)) if i % 2 == 0 else ((expanded, b), (compact, a)):
            t0 = time.perf_counter()
            AutoModelForCausalLM.from_pretrained(path)
            sink.append(time.perf_counter() - t0)
    return a, b


def measure(args: argparse.Namespace, name: str, tie_map: list[int], tmp: Path) -> dict[str, Any]:
    kw = gpt2_config_kwargs(args.layers, args.embd, args.heads, 64, args.vocab_size)
    torch.manual_seed(0)
    model = DynTieGPT2LMHeadModel(DynTieGPT2Config(**kw, tie_map=tie_map)).eval()
    compact, expanded = tmp / f"{name}_compact", tmp / f"{name}_expanded"
    model.save_pretrained(compact)
    expand(model, expanded)
    c_bytes = (compact / "model.safetensors").stat().st_size
    e_bytes = (expanded / "model.safetensors").stat().st_size
    analytic = roots_only_bytes(model)
    c_data = safetensors_data_bytes(compact / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(compact).eval()
    x = torch.randint(0, args.vocab_size, (1, 16))
    with torch.no_grad():
        same = torch.allclose(loaded(x).logits, model(x).logits, atol=1e-5)
    load_c, load_e = time_loads(compact, expanded, args.repeats)
    return {
        "map": name, "unique_layers": len(set(tie_map)), "tie_map": tie_map,
        "compact_bytes": c_bytes, "expanded_bytes": e_bytes, "analytic_roots_bytes": analytic,
        "compact_over_analytic": c_bytes / analytic, "compact_tensor_bytes": c_data,
        "header_bytes": c_bytes - c_data, "tensor_bytes_over_analytic": c_data / analytic, "within_1pct": abs(c_bytes / analytic - 1) <= 0.01,
        "expanded_over_compact": e_bytes / c_bytes,
        "compact_load_s_median": median(load_c), "expanded_load_s_median": median(load_e),
        "load_time_ratio": median(load_c) / median(load_e), "compact_reloads_same_logits": same,
        "loaded_tie_map": loaded.tie_map,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--embd", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5, help="loads of each folder (alternating)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.quick:
        args.layers, args.embd, args.heads, args.vocab_size, args.repeats = 4, 32, 2, 128, 1
    hf_logging.set_verbosity_error()
    set_threads(args.threads)
    L = args.layers
    maps = {"untied": list(range(L)), "50% tied": sequence_map(L, max(1, L // 2)),
            "75% tied": sequence_map(L, max(1, L // 4)), "90% tied": sequence_map(L, max(1, round(L / 10))),
            "all shared": [0] * L}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, tie_map in tqdm(maps.items(), desc="maps"):
            rows.append(measure(args, name, tie_map, Path(tmp)))
    md = (
        f"Model: DynTie GPT-2, {L} layers, n_embd {args.embd}, vocab {args.vocab_size}, fp32 safetensors. Sizes are "
        f"of model.safetensors; load = `AutoModelForCausalLM.from_pretrained`, median of {args.repeats} alternating "
        "loads per folder.\n\n"
        + md_table(
            [{**r, "compact_MiB": r["compact_bytes"] / 2**20, "expanded_MiB": r["expanded_bytes"] / 2**20,
              "analytic_MiB": r["analytic_roots_bytes"] / 2**20} for r in rows],
            ["map", "unique_layers", "compact_MiB", "analytic_MiB", "compact_over_analytic", "within_1pct",
             "tensor_bytes_over_analytic",
             "expanded_MiB", "expanded_over_compact", "compact_load_s_median", "expanded_load_s_median",
             "load_time_ratio", "compact_reloads_same_logits"],
            ["map", "unique layers", "compact (MiB)", "roots-only analytic (MiB)", "compact / analytic", "within 1%", "tensor bytes / analytic",
             "expanded (MiB)", "expanded / compact", "compact load (s)", "expanded load (s)", "load ratio c/e",
             "same logits"])
        + "\n\nExpanded with: hf_dyntie.convert.expand. \"compact / analytic\" counts the whole file; "
        "\"tensor bytes\" leaves out the safetensors JSON header (a few hundred bytes per tensor)."
    )
    write_results(args.output, "checkpoints_quick" if args.quick else "checkpoints",
                  {"machine": machine_info(), "args": vars(args), "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
