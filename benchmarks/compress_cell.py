"""One cell of the compression harness: a (row, seed) at budget u, built as its kind says, trained, recorded.

Derived rows start from the seed's saved teacher (``compress_teacher``) and record its fingerprint, so a table
can show that every row of a seed compressed the same model; their curves are in total steps (the teacher's
``P`` plus their own), starting with the converted model's score before any uptraining step
(``val_bpc_start``: how much of the teacher's function the conversion kept). From-scratch rows are built
under ``torch.manual_seed(seed)``, as the teacher was, and trained on the whole stream.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from charlm_cell import tie_records, unique_over_time
from charlm_family import build_model, flops_shape
from charlm_rows import flops_per_step
from compress_rows import POSITIONS, Row
from compress_teacher import ensure_teacher, teacher_weights
from compress_train import distill_trainer_class, held_out_bpc, train, weights_sha


def student_sources(budget: int) -> list[int]:
    """The teacher layers an untied u-layer student starts from: every (8/u)-th, from the first (DistilBERT's
    every-other-layer init at u = 4: 0, 2, 4, 6; at u = 2: 0, 4)."""
    return [round(i * POSITIONS / budget) for i in range(budget)]


def shallow_from(teacher, budget: int, family: str, regime: dict[str, Any], vocab: int):
    """An untied ``budget``-layer model holding the teacher's embeddings, final norm and head, and its layers
    :func:`student_sources` (copied by name: ``<layers path>.<i>.`` reads the teacher's ``<source i>``)."""
    student = build_model(family, budget, regime, vocab)
    prefix = teacher._dyntie_layers_path + "."
    sources, state = student_sources(budget), teacher.state_dict()
    mapped = {}
    for key in student.state_dict():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            mapped[key] = state[f"{prefix}{sources[int(index)]}.{rest}"].clone()
        else:
            mapped[key] = state[key].clone()
    student.load_state_dict(mapped)
    student.__dict__["_dyntie_weights_from"] = "the teacher's layers (compress_cell.shallow_from)"
    return student


def derived_model(row: Row, seed: int, ctx: dict[str, Any]):
    """(model, trainer class or None) of a row that starts from the teacher: one-shot rows tied here by
    ``from_stock`` with the row's init and deltas; shrink rows untied (the trainer ties them); the distilled
    student from the teacher's layers, trained against the teacher."""
    from hf_dyntie.convert import from_stock
    from hf_dyntie.training.policies.static import sequence_map

    folder = teacher_weights(seed, ctx)
    budget = ctx["budget"]
    if row.kind == "oneshot":
        model = from_stock(folder, sequence_map(POSITIONS, budget), init=row.init, tie_lora_rank=row.rank,
                           delta_init="svd" if row.rank else "zero", tie_lora_vectors=bool(row.rank),
                           tie_lora_roots=row.roots)
        return model, None
    if row.kind == "shrink":
        return from_stock(folder), None  # tie_lora_rank / _init / _vectors / tie_merge come with the row's args
    teacher = from_stock(folder).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = shallow_from(teacher, budget, ctx["hparams"]["family"], ctx["regime"], ctx["data"]["vocab_size"])
    return student, distill_trainer_class(teacher)


def relaxed_positions(row: Row, mean_unique: float) -> float:
    """Mean number of positions carrying an active delta (tied positions of a row with a rank; with relaxed
    roots every position once the sequence map's groups all have two or more members, an upper bound while
    shrink merges)."""
    if not row.rank:
        return 0.0
    return float(POSITIONS) if row.roots else POSITIONS - mean_unique


def flops_ratio(row: Row, mean_unique: float, ctx: dict[str, Any]) -> float:
    """Training FLOPs behind the final model (the teacher's pretraining included for derived rows, and the
    teacher's forwards for the distilled one: a third of a training step), over the teacher's own (analytic,
    ``charlm_rows.flops_per_step``)."""
    regime, h, vocab = ctx["regime"], ctx["hparams"], ctx["data"]["vocab_size"]
    weights, delta = flops_shape(h["family"], regime)
    d, seq = regime["embd"], regime["seq_len"]
    full = flops_per_step(POSITIONS, d, seq, vocab, weights=weights, delta=delta)
    own = flops_per_step(row.layers, d, seq, vocab, relaxed_positions(row, mean_unique), row.rank, weights, delta)
    total = row.steps * own + (row.offset_steps * full if row.derived else 0.0)
    if row.kind == "distill":
        total += row.steps * full / 3
    return total / (h["pretrain_steps"] * full)


def teacher_cell(record: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    """The teacher's row of a stage, from its record (never retrained): 8 unique layers, its pretraining."""
    return {
        "row": "teacher", "seed": record["seed"], "kind": "teacher", "settings": {"tie_policy": "untied"},
        "hparams": ctx["hparams"], "machine": record["machine"], "steps": record["steps"],
        "total_steps": record["steps"], "num_layers": POSITIONS, "val_bpc": record["val_bpc"],
        "test_bpc": record["test_bpc"], "val_bpc_start": None, "teacher_val_bpc": record["val_bpc_reloaded"],
        "curve": record["curve"], "final_tie_map": list(range(POSITIONS)), "final_unique_layers": POSITIONS,
        "mean_unique_layers": float(POSITIONS), "final_trainable_parameters": record["final_trainable_parameters"],
        "mean_trainable_parameters": record["final_trainable_parameters"], "unique_layers_over_time": [[0, POSITIONS]],
        "training_state_bytes": record["training_state_bytes"], "train_seconds": record["train_seconds"],
        "in_train_eval_seconds": record["in_train_eval_seconds"], "seconds_per_step": record["seconds_per_step"],
        "total_flops_vs_teacher": 1.0, "rank": 0,
        "tie_history": [{"step": 0, "tie_map": list(range(POSITIONS))}], "data_sha": record["data_sha"],
        "init_sha": record["init_sha"], "teacher_sha": record["teacher_sha"],
    }


def run_cell(row: Row, seed: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Train one (row, seed) cell of the stage in ``ctx`` and return its record."""
    record = ensure_teacher(seed, ctx) if (row.derived or row.kind == "teacher") else None
    if row.kind == "teacher":
        return teacher_cell(record, ctx)
    regime, data = ctx["regime"], ctx["data"]
    trainer_class = None
    if row.derived:
        model, trainer_class = derived_model(row, seed, ctx)
    else:
        torch.manual_seed(seed)
        model = build_model(ctx["hparams"]["family"], row.layers, regime, data["vocab_size"])
    init_sha = weights_sha(model)
    val_start = held_out_bpc(model, data["val"], regime["eval_batch_size"]) if row.derived else None
    run_dir = Path(ctx["runs_root"]) / ctx["stage"] / f"{row.name}_seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    result = train(model, row, seed, ctx, run_dir, trainer_class)
    summary = result["trainer"].dyntie_summary()
    records = tie_records(result["history"], summary["final_tie_map"])
    curve = ([[row.offset_steps, val_start]] if val_start is not None else []) + [
        [step + row.offset_steps, bpc] for step, bpc in result["curve"]]
    shutil.rmtree(run_dir, ignore_errors=True)  # trainer scratch: nothing in it is read again
    return {
        "row": row.name, "seed": seed, "kind": row.kind,
        "settings": {**{key: getattr(result["trainer"].args, key) for key in row.tie}, "init": row.init,
                     "rank": row.rank, "roots": row.roots, "lr": result["trainer"].args.learning_rate}, "hparams": ctx["hparams"],
        "machine": ctx["machine"], "steps": row.steps, "total_steps": row.total_steps, "num_layers": row.layers,
        "val_bpc": result["val_bpc"], "test_bpc": result["test_bpc"], "val_bpc_start": val_start,
        "teacher_val_bpc": record["val_bpc_reloaded"] if record else None, "curve": curve,
        "final_tie_map": summary["final_tie_map"], "final_unique_layers": summary["final_unique_layers"],
        "mean_unique_layers": summary["mean_unique_layers"],
        "final_trainable_parameters": summary["final_trainable_parameters"],
        "mean_trainable_parameters": summary["mean_trainable_parameters"],
        "training_state_bytes": summary["training_state_bytes"], "train_seconds": result["train_seconds"],
        "in_train_eval_seconds": result["in_train_eval_seconds"],
        "seconds_per_step": result["train_seconds"] / max(1, row.steps),
        "total_flops_vs_teacher": flops_ratio(row, summary["mean_unique_layers"], ctx), "rank": row.rank,
        "unique_layers_over_time": unique_over_time(records, row.steps), "tie_history": records,
        "data_sha": result["data_sha"], "init_sha": init_sha,
        "teacher_sha": record["teacher_sha"] if record else None,
    }
