"""Action-effect SNR probe in the char-level harness's regime: can one tie action's effect be told from noise?

Train ``sequence_u`` (share mode, the harness's optimizer and schedule, seed ``--seed``) to 50% of a
``--steps`` run. For every distinct map one action reaches from there (tie position l to an earlier root, or
untie it, l = 1..7): restore the snapshot, apply the map with ``model.retie`` and carry the optimizer state
along its moves (as ``DynTieTrainer`` does), train ``--horizon`` more steps and score the validation slice.
Each map runs under ``--orders`` data orders (the same batches for every map of one order), keep included.

Effect(m, o) = val(m, o) - val(keep, o), paired within an order. Signal = sd over maps of the order-mean
effect; noise = the pooled sd of one map's effect across orders. A controller that scores tie actions can
only be judged in a regime where signal >= 3x noise ("go"). Writes ``charlm_snr.json`` / ``.md``.

    python benchmarks/charlm_snr.py --budget 4 --steps 1200 --seed 0 --device cuda
    python benchmarks/charlm_snr.py --quick --output /tmp/snr     # seconds
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from charlm_rows import POSITIONS, QUICK, QUICK_STEPS, REGIME  # noqa: E402
from common import DEFAULT_OUTPUT, gpt2_config_kwargs, machine_info, md_table, set_threads, write_results  # noqa: E402
from data import load_chars, window_offsets  # noqa: E402


def lr_at(t: int, steps: int, regime: dict[str, Any]) -> float:
    """transformers' cosine schedule with linear warm-up, as the harness's cells train."""
    warm = max(1, int(round(regime["warmup_frac"] * steps)))
    if t < warm:
        return regime["lr"] * t / warm
    return regime["lr"] * 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, steps - warm)))


def make_optimizer(model, regime: dict[str, Any]) -> torch.optim.AdamW:
    """AdamW with the Trainer's grouping: weight decay on matrices only."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": regime["weight_decay"]},
                              {"params": rest, "weight_decay": 0.0}], lr=regime["lr"], betas=regime["betas"])


def train_steps(model, opt, windows, t_start: int, ctx: dict[str, Any]) -> None:
    """One optimizer step per row of window offsets, from schedule step ``t_start`` on, gradients clipped."""
    regime, data, steps = ctx["regime"], ctx["data"], ctx["steps"]
    model.train()
    for k, offsets in enumerate(windows):
        x = torch.stack([data["train"][o: o + regime["seq_len"]] for o in offsets.tolist()]).to(ctx["device"])
        for group in opt.param_groups:
            group["lr"] = lr_at(t_start + k, steps, regime)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                       regime["max_grad_norm"])
        opt.step()


@torch.no_grad()
def val_bpc(model, ctx: dict[str, Any]) -> float:
    """Bits per character on the validation slice."""
    regime, data = ctx["regime"], ctx["data"]
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(data["val"]), regime["eval_batch_size"]):
        x = data["val"][i: i + regime["eval_batch_size"]].to(ctx["device"])
        total += model(input_ids=x, labels=x).loss.item() * len(x)
        n += len(x)
    model.train()
    return total / n / math.log(2)


def retie_like_trainer(model, optimizer, tie_map: list[int]) -> None:
    """``model.retie`` plus what DynTieTrainer does to the optimizer state: carry it along the report's ``moves``."""
    from hf_dyntie.training.optimizer_state import carry_optimizer_state

    carry_optimizer_state(optimizer, model.retie(tie_map).moves)


def one_action_maps(start_map: list[int]) -> dict[tuple[int, ...], str]:
    """``keep`` and every distinct map one action reaches, labelled ``l<position>a<action>``."""
    from hf_dyntie.tie_map import apply_actions

    maps: dict[tuple[int, ...], str] = {tuple(start_map): "keep"}
    for layer in range(1, POSITIONS):
        for action in range(layer + 1):
            m = tuple(apply_actions(start_map, {layer: action}))
            maps.setdefault(m, f"l{layer}a{action}")
    return maps


