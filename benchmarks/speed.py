"""Speed benchmark: what tying costs (or saves) per training step, and what the policy costs in a Trainer.

Part 1 (steps): stock ``GPT2LMHeadModel`` against ``DynTieGPT2LMHeadModel`` (``--family llama``:
``LlamaForCausalLM`` against ``DynTieLlamaForCausalLM``) with the same config, weights and batches, each
with its own AdamW. Steps alternate A, B, A, B, ... so both see the same background
load; we report the median of the per-pair ratios B/A (and the ratio of medians). Absolute times are
only indicative (a shared CPU); the ratios are the result.

Part 2 (trainer, ``speed_trainer.py``): ``DynTieTrainer`` with the Q-learning policy against the same trainer replaying the
very maps that run produced (``tie_policy=replay``): same model, data, maps and retie work; only the
decisions, rewards and Q updates (and, for ``eval_batch``, the held-out forward) differ. Runs alternate
Q, R, Q, R. We also time ``DynTieTrainer._decide`` directly and the per-step training-state accounting.

    python benchmarks/speed.py              # ~10 min on 2 CPU cores
    python benchmarks/speed.py --family llama --skip-trainer   # the Llama rows (speed_llama.json)
    python benchmarks/speed.py --quick      # seconds

Part 3 (``--compiled``, its own results file ``speed_compiled``): ``torch.compile``. Step times of the
compiled stock model (``torch.compile(model)``, the whole model) against the DynTie model with compiled
layers (``model.compile_layers()``, the routing outside the graph) at the identity map and at 75% tied,
alternating as in part 1; then the compile time of a run through ``--compile-maps`` distinct maps against a
single compile, and what compiling the whole DynTie model does over ``--whole-maps`` maps (a graph per map,
then dynamo's eager fall-back).

    python benchmarks/speed.py --compiled --skip-steps --skip-trainer   # ~15 min on 2 CPU cores (inductor)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_OUTPUT, FAMILIES, family_models, machine_info, md_table, set_threads, write_results  # noqa: E402
from speed_trainer import trainer_rows  # noqa: E402
from stats import median  # noqa: E402

from hf_dyntie.training.policies.static import sequence_map  # noqa: E402
from hf_dyntie.tie_map import normalize_tie_map  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

# ------------------------------------------------------------------------------------- part 1: steps


def make_pair(args: argparse.Namespace, tie_map: list[int], tie_mode: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A stock model and a DynTie model with identical starting weights (tied positions run their root's)."""
    stock_config, dyntie_config, stock_class, dyntie_class = family_models(
        args.family, args.layers, args.embd, args.heads, args.seq_len, args.vocab_size, tie_mode
    )
    torch.manual_seed(0)
    stock = stock_class(stock_config)
    dyn = dyntie_class(dyntie_config)
    dyn.load_state_dict(stock.state_dict())
    dyn.retie(tie_map)
    return stock, dyn


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor, **kwargs: Any
               ) -> tuple[float, float]:
    """Forward + backward + AdamW step; returns (wall seconds, this process's CPU seconds). With one torch
    thread the CPU time is the work done, which other processes on a shared machine disturb far less."""
    t0, c0 = time.perf_counter(), time.process_time()
    loss = model(input_ids=batch, labels=batch, **kwargs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, time.process_time() - c0


def time_pair(args: argparse.Namespace, label: str, tie_map: list[int], tie_mode: str) -> dict[str, Any]:
    stock, dyn = make_pair(args, tie_map, tie_mode)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (stock, dyn)]
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=gen) for _ in range(8)]
    a_times, b_times, a_cpu, b_cpu = [], [], [], []
    total = args.warmup + args.steps
    for i in tqdm(range(total), desc=label, leave=False):
        batch = batches[i % len(batches)]
        order = [(0, a_times, a_cpu), (1, b_times, b_cpu)]
        for which, sink, cpu_sink in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
            seconds, cpu_seconds = train_step((stock, dyn)[which], opts[which], batch)
            if i >= args.warmup:
                sink.append(seconds)
                cpu_sink.append(cpu_seconds)
    ratios = [b / a for a, b in zip(a_times, b_times)]
    return {
        "row": label,
        "tie_map": tie_map,
        "tie_mode": tie_mode,
        "unique_layers": len(set(tie_map)),
        "stock_median_s": median(a_times),
        "dyntie_median_s": median(b_times),
        "ratio_median_of_pairs": median(ratios),
        "ratio_of_medians": median(b_times) / median(a_times),
        "overhead_pct": 100.0 * (median(ratios) - 1.0),
        "cpu_ratio_median_of_pairs": median([b / a for a, b in zip(a_cpu, b_cpu)]),
        "steps": len(ratios),
    }


