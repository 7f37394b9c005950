"""A non-finite training loss stops the run: the error and its one-line messages (docs/design.md, "The trainer").

``DynTieTrainer`` checks each optimizer step's loss before the optimizer runs; the ``tie_max_nonfinite``-th
non-finite one raises :class:`NonFiniteLossError` with :func:`stop_message`, and after tolerated ones it
refuses to hand back or save non-finite weights (:func:`weights_message`).
"""

from __future__ import annotations

from .training_args import DynTieTrainingArguments


class NonFiniteLossError(RuntimeError):
    """Training stopped because the training loss was NaN or infinite (``tie_max_nonfinite`` such optimizer
    steps). The message is one line: the step, what was kept, and what to try."""


def _kept(last_checkpoint: str | None) -> str:
    return f"the last checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"


def stop_message(
    args: DynTieTrainingArguments, step: int, value: float, nonfinite_steps: int, last_checkpoint: str | None
) -> str:
    """Why training stopped at optimizer ``step`` (0-based), what was kept, and what to try for these arguments."""
    count = f" (non-finite step {nonfinite_steps} of tie_max_nonfinite={args.tie_max_nonfinite})" \
        if args.tie_max_nonfinite > 1 else ""
    tries = [f"a lower learning_rate (now {args.learning_rate:g})"]
    if args.max_grad_norm is None or args.max_grad_norm <= 0:
        tries.append("gradient clipping (max_grad_norm 1.0)")
    else:
        tries.append(f"a smaller max_grad_norm (now {args.max_grad_norm:g})")
    if args.fp16:
        tries.append("bf16 instead of fp16")
    elif args.bf16:
        tries.append("fp32 (no bf16)")
    else:
        tries.append("a longer warmup (warmup_steps)")
    return (
        f"training loss is {value} at optimizer step {step + 1}{count}: training stopped there, before its update, "
        f"and no model was saved as the result; {_kept(last_checkpoint)}. Try {', '.join(tries[:-1])} or {tries[-1]}."
    )


def weights_message(
    args: DynTieTrainingArguments, where: str, global_step: int, first_bad: str, nonfinite_steps: int,
    last_checkpoint: str | None,
) -> str:
    """Why non-finite weights are refused ``where`` (at a checkpoint, at the end) after tolerated steps."""
    return (
        f"the weights are not finite {where} (step {global_step}, e.g. {first_bad}) after "
        f"{nonfinite_steps} non-finite training loss(es): nothing saved; {_kept(last_checkpoint)}. Try a lower "
        f"learning_rate (now {args.learning_rate:g}) or gradient clipping (max_grad_norm)."
    )
