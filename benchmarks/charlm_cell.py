"""One cell of the char-level harness: a (row, seed) trained by ``DynTieTrainer`` and its JSON record.

Every cell of one seed is paired with the others: the same ``max_steps * batch`` training windows in the
same order (offsets from ``seed`` alone) and the same initial weights (``torch.manual_seed(seed)`` right
before the model is built; the tie map is applied afterwards by the trainer). The validation slice gives the
curve and the final score, the test slice is evaluated once at the end.

transformers and hf_dyntie are imported inside the functions: ``charlm.py`` checks its arguments first.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from charlm_family import DEFAULT_FAMILY, build_model, flops_shape
from charlm_rows import FINAL_MAP, POSITIONS, flops_per_step
from data import Blocks, Windows, window_offsets

RUNS_ROOT = Path("/tmp/charlm_runs")


class HarnessError(Exception):
    """A cell that cannot run (options the trainer refuses, no source map): one line, the other cells go on."""


def make_training_args(row: dict[str, Any], regime: dict[str, Any], seed: int, eval_every: int, out_dir: Path,
                       device: str = "cpu"):
    """The regime's ``DynTieTrainingArguments`` for ``row``; its tie_* settings (and ``--set``) win."""
    from hf_dyntie import DynTieTrainingArguments

    steps = row["steps"]
    kwargs = dict(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=regime["batch_size"],
        per_device_eval_batch_size=regime["eval_batch_size"],
        learning_rate=regime["lr"],
        weight_decay=regime["weight_decay"],
        adam_beta1=regime["betas"][0],
        adam_beta2=regime["betas"][1],
        max_grad_norm=regime["max_grad_norm"],
        lr_scheduler_type="cosine",
        warmup_steps=max(1, int(round(regime["warmup_frac"] * steps))),
        eval_strategy="steps",
        eval_steps=eval_every,
        logging_steps=eval_every,
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        train_sampling_strategy="sequential",
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
        tie_plots=False,
    )
    kwargs.update(row["tie"])
    return DynTieTrainingArguments(**kwargs)


def check_cell_options(row: dict[str, Any], regime: dict[str, Any], eval_every: int) -> None:
    """Raise HarnessError (one line) when the trainer's arguments refuse the row's options (an unknown
    option, an unknown policy, a combination it rejects), before any cell trains."""
    probe = row
    if row["tie"].get("tie_policy") == "replay" and not row["tie"].get("tie_replay_file"):
        probe = {**row, "tie": {**row["tie"], "tie_replay_file": "<written when the cell runs>"}}
    try:
        make_training_args(probe, regime, 0, eval_every, RUNS_ROOT / "_check")
    except (ValueError, TypeError) as error:
        raise HarnessError(f"DynTieTrainingArguments refused the row's options: {str(error).splitlines()[0]}") from None


def final_map_of(source: str, seed: int, cells: list[dict[str, Any]]) -> list[int]:
    """The final map the ``source`` row reached for ``seed``: what a ``final_map:<source>`` cell retrains."""
    for cell in cells:
        if cell["row"] == source and cell["seed"] == seed:
            return list(cell["final_tie_map"])
    raise HarnessError(f"no finished cell of row {source!r} for seed {seed} to take the final map from")


def unique_over_time(records: list[dict[str, Any]], steps: int) -> list[tuple[int, int]]:
    """(step, unique layers) at every change, from the decision records."""
    from hf_dyntie.tie_map import maps_per_step, num_unique_layers

    out: list[tuple[int, int]] = []
    for step, m in enumerate(maps_per_step(records, steps)):
        u = num_unique_layers(m)
        if not out or out[-1][1] != u:
            out.append((step, u))
    return out


def sha(tensor_bytes: bytes) -> str:
    """A short fingerprint: same-seed cells must show the same data and initial weights."""
    return hashlib.sha1(tensor_bytes).hexdigest()[:16]


def callbacks(name: str, seed: int, steps: int) -> tuple[Any, Any]:
    """(the validation curve in bits/char, a progress bar): the Trainer's own printing is off."""
    from transformers import TrainerCallback

    class Curve(TrainerCallback):
        def __init__(self):
            self.points: list[tuple[int, float]] = []

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics and "eval_loss" in metrics:
                self.points.append((state.global_step, float(metrics["eval_loss"]) / math.log(2)))

    class Progress(TrainerCallback):
        def __init__(self):
            self.bar = tqdm(total=steps, desc=f"{name} seed {seed}", mininterval=10, file=sys.stdout)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(1)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return Curve(), Progress()


def timed_trainer_class():
    """``DynTieTrainer`` that times its evaluations, so the training wall time can leave them out."""
    from hf_dyntie import DynTieTrainer

    class Trainer(DynTieTrainer):
        eval_seconds = 0.0

        def evaluate(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                self.eval_seconds += time.perf_counter() - t0

    return Trainer


def tie_records(history_path: Path, final_map: list[int]) -> list[dict[str, Any]]:
    """The run's tie history, trimmed to what the cell keeps; a replayed static map makes no decisions, so it
    is recorded as that map held from step 0."""
    raw = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()] if history_path.exists() else []
    records = []
    for r in raw:
        rec = {"step": r["step"], "tie_map": r["tie_map"]}
        for key in ("layer", "action", "reward", "scores"):
            if r.get(key) is not None:
                rec[key] = r[key]
        records.append(rec)
    return records or [{"step": 0, "tie_map": final_map}]


