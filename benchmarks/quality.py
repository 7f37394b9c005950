"""Quality benchmark: test perplexity of DLT against untied, random and static-sharing baselines.

Every row trains the same small GPT-2 from the same seed for the same number of optimizer steps with
``DynTieTrainer``; only the tying policy (and for one row the depth) differs. Rows run one at a time in
this process, and the JSON is rewritten after each row so an interrupted run keeps what it finished
(``--resume`` skips rows already in the JSON).

Data: WikiText-2 trains on ``valid.txt`` and evaluates on ``test.txt`` (the train split is not on these
machines); Tiny Shakespeare uses a 90/10 split. A byte-level BPE tokenizer is trained on the training text.

    python benchmarks/quality.py --dataset wikitext2            # the full table (~30-40 min on 2 CPU cores)
    python benchmarks/quality.py --quick --output /tmp/q        # seconds: smoke test
    python benchmarks/quality.py --task mlm --rows untied,dlt_improved_share   # DynTie BERT masked LM pair
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_OUTPUT, gpt2_config_kwargs, machine_info, md_table, set_threads, write_results  # noqa: E402
from data import Blocks, MaskedBlocks, encode, load_corpus, split_blocks, train_tokenizer  # noqa: E402
from plots import perplexity_curves  # noqa: E402

from hf_dyntie import DynTieGPT2Config, DynTieGPT2LMHeadModel, DynTieTrainer, DynTieTrainingArguments  # noqa: E402
from hf_dyntie.training.policies.base import scaled_epsilon_decay  # noqa: E402
from transformers import PrinterCallback, TrainerCallback, default_data_collator  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

ROW_NAMES = (
    "untied",
    "dlt_parity",
    "dlt_improved_share",
    "dlt_improved_follow",
    "random",
    "all_shared",
    "cycle_rev",
    "sequence",
    "untied_small",
)
DLT_ROWS = ("dlt_parity", "dlt_improved_share", "dlt_improved_follow")


def build_model(args: argparse.Namespace, n_layer: int, vocab_size: int) -> torch.nn.Module:
    """The DynTie GPT-2 LM (clm) or DynTie BERT masked LM (mlm) of this run, dropout off."""
    if args.task == "mlm":
        from hf_dyntie import DynTieBertConfig, DynTieBertForMaskedLM

        config = DynTieBertConfig(
            vocab_size=vocab_size, hidden_size=args.embd, num_hidden_layers=n_layer, num_attention_heads=args.heads,
            intermediate_size=4 * args.embd, max_position_embeddings=args.seq_len, type_vocab_size=1,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        return DynTieBertForMaskedLM(config)
    config = DynTieGPT2Config(**gpt2_config_kwargs(n_layer, args.embd, args.heads, args.seq_len, vocab_size))
    return DynTieGPT2LMHeadModel(config)


# ---------------------------------------------------------------------------------------------- rows


def row_settings(name: str, args: argparse.Namespace, unique_layers: int | None) -> dict[str, Any]:
    """The tie_* arguments (and layer count) of one row."""
    eps_decay = scaled_epsilon_decay(1.0, 0.01, args.steps, args.tie_interval, args.layers)
    parity = dict(
        tie_policy="qlearning", tie_reward="neg_ppl_clipped", tie_init="all_tied", tie_replay_size=0,
        tie_target_update=0, tie_bootstrap="same_layer", tie_epsilon_decay=eps_decay, tie_mode="follow",
    )
    improved = dict(
        tie_policy="qlearning", tie_reward=args.improved_reward, tie_init="all_tied", tie_replay_size=64,
        tie_replay_batch=16, tie_target_update=8, tie_bootstrap="next_layer", tie_epsilon_decay=eps_decay,
    )
    table: dict[str, dict[str, Any]] = {
        "untied": dict(tie_policy="untied"),
        "dlt_parity": parity,
        "dlt_improved_share": {**improved, "tie_mode": "share"},
        "dlt_improved_follow": {**improved, "tie_mode": "follow"},
        "random": dict(tie_policy="random", tie_init="all_tied", tie_mode="share"),
        "all_shared": dict(tie_policy="all_tied", tie_mode="share"),  # row name kept: the stored results use it
        "cycle_rev": dict(tie_policy="cycle_rev", tie_unique_layers=unique_layers, tie_mode="share"),
        "sequence": dict(tie_policy="sequence", tie_unique_layers=unique_layers, tie_mode="share"),
        "untied_small": dict(tie_policy="untied", n_layer=unique_layers),
    }
    return table[name]


class EvalCurve(TrainerCallback):
    """Collects (step, eval_loss) from the trainer's evaluations on the small curve subset."""

    def __init__(self):
        self.points: list[tuple[int, float]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.points.append((state.global_step, float(metrics["eval_loss"])))


class Progress(TrainerCallback):
    """One tqdm bar per row (the Trainer's own bars are off: they flood a nohup log)."""

    def __init__(self, total: int, desc: str):
        self.bar = tqdm(total=total, desc=desc, mininterval=10, file=sys.stdout)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def reward_stats(history_path: Path) -> dict[str, Any]:
    """How informative the agent's rewards were: a constant reward teaches nothing."""
    if not history_path.exists():
        return {}
    records = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
    rewards = [r["reward"] for r in records if r.get("reward") is not None]
    if not rewards:
        return {"decisions": len(records)}
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    return {
        "decisions": len(records),
        "reward_mean": mean,
        "reward_std": std,
        "reward_distinct": len({round(r, 6) for r in rewards}),
        "reward_min": min(rewards),
        "reward_max": max(rewards),
        "untie_actions": sum(1 for r in records if r.get("action") is not None and r["action"] == r["layer"]),
    }


def run_row(name: str, args: argparse.Namespace, data: dict[str, Any], unique_layers: int | None, run_dir: Path) -> dict[str, Any]:
    settings = row_settings(name, args, unique_layers)
    n_layer = settings.pop("n_layer", args.layers)
    torch.manual_seed(args.seed)
    model = build_model(args, n_layer, data["vocab_size"])
    if run_dir.exists():
        shutil.rmtree(run_dir)
    targs = DynTieTrainingArguments(
        output_dir=str(run_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size * 2,
        learning_rate=args.lr,
        weight_decay=0.01,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20),
        eval_strategy="steps",
        eval_steps=args.eval_every,
        logging_steps=args.eval_every,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        tie_interval=args.tie_interval,
        **settings,
    )
    curve, progress = EvalCurve(), Progress(args.steps, name)
    trainer = DynTieTrainer(
        model=model,
        args=targs,
        train_dataset=data["train"],
        eval_dataset=data["curve"],
        data_collator=default_data_collator,
        callbacks=[curve, progress],
    )
    trainer.remove_callback(PrinterCallback)  # the log dicts would flood the nohup log; the JSON keeps them
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    test_loss = trainer.evaluate(eval_dataset=data["test"], metric_key_prefix="test")["test_loss"]
    summary = trainer.dyntie_summary()
    row = {
        "row": name,
        "settings": {k: v for k, v in settings.items()},
        "num_layers": n_layer,
        "test_loss": test_loss,
        "test_ppl": math.exp(test_loss),
        "final_unique_layers": summary["final_unique_layers"],
        "mean_unique_layers": summary["mean_unique_layers"],
        "final_trainable_parameters": summary["final_trainable_parameters"],
        "mean_trainable_parameters": summary["mean_trainable_parameters"],
        "total_parameters": summary["total_parameters"],
        "training_state_bytes": summary["training_state_bytes"],
        "final_tie_map": summary["final_tie_map"],
        "train_seconds": train_seconds,
        "test_eval_seconds": time.perf_counter() - t0,
        "eval_curve": curve.points,
        "final_epsilon": trainer.policy.metrics().get("epsilon"),
        "reward_stats": reward_stats(run_dir / "tie_history.jsonl"),
        "q_loss_log": [
            (h["step"], h["tie/q_loss"]) for h in trainer.state.log_history if "tie/q_loss" in h
        ],
    }
    return row


# ---------------------------------------------------------------------------------------------- output


def copy_plots(run_dir: Path, output: Path, prefix: str) -> list[str]:
    copied = []
    for png in ("tie_map.png", "unique_layers.png"):
        if (run_dir / png).exists():
            dest = output / f"{prefix}_{png}"
            shutil.copy(run_dir / png, dest)
            copied.append(dest.name)
    if (run_dir / "tie_history.jsonl").exists():
        shutil.copy(run_dir / "tie_history.jsonl", output / f"{prefix}_tie_history.jsonl")
    return copied


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    cols = ["row", "test_ppl", "final_unique_layers", "mean_unique_layers", "final_trainable_parameters",
            "mean_trainable_parameters", "training_state_bytes", "train_seconds"]
    heads = ["row", "test ppl", "final unique", "mean unique", "final trainable params", "mean trainable params",
             "training state (bytes)", "train wall (s)"]
    return (
        f"{meta['split']}. Model: {'BERT masked LM' if meta.get('task') == 'mlm' else 'GPT-2'}, {meta['layers']} layers, n_embd {meta['embd']}, seq {meta['seq_len']}, "
        f"vocab {meta['vocab_size']} (byte-level BPE trained on the training text), batch {meta['batch_size']}, "
        f"{meta['steps']} optimizer steps, {meta['threads']} torch thread(s); test perplexity over the first "
        f"{meta['test_tokens']} of {meta.get('test_split_tokens', meta['test_tokens'])} test tokens, lr {meta['lr']}, seed {meta['seed']} (1 seed). Decisions every "
        f"{meta['tie_interval']} steps; epsilon decay per sweep {meta['epsilon_decay']:.4f} (floor reached ~65% into "
        f"the run). Static rows use u = {meta.get('unique_layers')} unique layers.\n\n" + md_table(rows, cols, heads)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["wikitext2", "tinyshakespeare"], default="wikitext2")
    p.add_argument("--task", choices=["clm", "mlm"], default="clm",
                   help="clm: DynTie GPT-2 causal LM; mlm: DynTie BERT masked LM (perplexity of the masked tokens)")
    p.add_argument("--quick", action="store_true", help="tiny model, data and step budget (seconds)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--rows", default=",".join(ROW_NAMES), help="comma-separated subset of " + ",".join(ROW_NAMES))
    p.add_argument("--resume", action="store_true", help="keep rows already in the output JSON")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--embd", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared 2-core CPU)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--tie-interval", type=int, default=4)
    p.add_argument("--improved-reward", default="loss_improvement", choices=["neg_loss", "loss_improvement"])
    p.add_argument("--unique-layers", type=int, default=None, help="static rows' u (default: round(DLT's mean))")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--curve-blocks", type=int, default=64, help="eval blocks used for the curves")
    p.add_argument("--test-blocks", type=int, default=1536, help="cap on test blocks (0: the whole split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the output name (e.g. a variant of the agent settings)")
    args = p.parse_args()
    if args.quick:
        args.steps, args.layers, args.embd, args.heads, args.seq_len = 16, 4, 32, 2, 32
        args.batch_size, args.vocab_size, args.eval_every, args.curve_blocks, args.test_blocks = 4, 300, 8, 8, 16
    hf_logging.set_verbosity_error()
    set_threads(args.threads)
    args.test_blocks = args.test_blocks or None
    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in rows_wanted:
        if r not in ROW_NAMES:
            p.error(f"unknown row {r!r}")

    train_text, test_text, split = load_corpus(args.dataset, args.quick)
    tok = train_tokenizer(train_text, args.vocab_size, ["<mask>"] if args.task == "mlm" else None)
    train_ids, test_ids = encode(tok, train_text), encode(tok, test_text)
    vocab = tok.get_vocab_size()
    if args.task == "mlm":
        mask_id = tok.token_to_id("<mask>")
        data = {
            "vocab_size": vocab,
            "train": MaskedBlocks(split_blocks(train_ids, args.seq_len), mask_id, vocab),
            "curve": MaskedBlocks(split_blocks(test_ids, args.seq_len, args.curve_blocks), mask_id, vocab, fixed=True),
            "test": MaskedBlocks(split_blocks(test_ids, args.seq_len, args.test_blocks), mask_id, vocab, fixed=True),
        }
    else:
        data = {
            "vocab_size": vocab,
            "train": Blocks(split_blocks(train_ids, args.seq_len)),
            "curve": Blocks(split_blocks(test_ids, args.seq_len, args.curve_blocks)),
            "test": Blocks(split_blocks(test_ids, args.seq_len, args.test_blocks)),
        }
    print(f"{split}\ntrain tokens {len(train_ids)}, test tokens {len(test_ids)}, vocab {data['vocab_size']}, "
          f"train blocks {len(data['train'])}, test blocks {len(data['test'])}")

    name = (f"quality_{args.dataset}" + ("_mlm" if args.task == "mlm" else "") + (f"_{args.tag}" if args.tag else "") + (f"_seed{args.seed}" if args.seed else "")
            + ("_quick" if args.quick else ""))
    args.output.mkdir(parents=True, exist_ok=True)
    runs_root = Path(tempfile.gettempdir()) / "hf_dyntie_quality_runs" / name  # scratch trainer folders
    meta = {
        "dataset": args.dataset, "task": args.task, "split": split, "layers": args.layers, "embd": args.embd, "heads": args.heads,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "vocab_size": data["vocab_size"], "steps": args.steps,
        "lr": args.lr, "seed": args.seed, "tie_interval": args.tie_interval, "improved_reward": args.improved_reward,
        "epsilon_decay": scaled_epsilon_decay(1.0, 0.01, args.steps, args.tie_interval, args.layers),
        "train_tokens": len(train_ids), "test_tokens": len(data["test"]) * args.seq_len,
        "unique_layers": args.unique_layers, "reward_source": "train_batch", "threads": args.threads,
        "test_blocks": len(data["test"]), "test_split_tokens": len(test_ids),
    }
    rows: list[dict[str, Any]] = []
    json_path = args.output / f"{name}.json"
    if args.resume and json_path.exists():
        rows = json.loads(json_path.read_text())["rows"]
        meta["unique_layers"] = json.loads(json_path.read_text())["meta"].get("unique_layers") or meta["unique_layers"]
    done = {r["row"] for r in rows}

    for row_name in rows_wanted:
        if row_name in done:
            continue
        if row_name in ("cycle_rev", "sequence", "untied_small") and meta["unique_layers"] is None:
            dlt = [r for r in rows if r["row"] == "dlt_improved_share"] or [r for r in rows if r["row"] in DLT_ROWS]
            meta["unique_layers"] = max(1, round(dlt[0]["mean_unique_layers"])) if dlt else max(1, args.layers // 3)
            print(f"static rows use u = {meta['unique_layers']} unique layers")
        row = run_row(row_name, args, data, meta["unique_layers"], runs_root / row_name)
        row["plots"] = copy_plots(runs_root / row_name, args.output, f"{name}_{row_name}") if row_name in (
            *DLT_ROWS, "random") else []
        rows.append(row)
        print(f"{row_name}: test ppl {row['test_ppl']:.2f}, mean unique {row['mean_unique_layers']:.2f}, "
              f"train {row['train_seconds']:.0f}s", flush=True)
        perplexity_curves(rows, args.output / f"{name}_eval_ppl.png", f"{args.dataset}: eval perplexity while training")
        write_results(args.output, name, {"machine": machine_info(), "meta": meta, "rows": rows}, markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
