"""The teacher: the untied 8-layer model pretrained for ``P`` steps, trained once per seed and reused.

Every derived row of a seed, at every budget, starts from the same saved weights, so rows differ only in how
they compress, never in what they compress. The teacher is saved the way a user holds a pretrained model: a
stock transformers folder (``hf_dyntie.convert.expand``, e.g. ``GPT2LMHeadModel``), which the rows bring in
with ``from_stock`` exactly as README "Compress a pretrained model" says. Its folder under
``<runs-root>/teachers/`` holds ``model/`` and ``teacher.json`` (its scores, curve, timings and weights
fingerprint). A folder with ``teacher.json`` is reused, never retrained; it is written under a temporary name
and renamed when whole, and a lock file keeps two processes of one seed from training it twice.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from charlm_family import build_model
from compress_rows import POSITIONS, TEACHER, resolve_row
from compress_train import held_out_bpc, train, weights_sha

RECORD = "teacher.json"


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def teacher_dir(seed: int, ctx: dict[str, Any]) -> Path:
    """Where the seed's teacher lives: named by everything that makes it (family, quick, P, width), so a
    teacher of another regime is never picked up."""
    h = ctx["hparams"]
    quick = "_quick" if h["quick"] else ""
    return ctx["runs_root"] / "teachers" / f"{h['family']}{quick}_P{h['pretrain_steps']}_d{h['embd']}_seed{seed}"


def teacher_weights(seed: int, ctx: dict[str, Any]) -> Path:
    """The stock folder the derived rows load (``from_stock``)."""
    return teacher_dir(seed, ctx) / "model"


def ensure_teacher(seed: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """The seed's teacher record, training and saving the teacher first if no finished one exists."""
    folder = teacher_dir(seed, ctx)
    with file_lock(folder.parent / f"{folder.name}.lock"):
        if (folder / RECORD).exists():
            record = json.loads((folder / RECORD).read_text())
            print(f"compress: teacher seed {seed}: reusing {folder} (val {record['val_bpc']:.4f} bpc)", flush=True)
            return record
        return train_teacher(seed, ctx, folder)


def train_teacher(seed: int, ctx: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Pretrain the untied 8-layer model for ``P`` steps on the first part of the seed's stream, save it as a
    stock folder, score the saved copy again (what the rows will load), and write the record last."""
    from hf_dyntie.convert import expand, from_stock

    h = ctx["hparams"]
    row = resolve_row(TEACHER, POSITIONS, h["pretrain_steps"], h["uptrain_steps"], h["family"], ctx["regime"])
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.manual_seed(seed)
    model = build_model(h["family"], POSITIONS, ctx["regime"], ctx["data"]["vocab_size"])
    init_sha = weights_sha(model)
    print(f"compress: teacher seed {seed}: training {row.steps} steps -> {folder}", flush=True)
    result = train(model, row, seed, ctx, tmp / "run")
    summary = result["trainer"].dyntie_summary()
    expand(model, tmp / "model")
    reloaded = from_stock(tmp / "model")
    val_reloaded = held_out_bpc(reloaded, ctx["data"]["val"], ctx["regime"]["eval_batch_size"])
    shutil.rmtree(tmp / "run", ignore_errors=True)  # trainer scratch; the weights are in model/
    record = {
        "seed": seed, "steps": row.steps, "val_bpc": result["val_bpc"], "test_bpc": result["test_bpc"],
        "val_bpc_reloaded": val_reloaded, "curve": result["curve"], "train_seconds": result["train_seconds"],
        "in_train_eval_seconds": result["in_train_eval_seconds"],
        "seconds_per_step": result["train_seconds"] / max(1, row.steps),
        "teacher_sha": weights_sha(reloaded), "init_sha": init_sha, "data_sha": result["data_sha"],
        "final_trainable_parameters": summary["final_trainable_parameters"],
        "training_state_bytes": summary["training_state_bytes"], "hparams": h, "machine": ctx["machine"],
    }
    (tmp / RECORD).write_text(json.dumps(record, indent=1))
    shutil.rmtree(folder, ignore_errors=True)  # a half-written folder of a killed run (no record in it)
    tmp.rename(folder)
    return record
