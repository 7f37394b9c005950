"""Memory benchmark: training state (weights + grads + AdamW moments) and peak RSS under several tie maps.

For each map a fresh subprocess builds the model (stock ``GPT2LMHeadModel`` or ``DynTieGPT2LMHeadModel``;
``--family llama``: ``LlamaForCausalLM`` or ``DynTieLlamaForCausalLM``),
trains a few AdamW steps by hand and, right before the last ``optimizer.step()`` (grads and moments both
live), counts the training state from live tensors by unique storage (``hf_dyntie.training.accounting.training_state_bytes``).
A fresh process per map keeps the peak RSS (``ru_maxrss``) of one map from hiding another's.

Analytic minimum per map = (roots' parameters + parameters outside the stack) x (1 weight + 1 grad + 2
moments) x 4 bytes. A retie check then shows that memory freed by tying stays freed and comes back on untie.

    python benchmarks/memory.py            # 48 layers x n_embd 512, GPT-2 vocab (a few minutes)
    python benchmarks/memory.py --quick    # seconds
    python benchmarks/memory.py --family llama   # the same for a Llama (memory_llama.json)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_OUTPUT, FAMILIES, family_models, machine_info, md_table, set_threads, write_results  # noqa: E402

BYTES_PER_TRAINED_PARAM = 4 * 4  # fp32 weight + grad + AdamW exp_avg + exp_avg_sq


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The big model both memory.py and structure_cost.py measure (48 x 512, vocab 50,257, seq 32, batch 1)."""
    p.add_argument("--quick", action="store_true", help="tiny model (seconds)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--embd", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--threads", type=int, default=1)


def tie_maps(num_layers: int) -> dict[str, list[int] | None]:
    """The maps we measure (``None``: the stock transformers model). Tied groups are consecutive
    (``sequence``); where groups sit does not change the memory, only how many roots there are."""
    from hf_dyntie.training.policies.static import sequence_map

    L = num_layers
    return {
        "stock": None,
        "untied": list(range(L)),
        "50% tied": sequence_map(L, max(1, round(L * 0.5))),
        "75% tied": sequence_map(L, max(1, round(L * 0.25))),
        "90% tied": sequence_map(L, max(1, round(L * 0.1))),
        "all shared": [0] * L,
    }


def build(args: argparse.Namespace, tie_map: list[int] | None) -> torch.nn.Module:
    """The stock model (``tie_map=None``) or the DynTie one of ``args.family`` (GPT-2 unless given)."""
    stock_config, dyntie_config, stock_class, dyntie_class = family_models(
        getattr(args, "family", "gpt2"), args.layers, args.embd, args.heads, args.seq_len, args.vocab_size
    )
    torch.manual_seed(0)
    if tie_map is None:
        return stock_class(stock_config)
    dyntie_config.tie_map = tie_map
    return dyntie_class(dyntie_config)


def layer_stack(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The layer stack of a stock or DynTie model (``transformer.h``, ``model.layers``, ...)."""
    from hf_dyntie.families import family_of_class

    family, head = family_of_class(type(model))
    return model.get_submodule(family.layers_path(head.stock))


def analytic(model: torch.nn.Module, tie_map: list[int] | None, num_layers: int) -> dict[str, int]:
    """Trainable parameters under the map: roots of the stack plus everything outside it (unique objects)."""
    stack = layer_stack(model)
    per_layer = sum(p.numel() for p in stack[0].parameters())
    stack_ids = {id(p) for p in stack.parameters()}
    outside = sum(p.numel() for p in model.parameters() if id(p) not in stack_ids)
    roots = num_layers if tie_map is None else len(set(tie_map))
    return {"per_layer": per_layer, "outside": outside, "roots": roots,
            "min_bytes": (roots * per_layer + outside) * BYTES_PER_TRAINED_PARAM,
            "min_stack_bytes": roots * per_layer * BYTES_PER_TRAINED_PARAM}


def train_and_measure(model: torch.nn.Module, opt: torch.optim.Optimizer, args: argparse.Namespace, steps: int
                      ) -> dict[str, int]:
    """``steps`` AdamW steps; the state is counted on the last one, after backward and before step()."""
    from hf_dyntie.training.accounting import training_state_bytes

    gen = torch.Generator().manual_seed(0)
    state: dict[str, int] = {}
    for i in range(steps):
        x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=gen)
        model(input_ids=x, labels=x).loss.backward()
        if i == steps - 1:
            state = training_state_bytes(model, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return state


def worker(args: argparse.Namespace) -> None:
    """One map in this fresh process; prints one JSON line."""
    set_threads(args.threads)
    tie_map = json.loads(args.worker_map)
    model = build(args, tie_map)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    state = train_and_measure(model, opt, args, args.steps)
    result = {"state": state, **analytic(model, tie_map, args.layers),
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print("RESULT " + json.dumps(result))


def measure_map(args: argparse.Namespace, tie_map: list[int] | None) -> dict[str, Any]:
    if args.in_process:  # tests: no interpreter start-ups; the RSS is then this process's peak so far
        model = build(args, tie_map)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
        state = train_and_measure(model, opt, args, args.steps)
        return {"state": state, **analytic(model, tie_map, args.layers),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    cmd = [sys.executable, __file__, "--worker-map", json.dumps(tie_map), "--layers", str(args.layers), "--embd",
           str(args.embd), "--heads", str(args.heads), "--seq-len", str(args.seq_len), "--batch-size",
           str(args.batch_size), "--vocab-size", str(args.vocab_size), "--steps", str(args.steps),
           "--threads", str(args.threads), "--family", args.family]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def retie_check(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Untied -> 75% tied -> untied in one live model and optimizer: the state must follow the map's minimum."""
    maps = tie_maps(args.retie_layers)
    small = argparse.Namespace(**{**vars(args), "layers": args.retie_layers, "embd": args.retie_embd})
    model = build(small, maps["untied"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    rows = []
    for label in ("untied", "75% tied", "untied"):
        report = model.retie(maps[label])
        from hf_dyntie.training.optimizer_state import carry_optimizer_state

        carry_optimizer_state(opt, report.moves)  # what DynTieTrainer does: released drop, untied copy the root's
        state = train_and_measure(model, opt, small, 2)
        minimum = analytic(model, maps[label], small.layers)["min_bytes"]
        rows.append({"phase": f"{len(rows) + 1}. {label}", "tie_map": maps[label], "measured_bytes": state["total"],
                     "min_bytes": minimum, "measured_over_min": state["total"] / minimum})
    return rows


def fsdp_worker(args: argparse.Namespace) -> None:
    """Rank of a two-process run: per-rank training state under FSDP2 and under DDP, 5 roots and identity."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from hf_dyntie.training.accounting import training_state_bytes
    from hf_dyntie.training.policies.static import sequence_map

    dist.init_process_group("gloo")
    set_threads(args.threads)
    world = dist.get_world_size()
    rows = []
    for name, tie_map in (("5 roots", sequence_map(args.layers, 5)), ("identity", list(range(args.layers)))):
        for engine in ("FSDP2", "DDP"):
            model = build(args, tie_map)
            wrapped = model.shard() if engine == "FSDP2" else DistributedDataParallel(model, find_unused_parameters=True)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
            gen = torch.Generator().manual_seed(dist.get_rank())
            for step in range(args.steps):
                x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=gen)
                wrapped(input_ids=x, labels=x).loss.backward()
                if step == args.steps - 1:
                    state = training_state_bytes(model, opt)  # by unique local storage
                opt.step()
                opt.zero_grad(set_to_none=True)
            rows.append({"map": name, "engine": engine, "state": state, **analytic(model, tie_map, args.layers)})
            del model, wrapped, opt
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"world": world, "rows": rows}))
    dist.destroy_process_group()


def fsdp_main(args: argparse.Namespace) -> None:
    """``--fsdp``: the two-process measurement (torchrun, gloo), its table and files."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, "--fsdp-worker",
           "--layers", str(args.layers), "--embd", str(args.embd), "--heads", str(args.heads), "--seq-len",
           str(args.seq_len), "--vocab-size", str(args.vocab_size), "--steps", str(args.steps), "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        raise SystemExit(f"memory.py --fsdp: the two-process run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(found[0].removeprefix("RESULT "))
    world, rows = result["world"], result["rows"]
    ddp = {r["map"]: r["state"]["total"] for r in rows if r["engine"] == "DDP"}
    table = []
    for r in rows:
        minimum = r["min_bytes"] / (world if r["engine"] == "FSDP2" else 1)
        table.append({"map": r["map"], "engine": r["engine"], "unique_layers": r["roots"],
                      "state_MiB": r["state"]["total"] / 2**20, "min_MiB": minimum / 2**20,
                      "over_min": r["state"]["total"] / minimum, "ddp_over_this": ddp[r["map"]] / r["state"]["total"],
                      **{f"{k}_bytes": v for k, v in r["state"].items()}})
        print(f"  {r['map']} / {r['engine']}: {table[-1]['state_MiB']:.1f} MiB per rank "
              f"(analytic {table[-1]['min_MiB']:.1f}), DDP / this {table[-1]['ddp_over_this']:.2f}x", flush=True)
    md = (f"Per-rank training state (parameters + gradients + AdamW moments, fp32, by unique local storage, right "
          f"before optimizer.step() of step {args.steps}) at world {world} (two gloo processes on CPU), GPT-2 "
          f"{args.layers} x {args.embd}, vocab {args.vocab_size}. FSDP2: model.shard() (each block a unit, then the "
          "model; the units accelerate's FSDP2 makes); analytic = roots-only training state / world. DDP: the "
          "whole unique state on every rank.\n\n"
          + md_table(table, ["map", "engine", "unique_layers", "state_MiB", "min_MiB", "over_min", "ddp_over_this"],
                     ["map", "engine", "unique layers", "state per rank (MiB)", "analytic (MiB)", "measured / analytic",
                      "DDP per rank / this"]))
    name = "memory_fsdp" + ("_quick" if args.quick else "")
    write_results(args.output, name, {"machine": machine_info(), "args": vars(args), "world": world, "rows": table}, md)
    print(md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--family", choices=FAMILIES, default="gpt2",
                   help="architecture (llama: GQA with half the heads for keys/values, SwiGLU)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--retie-layers", type=int, default=12)
    p.add_argument("--retie-embd", type=int, default=256)
    p.add_argument("--in-process", action="store_true",
                   help="measure every map in this process (fast; peak RSS is then not separable per map)")
    p.add_argument("--fsdp", action="store_true",
                   help="per-rank state at world 2 under FSDP2 against DDP (5 roots and the identity map; torchrun)")
    p.add_argument("--worker-map", default=None, help=argparse.SUPPRESS)
    p.add_argument("--fsdp-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_map is not None:
        return worker(args)
    if args.fsdp_worker:
        return fsdp_worker(args)
    if args.quick:
        args.layers, args.embd, args.heads, args.seq_len, args.vocab_size = 8, 32, 2, 8, 256
        args.retie_layers, args.retie_embd = 4, 32
    if args.fsdp:
        return fsdp_main(args)
    set_threads(args.threads)

    rows = []
    stock_total = stock_stack = None
    for name, tie_map in tqdm(tie_maps(args.layers).items(), desc="maps"):
        r = measure_map(args, tie_map)
        total = r["state"]["total"]
        stack_measured = total - r["outside"] * BYTES_PER_TRAINED_PARAM
        if name == "stock":
            stock_total, stock_stack = total, stack_measured
        rows.append({
            "map": name, "unique_layers": r["roots"], "tie_map": tie_map,
            "measured_bytes": total, "parameters_bytes": r["state"]["parameters"],
            "gradients_bytes": r["state"]["gradients"], "optimizer_bytes": r["state"]["optimizer"],
            "min_bytes": r["min_bytes"], "measured_over_min": total / r["min_bytes"],
            "within_5pct": abs(total / r["min_bytes"] - 1) <= 0.05,
            "ratio_to_stock": stock_total / total, "stack_only_bytes": stack_measured,
            "stack_ratio_to_stock": stock_stack / max(1, stack_measured),
            "peak_rss_bytes": r["peak_rss_bytes"], "per_layer_params": r["per_layer"], "outside_params": r["outside"],
        })
        print(f"  {name}: {total / 2**20:.1f} MiB state (min {r['min_bytes'] / 2**20:.1f}), "
              f"{stock_total / total:.2f}x smaller than stock, RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    retie = retie_check(args)

    outside_share = rows[0]["outside_params"] / (rows[0]["outside_params"] + args.layers * rows[0]["per_layer_params"])
    shape = "GPT-2" if args.family == "gpt2" else "Llama (key/value heads = heads / 2, SwiGLU 8/3 n_embd)"
    md = (
        f"Model: {shape}, {args.layers} layers, n_embd {args.embd}, vocab {args.vocab_size} (outside the stack: "
        f"embedding, LM head{' (tied)' if args.family == 'gpt2' else ''}, final norm = {100 * outside_share:.1f}% of "
        f"the stock parameters), seq {args.seq_len}, batch {args.batch_size}, AdamW "
        f"(fp32). State counted by unique storage right before optimizer.step() of step {args.steps}; each map in a "
        "fresh process. \"x smaller\" = stock state / this map's state; \"stack only\" leaves out everything "
        "outside the layer stack (embeddings, final norm).\n\n"
        + md_table(
            [{**r, "measured_MiB": r["measured_bytes"] / 2**20, "min_MiB": r["min_bytes"] / 2**20,
              "rss_MiB": r["peak_rss_bytes"] / 2**20} for r in rows],
            ["map", "unique_layers", "measured_MiB", "min_MiB", "measured_over_min", "within_5pct", "ratio_to_stock",
             "stack_ratio_to_stock", "rss_MiB"],
            ["map", "unique layers", "training state (MiB)", "analytic min (MiB)", "measured / min", "within 5%",
             "x smaller than stock", "x smaller (stack only)", "peak RSS (MiB)"])
        + f"\n\nRetie during training ({args.retie_layers} layers, n_embd {args.retie_embd}, one live model and "
        "AdamW; optimizer state of reset parameters dropped as DynTieTrainer does):\n\n"
        + md_table(retie, ["phase", "measured_bytes", "min_bytes", "measured_over_min"],
                   ["phase", "training state (bytes)", "analytic min (bytes)", "measured / min"])
    )
    payload = {"machine": machine_info(), "args": vars(args), "rss_per_map": not args.in_process, "rows": rows, "retie": retie}
    name = ("memory" if args.family == "gpt2" else f"memory_{args.family}") + ("_quick" if args.quick else "")
    write_results(args.output, name, payload, md)
    print(md)


if __name__ == "__main__":
    main()
