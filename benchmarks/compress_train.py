"""Training pieces the compression harness shares between the teacher and its rows.

The trainer settings, callbacks and evaluation timing are charlm's (``charlm_cell``), so a compression cell
trains in exactly the regime of docs/RESULTS.md section 0; what is added here is what charlm never needed:
the seed's data stream split into the teacher's part and the uptraining part, a held-out score taken outside
the Trainer (the converted model before any uptraining step), a weights fingerprint (every derived cell names
the teacher it started from), and the distillation loss.

transformers and hf_dyntie are imported inside the functions: the harness checks its arguments first.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from charlm_cell import make_training_args, sha, timed_trainer_class, train_windows
from compress_rows import Row
from data import window_offsets

DISTILL_ALPHA = 0.5  # weight of the KL term; the rest is the data's cross-entropy


def stream(seed: int, ctx: dict[str, Any]) -> torch.Tensor:
    """The seed's whole training stream, ``(P + U) x batch`` window offsets: the teacher trains on the first
    ``P x batch``, derived rows on the rest, from-scratch rows on all of it (one draw, then sliced, so the
    parts are exactly the from-scratch rows' data)."""
    regime, h = ctx["regime"], ctx["hparams"]
    n = (h["pretrain_steps"] + h["uptrain_steps"]) * regime["batch_size"]
    return window_offsets(seed, n, len(ctx["data"]["train"]), regime["seq_len"])


def row_offsets(row: Row, seed: int, ctx: dict[str, Any]) -> torch.Tensor:
    """The windows ``row`` trains on, in order: ``row.steps x batch`` of them from ``row.offset_steps`` on."""
    batch = ctx["regime"]["batch_size"]
    start = row.offset_steps * batch
    return stream(seed, ctx)[start: start + row.steps * batch]


def weights_sha(model: torch.nn.Module) -> str:
    """A fingerprint of every parameter (a tied tensor once): same-seed derived cells must show one teacher."""
    return sha(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters()))


@torch.no_grad()
def held_out_bpc(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    """Bits/char of ``model`` on ``blocks``, weighted by block as the Trainer's evaluation weights them: the
    score of a converted model *before* uptraining (is the function kept?), taken outside any Trainer."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i: i + batch_size]
        total += float(model(input_ids=x, labels=x).loss) * len(x)
        n += len(x)
    model.train(was_training)
    return total / n / math.log(2)


def distill_trainer_class(teacher: torch.nn.Module, alpha: float = DISTILL_ALPHA):
    """The timed DynTieTrainer whose training loss is ``(1 - alpha) CE + alpha KL(teacher || student)`` per
    token (temperature 1: the student matches the teacher's own distribution). Evaluation keeps the plain
    cross-entropy, so a distilled row's bpc means what every other row's does."""
    base = timed_trainer_class()
    teacher.eval()

    class Distill(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ce, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            if not model.training:
                return (ce, outputs) if return_outputs else ce
            with torch.no_grad():
                target = teacher(input_ids=inputs["input_ids"]).logits[:, :-1].flatten(0, 1)
            student = outputs.logits[:, :-1].flatten(0, 1)
            kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(target, -1), log_target=True, reduction="batchmean")
            loss = (1 - alpha) * ce + alpha * kl
            return (loss, outputs) if return_outputs else loss

    return Distill


def train(model, row: Row, seed: int, ctx: dict[str, Any], run_dir: Path, trainer_class=None) -> dict[str, Any]:
    """Train ``model`` as ``row`` says on its windows; the trainer, the validation curve (row steps), the
    final validation and test bpc, and the training seconds (evaluations excluded)."""
    regime = ctx["regime"] if row.lr is None else {**ctx["regime"], "lr": row.lr}
    targs = make_training_args({"steps": row.steps, "tie": dict(row.tie)}, regime, seed, ctx["eval_every"],
                               run_dir / "trainer", ctx.get("device", "cpu"))
    offsets = row_offsets(row, seed, ctx)
    trained = train_windows(model, targs, offsets, row.name, seed, row.steps, ctx, trainer_class)
    return {**trained, "data_sha": sha(offsets.numpy().tobytes()),
            "history": Path(targs.output_dir) / "tie_history.jsonl"}