def step_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    L = args.layers
    maps = {
        "identity": list(range(L)),
        "50% tied": sequence_map(L, max(1, L // 2)),
        f"{100 * (1 - max(1, L // 4) / L):.0f}% tied": sequence_map(L, max(1, L // 4)),
        "all shared": [0] * L,
    }
    rows = [time_pair(args, "identity / share", maps["identity"], "share")]
    for name, tie_map in list(maps.items())[1:]:
        for mode in ("share", "follow"):
            rows.append(time_pair(args, f"{name} / {mode}", tie_map, mode))
            print(f"  {rows[-1]['row']}: {rows[-1]['ratio_median_of_pairs']:.3f}x stock", flush=True)
    return rows


# ---------------------------------------------------------------------------------- part 3: compiled


def compile_count() -> int:
    """Frames dynamo has compiled so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def fell_back() -> bool:
    """Whether dynamo gave up on a frame after too many recompiles (it then runs it eagerly)."""
    from torch._dynamo.utils import counters

    return any("recompile_limit" in reason for reason in counters["unimplemented"])


def compile_blocks(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """The stock model with its blocks compiled one by one (regional compilation)."""
    for block in model.transformer.h:
        block.compile(backend=backend)
    return model


def time_compiled_pair(args: argparse.Namespace, label: str, tie_map: list[int], tie_mode: str,
                       control: bool = False, regional_stock: bool = False) -> dict[str, Any]:
    """Compiled stock (whole model) vs DynTie with compiled layers, alternating, after the compiling warm-up.
    ``control``: the second model is the stock model with its blocks compiled one by one (regional
    compilation, no DynTie), which tells what compiling per block costs by itself. Both models run without a
    KV cache, as ``DynTieTrainer`` does with compiled layers (a stock block compiled with a cache would
    recompile per position). ``regional_stock``: the first model is the stock model with its blocks compiled
    one by one, so the pair isolates what the routing costs. Dynamo starts empty: no row reuses another's
    graphs."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    stock, dyn = make_pair(args, tie_map, tie_mode)
    if regional_stock:
        runs = (compile_blocks(stock, args.compile_backend), dyn)
    else:
        runs = (torch.compile(stock, backend=args.compile_backend), dyn)
    if control:
        dyn = compile_blocks(make_pair(args, tie_map, tie_mode)[0], args.compile_backend)
        runs = (runs[0], dyn)
    else:
        dyn.compile_layers(backend=args.compile_backend)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (stock, dyn)]
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=gen)
    first = []
    for which in (0, 1):  # the first steps compile
        t0 = time.perf_counter()
        for _ in range(2):
            train_step(runs[which], opts[which], batch, use_cache=False)
        first.append(time.perf_counter() - t0)
    wall, cpu = ([], []), ([], [])
    for i in tqdm(range(args.steps), desc=label, leave=False):
        for which in (0, 1) if i % 2 == 0 else (1, 0):
            seconds, cpu_seconds = train_step(runs[which], opts[which], batch, use_cache=False)
            wall[which].append(seconds)
            cpu[which].append(cpu_seconds)
    ratios = [b / a for a, b in zip(*wall)]
    return {
        "row": label, "baseline": "stock, blocks compiled" if regional_stock else "torch.compile(stock)",
        "tie_map": tie_map, "tie_mode": tie_mode, "unique_layers": len(set(tie_map)),
        "stock_compiled_median_s": median(wall[0]), "dyntie_compiled_median_s": median(wall[1]),
        "ratio_median_of_pairs": median(ratios), "ratio_of_medians": median(wall[1]) / median(wall[0]),
        "cpu_ratio_median_of_pairs": median([b / a for a, b in zip(*cpu)]),
        "stock_first_two_steps_s": first[0], "dyntie_first_two_steps_s": first[1], "steps": len(ratios),
        "compilations": compile_count(), "fell_back_to_eager": fell_back(),
    }


def compiled_step_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    L = args.layers
    quarter = sequence_map(L, max(1, L // 4))
    tied = f"{100 * (1 - max(1, L // 4) / L):.0f}% tied"
    identity = list(range(L))
    rows = [time_compiled_pair(args, "control: stock, blocks compiled one by one", identity, "share", control=True),
            time_compiled_pair(args, "identity / share", identity, "share"),
            time_compiled_pair(args, "identity / share, vs stock with blocks compiled", identity, "share",
                               regional_stock=True)]
    for row in rows:
        print(f"  compiled {row['row']}: {row['ratio_median_of_pairs']:.3f}x {row['baseline']}", flush=True)
    for mode in ("share", "follow"):
        rows.append(time_compiled_pair(args, f"{tied} / {mode}", quarter, mode))
        print(f"  compiled {rows[-1]['row']}: {rows[-1]['ratio_median_of_pairs']:.3f}x {rows[-1]['baseline']}", flush=True)
    return rows


def random_maps(count: int, num_layers: int, seed: int = 0) -> list[list[int]]:
    """``count`` distinct random tie maps (about a third of the positions untied)."""
    gen, maps = torch.Generator().manual_seed(seed), []
    while len(maps) < count:
        draws = [i if torch.rand((), generator=gen) < 0.3 else int(torch.randint(0, i + 1, (), generator=gen))
                 for i in range(num_layers)]
        tie_map = normalize_tie_map(draws, num_layers)
        if tie_map not in maps:
            maps.append(tie_map)
    return maps


def compile_run(args: argparse.Namespace, maps: list[list[int]], whole: bool) -> dict[str, Any]:
    """Two training steps on each map, follow mode (the mode with the most graphs), on the small compile-time
    model; the seconds spent compiling are the steps that compiled minus a steady step."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import torch._inductor.config

    torch._inductor.config.force_disable_caches = True  # every compile is a cold one, as in a fresh run
    torch._dynamo.reset()
    counters.clear()  # this run's compilations only
    shape = argparse.Namespace(**{**vars(args), "layers": args.compile_layers, "embd": args.compile_embd})
    _, dyn = make_pair(shape, maps[0], "follow")
    run = torch.compile(dyn, backend=args.compile_backend) if whole else dyn
    if not whole:
        dyn.compile_layers(backend=args.compile_backend)
    opt = torch.optim.AdamW(dyn.parameters(), lr=1e-4)
    batch = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(1))
    compiling, steady, per_map = [], [], []
    for tie_map in tqdm(maps, desc="whole model" if whole else "compiled layers", leave=False):
        dyn.retie(tie_map)
        for _ in range(2):
            before = compile_count()
            seconds, _ = train_step(run, opt, batch, use_cache=False)
            (compiling if compile_count() > before else steady).append(seconds)
        per_map.append(compile_count())
    step = median(steady) if steady else 0.0
    return {
        "row": f"{'torch.compile(model)' if whole else 'compile_layers()'}, {len(maps)} maps",
        "maps": len(maps), "compilations": compile_count(), "compile_s": sum(t - step for t in compiling),
        "first_compile_s": compiling[0] - step if compiling else 0.0, "steady_step_s": step,
        "fell_back_to_eager": fell_back(), "compilations_after_each_map": per_map,
    }


def compile_time_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    maps = random_maps(args.compile_maps, args.compile_layers)
    rows = [compile_run(args, maps, whole=False)]
    if args.whole_maps > 0:
        rows.append(compile_run(args, maps[: args.whole_maps], whole=True))
    for row in rows:
        row["compile_vs_single"] = row["compile_s"] / row["first_compile_s"] if row["first_compile_s"] else None
        print(f"  {row['row']}: {row['compilations']} compilations, {row['compile_s']:.1f} s compiling "
              f"({row['compile_vs_single']:.2f}x a single compile), fell back: {row['fell_back_to_eager']}", flush=True)
    return rows


def compiled_markdown(args: argparse.Namespace, steps: list[dict[str, Any]], compile_rows: list[dict[str, Any]]) -> str:
    return (
        f"Backend `{args.compile_backend}`. Step rows: GPT-2, {args.layers} layers, n_embd {args.embd}, seq {args.seq_len}, "
        f"batch {args.batch_size}, vocab {args.vocab_size}, {args.threads} torch thread(s); compiled stock = "
        "`torch.compile(GPT2LMHeadModel)` (whole model), compiled DynTie = `model.compile_layers()` (blocks compiled, "
        f"routing outside the graph; embeddings, head and loss eager); {args.steps} timed steps each after two compiling "
        "steps, alternating. Ratio = median over pairs of DynTie / stock step time. The control row compiles the "
        "stock model's blocks one by one (regional compilation, no DynTie): the cost of compiling per block by "
        "itself; the row against that stock model is the cost of the routing alone. Every model runs with `use_cache=False` (what DynTieTrainer passes with compiled layers).\n\n"
        + md_table(steps, ["row", "baseline", "unique_layers", "stock_compiled_median_s", "dyntie_compiled_median_s",
                           "ratio_median_of_pairs", "ratio_of_medians", "cpu_ratio_median_of_pairs", "compilations",
                           "fell_back_to_eager"],
                   ["map / mode", "baseline", "unique layers", "baseline median (s)", "compiled DynTie median (s)",
                    "ratio (median of pairs)", "ratio of medians", "CPU-time ratio", "compilations (both models)",
                    "fell back to eager"])
        + f"\n\nCompile time: GPT-2 {args.compile_layers} layers x n_embd {args.compile_embd}, follow mode, two training "
        "steps per map, distinct random maps, inductor's caches off (every compile cold). Compile seconds = time of the "
        "steps that compiled minus a steady step.\n\n"
        + md_table(compile_rows, ["row", "compilations", "compile_s", "first_compile_s", "compile_vs_single",
                                  "steady_step_s", "fell_back_to_eager"],
                   ["run", "compilations", "compile time (s)", "single compile (s)", "total / single",
                    "steady step (s)", "fell back to eager"])
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (seconds)")
    p.add_argument("--family", choices=FAMILIES, default="gpt2",
                   help="architecture of the step rows (llama: GQA with half the heads for keys/values, SwiGLU)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--embd", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model per row (after warm-up)")
    p.add_argument("--trainer-layers", type=int, default=12)
    p.add_argument("--trainer-steps", type=int, default=60)
    p.add_argument("--trainer-repeats", type=int, default=2)
    p.add_argument("--skip-trainer", action="store_true")
    p.add_argument("--skip-steps", action="store_true", help="skip part 1 (eager step rows)")
    p.add_argument("--compiled", action="store_true", help="part 3: torch.compile rows (results in speed_compiled)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--compile-layers", type=int, default=6, help="depth of the compile-time model")
    p.add_argument("--compile-embd", type=int, default=128, help="width of the compile-time model")
    p.add_argument("--compile-maps", type=int, default=50, help="distinct maps of the compile-time run")
    p.add_argument("--whole-maps", type=int, default=10, help="maps for torch.compile(model) (0: skip)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared 2-core CPU)")
    args = p.parse_args()
    if args.quick:
        args.layers, args.embd, args.heads, args.seq_len, args.batch_size, args.vocab_size = 4, 32, 2, 16, 2, 128
        args.warmup, args.steps, args.trainer_layers, args.trainer_steps, args.trainer_repeats = 1, 4, 4, 8, 1
        args.compile_layers, args.compile_embd, args.compile_maps, args.whole_maps = 4, 32, 6, 3
    hf_logging.set_verbosity_error()
    set_threads(args.threads)
    if args.compiled:
        compiled_part(args)
        if args.skip_steps and args.skip_trainer:
            return

    print("part 1: training steps, DynTie vs stock (alternating, same weights and batches)")
    steps = [] if args.skip_steps else step_rows(args)
    trainer = [] if args.skip_trainer else trainer_rows(args)
    name = ("speed" if args.family == "gpt2" else f"speed_{args.family}") + ("_quick" if args.quick else "")
    shape = "GPT-2" if args.family == "gpt2" else "Llama (key/value heads = heads / 2, SwiGLU 8/3 n_embd)"
    md = (
        f"Model: {shape}, {args.layers} layers, n_embd {args.embd}, seq {args.seq_len}, batch {args.batch_size}, vocab "
        f"{args.vocab_size}, {args.threads} torch thread(s); {args.steps} timed steps per model after {args.warmup} warm-up, A/B alternating. "
        "Ratio = median over steps of (DynTie step time / stock step time in the same pair); the CPU-time ratio is "
        "the same with this process's CPU time, which other processes on a shared CPU disturb far less.\n\n"
        + md_table(steps, ["row", "unique_layers", "stock_median_s", "dyntie_median_s", "ratio_median_of_pairs",
                           "ratio_of_medians", "overhead_pct", "cpu_ratio_median_of_pairs"],
                   ["map / mode", "unique layers", "stock median (s)", "DynTie median (s)", "ratio (median of pairs)",
                    "ratio of medians", "overhead %", "CPU-time ratio (median of pairs)"])
    )
    if trainer:
        md += (
            f"\n\nTrainer: {args.trainer_layers} layers, {args.trainer_steps} steps, decisions every 4 steps, "
            f"{args.trainer_repeats} runs of each, alternating. Policy share = time inside `_decide` (Q-learning) "
            "minus time inside `_decide` (replay of the same maps), over the whole train() time.\n\n"
            + md_table(trainer, ["row", "decisions", "median_step_s", "policy_cost_share_pct", "decide_share_qlearning_pct",
                                 "decide_share_replay_pct", "train_time_ratio", "accounting_share_pct"],
                       ["comparison", "decisions", "median step (s)", "policy cost % of train", "_decide % (Q)",
                        "_decide % (replay)", "whole train() Q / replay", "state accounting % of a step"])
        )
    payload = {"machine": machine_info(), "args": vars(args), "steps": steps, "trainer": trainer}
    write_results(args.output, name, payload, md)
    print(md)


def compiled_part(args: argparse.Namespace) -> None:
    print(f"part 3: torch.compile ({args.compile_backend}), DynTie compiled layers vs compiled stock")
    steps = compiled_step_rows(args)
    compile_rows = compile_time_rows(args)
    name = "speed_compiled" + ("_quick" if args.quick else "")
    payload = {"machine": {**machine_info(), "machine": "2-core shared CPU VM (other engineers' jobs running)"}
               if not torch.cuda.is_available() and os.cpu_count() == 2 else machine_info(),
               "args": vars(args), "compiled_steps": steps, "compile_time": compile_rows}
    md = compiled_markdown(args, steps, compile_rows)
    write_results(args.output, name, payload, md)
    print(md)


if __name__ == "__main__":
    main()