def probe(args: argparse.Namespace, regime: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Pre-train, snapshot, then every one-action map under every data order; the payload of the JSON."""
    from hf_dyntie import DynTieGPT2Config, DynTieGPT2LMHeadModel
    from hf_dyntie.training.policies.static import sequence_map

    seed, steps, orders = args.seed, args.steps, args.orders
    ctx = {"regime": regime, "data": data, "steps": steps, "device": args.device}
    pre = steps // 2
    horizon = min(args.horizon, steps - pre)  # never past the end of the schedule
    bs, seq = regime["batch_size"], regime["seq_len"]

    t0 = time.perf_counter()
    start_map = sequence_map(POSITIONS, args.budget)
    offsets = window_offsets(seed, pre * bs, len(data["train"]), seq).view(pre, bs)
    torch.manual_seed(seed)
    config = DynTieGPT2Config(**gpt2_config_kwargs(POSITIONS, regime["embd"], regime["heads"], seq,
                                                   data["vocab_size"]), tie_map=start_map, tie_mode="share")
    model = DynTieGPT2LMHeadModel(config).to(args.device)
    opt = make_optimizer(model, regime)
    train_steps(model, opt, tqdm(offsets, desc="snr pre-train", mininterval=10, file=sys.stdout), 0, ctx)
    snapshot_val = val_bpc(model, ctx)
    snap_model, snap_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    print(f"snr: pre-trained {pre} steps of sequence_u{args.budget} in {time.perf_counter() - t0:.0f}s, "
          f"val {snapshot_val:.4f} bpc", flush=True)

    maps = one_action_maps(start_map)
    order_windows = [window_offsets(10_000 + seed * 100 + o, horizon * bs, len(data["train"]), seq).view(horizon, bs)
                     for o in range(orders)]
    results = {label: {"tie_map": list(m), "val_bpc": []} for m, label in maps.items()}
    for m, label in tqdm(list(maps.items()), desc="snr maps", mininterval=10, file=sys.stdout):
        for o in range(orders):
            model.retie(start_map)
            model.load_state_dict(snap_model)
            opt.load_state_dict(snap_opt)
            retie_like_trainer(model, opt, list(m))
            train_steps(model, opt, order_windows[o], pre, ctx)
            results[label]["val_bpc"].append(val_bpc(model, ctx))
    meta = {"seed": seed, "steps": steps, "snapshot_step": pre, "horizon": horizon, "orders": orders,
            "budget": args.budget, "start_map": start_map, "regime": regime, "snapshot_val_bpc": snapshot_val,
            "seconds": time.perf_counter() - t0}
    return {"machine": machine_info(), "meta": meta, "maps": results, **signal_and_noise(results, orders)}


def signal_and_noise(results: dict[str, dict[str, Any]], orders: int) -> dict[str, Any]:
    """Paired effects against ``keep``, the signal and noise sds, their ratio and the go decision."""
    keep = results["keep"]["val_bpc"]
    effects = {label: [v - k for v, k in zip(r["val_bpc"], keep)] for label, r in results.items() if label != "keep"}
    mean_effects = {label: sum(e) / len(e) for label, e in effects.items()}
    signal = statistics.stdev(mean_effects.values()) if len(mean_effects) > 1 else None
    noise = math.sqrt(sum(statistics.variance(e) for e in effects.values()) / len(effects)) if orders > 1 else None
    return {
        "effects": effects,
        "mean_effects": mean_effects,
        "signal_sd": signal,
        "paired_noise_sd": noise,
        "snr": None if not signal or not noise else signal / noise,
        "go": None if not signal or not noise else bool(signal >= 3 * noise),
    }


def markdown(payload: dict[str, Any]) -> str:
    """The maps sorted by effect, after a paragraph with the signal, the noise and the SNR."""
    meta, results = payload["meta"], payload["maps"]
    effects, mean_effects = payload["effects"], payload["mean_effects"]
    table = [{"map": label, "tie_map": results[label]["tie_map"], "effect": mean_effects.get(label, 0.0),
              "per_order": " ".join(f"{x:+.4f}" for x in effects.get(label, []))} for label in results]
    table.sort(key=lambda r: r["effect"])
    return (f"Action-effect SNR probe: sequence_u{meta['budget']} trained {meta['snapshot_step']} of {meta['steps']} "
            f"steps (seed {meta['seed']}), every one-action map trained {meta['horizon']} more steps under "
            f"{meta['orders']} data orders; effect = paired Δ validation bits/char vs keep. Signal sd "
            f"{payload['signal_sd']}, paired noise sd {payload['paired_noise_sd']}, SNR {payload['snr']} "
            f"(go if >= 3).\n\n" + md_table(table, ["map", "tie_map", "effect", "per_order"]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=4, help="unique layers of the sequence map probed (1..8)")
    p.add_argument("--steps", type=int, default=1200, help="the run whose midpoint is probed")
    p.add_argument("--seed", type=int, default=0, help="data order and initial weights of the pre-training")
    p.add_argument("--horizon", type=int, default=32, help="steps each map trains after the action")
    p.add_argument("--orders", type=int, default=2, help="data orders each map trains under")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="tiny model, slices and steps (seconds)")
    args = p.parse_args(argv)
    if not 1 <= args.budget <= POSITIONS:
        raise SystemExit(f"charlm_snr: --budget must lie in 1..{POSITIONS}, got {args.budget}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("charlm_snr: --device cuda, but torch sees no CUDA device")
    if args.quick:
        args.steps = QUICK_STEPS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    regime = QUICK if args.quick else REGIME
    data = load_chars(regime)  # SystemExit "SKIP: ..." when the data file is missing
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    set_threads(args.threads)
    payload = probe(args, regime, data)
    json_path, _ = write_results(args.output, "charlm_snr" + ("_quick" if args.quick else ""), payload,
                                 markdown(payload))
    print(f"snr: signal sd {payload['signal_sd']}, paired noise sd {payload['paired_noise_sd']}, SNR {payload['snr']} "
          f"-> {json_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