def prepare_run_dir(name: str, seed: int, row: dict[str, Any], runs_root: Path) -> Path:
    """A fresh scratch folder; a final-map cell gets the one-record history its replay policy holds."""
    run_dir = runs_root / f"{name.replace(':', '-')}_seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    if name.startswith(FINAL_MAP):
        history = run_dir / "tie_history.jsonl"
        history.write_text(json.dumps({"step": 0, "tie_map": row["source_map"]}) + "\n")
        row["tie"]["tie_replay_file"] = str(history)
    return run_dir


def train_windows(model, targs, offsets, name: str, seed: int, steps: int, ctx: dict[str, Any],
                  trainer_class=None) -> dict[str, Any]:
    """Train ``model`` on the training windows at ``offsets`` (validation curve on the validation blocks, the
    final point always recorded), then score the test blocks once. What every harness's cell does: the
    trainer, the curve, val/test bpc and the training seconds with the in-training evaluations left out."""
    from transformers import PrinterCallback, default_data_collator

    regime, data = ctx["regime"], ctx["data"]
    curve, progress = callbacks(name, seed, steps)
    trainer = (trainer_class or timed_trainer_class())(
        model=model, args=targs, train_dataset=Windows(data["train"], offsets, regime["seq_len"]),
        eval_dataset=Blocks(data["val"]), data_collator=default_data_collator, callbacks=[curve, progress],
    )
    trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0 - trainer.eval_seconds
    if not curve.points or curve.points[-1][0] != trainer.state.global_step:
        trainer.evaluate()  # the final validation point (Curve records it)
    test = trainer.evaluate(eval_dataset=Blocks(data["test"]), metric_key_prefix="test")["test_loss"] / math.log(2)
    return {"trainer": trainer, "curve": curve.points, "val_bpc": curve.points[-1][1], "test_bpc": test,
            "train_seconds": seconds, "in_train_eval_seconds": trainer.eval_seconds}


def run_cell(name: str, seed: int, row: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    """Train one (row, seed) cell and return its record."""
    regime, data, eval_every = ctx["regime"], ctx["data"], ctx["eval_every"]
    steps = row["steps"]
    run_dir = prepare_run_dir(name, seed, row, ctx["runs_root"])
    targs = make_training_args(row, regime, seed, eval_every, run_dir / "trainer", ctx["device"])

    offsets = window_offsets(seed, steps * regime["batch_size"], len(data["train"]), regime["seq_len"])
    torch.manual_seed(seed)
    family = ctx.get("family", DEFAULT_FAMILY)
    model = build_model(family, row["layers"], regime, data["vocab_size"])
    init_sha = sha(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))

    trained = train_windows(model, targs, offsets, name, seed, steps, ctx)
    trainer, train_seconds = trained["trainer"], trained["train_seconds"]

    summary = trainer.dyntie_summary()
    records = tie_records(Path(targs.output_dir) / "tie_history.jsonl", summary["final_tie_map"])
    positions = row["layers"]
    rank = int(row["tie"].get("tie_lora_rank") or 0)
    relaxed = positions - summary["mean_unique_layers"] if row["tie"].get("tie_lora_rank") else 0.0
    weights, delta = flops_shape(family, regime)
    flops = flops_per_step(positions, regime["embd"], regime["seq_len"], data["vocab_size"], relaxed, rank,
                           weights, delta)
    flops8 = flops_per_step(POSITIONS, regime["embd"], regime["seq_len"], data["vocab_size"], weights=weights)
    return {
        "row": name,
        "seed": seed,
        "settings": {k: v for k, v in row["tie"].items() if k != "tie_replay_file"},
        "source_map": row.get("source_map"),
        "hparams": ctx["hparams"],
        "machine": ctx["machine"],
        "steps": steps,
        "num_layers": positions,
        "val_bpc": trained["val_bpc"],
        "test_bpc": trained["test_bpc"],
        "curve": trained["curve"],
        "final_tie_map": summary["final_tie_map"],
        "final_unique_layers": summary["final_unique_layers"],
        "mean_unique_layers": summary["mean_unique_layers"],
        "mean_trainable_parameters": summary["mean_trainable_parameters"],
        "final_trainable_parameters": summary["final_trainable_parameters"],
        "training_state_bytes": summary["training_state_bytes"],
        "train_seconds": train_seconds,
        "in_train_eval_seconds": trained["in_train_eval_seconds"],
        "seconds_per_step": train_seconds / max(1, steps),
        "flops_per_step_ratio": flops / flops8,
        "total_flops_ratio": flops * steps / (flops8 * ctx["hparams"]["steps"]),
        "unique_layers_over_time": unique_over_time(records, steps),
        "tie_history": records,
        "data_sha": sha(offsets.numpy().tobytes()),
        "init_sha": init_sha,
    }
