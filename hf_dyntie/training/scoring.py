"""Paired counterfactual scores of candidate tie maps, on one fixed held-out scoring set.

Every score compares a candidate map with the current one at the *same weights* on the *same tokens*, so
batch noise and the training trend cancel (the diagnosis measured ~0.0016 nats of paired noise against
0.13 nats for one unpaired training batch). Two kinds:

- :meth:`HeldOutScorer.loss_deltas`: ``L(candidate) - L(current)``, forward only. Re-routing the leaves is
  all it takes to run a candidate: routing decides which weights a position computes with, and a position
  that would untie computes with its root's weights, exactly what its copy would hold. Nothing is copied.
- :meth:`HeldOutScorer.untie_gains`: an untie does not change the function (its immediate delta is 0), so
  it is scored by what it would let training do. From one backward pass with per-position gradients of
  the routed weights (``tying.capture_routed``), the first-order change of the held-out loss over the
  steps until the next decision when the split-off part ``B`` of a group follows its own update instead of
  the group's. Updates are modelled as Adam's steady-state step, ``-lr * sign(gradient)`` per coordinate
  (the second-moment estimate adapts in ~1/(1-beta2) steps, well inside an interval). In share mode the
  predicted change is ``-lr * horizon * (|g_A|_1 + |g_B|_1 - |g_A + g_B|_1)``: never positive, and largest
  in size exactly where the two parts pull the shared weights in opposite directions coordinate by
  coordinate. (Under plain gradient steps the same conflict reads ``2 * lr * <g_A, g_B>``, which favours
  keeping aligned parts together; Adam's per-coordinate normalisation gives each part a full-size step.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .accounting import torch_optimizer
from ..leaves import tieable_leaves
from ..modeling_dyntie import DynTieMixin
from ..tying import capture_routed

LossFn = Callable[[dict[str, Any]], torch.Tensor]


class HeldOutScorer:
    """Scores candidate maps of ``model`` on ``batches`` (fixed for the whole run).

    ``loss_of(inputs)`` returns the mean loss of one batch (the trainer's ``compute_loss`` under its
    autocast context); ``horizon_lr()`` the summed learning rate of the next ``horizon`` optimizer steps (the
    steps until the next decision; read from the schedule, so a decision in warm-up is not scored at lr 0);
    ``reduce`` averages a tensor over ranks so that every rank sees the same scores and decision.
    """

    def __init__(
        self,
        model: DynTieMixin,
        batches: Sequence[dict[str, Any]],
        loss_of: LossFn,
        horizon_lr: Callable[[], float],
        reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    ):
        if not batches:
            raise ValueError("the scoring set is empty: the eval dataset yielded no batches")
        self.model = model
        self.batches = list(batches)
        self.loss_of = loss_of
        self.horizon_lr = horizon_lr
        self.reduce = reduce

    # ---- forward-only deltas -------------------------------------------------------------------------

    @torch.no_grad()
    def _mean_loss(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for inputs in self.batches:
            total += self.loss_of(inputs).detach().double().cpu()
        return total / len(self.batches)

    def loss_deltas(self, candidates: Sequence[Sequence[int]]) -> list[float]:
        """Held-out ``L(candidate) - L(current)`` for each candidate (eval mode, current weights)."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            base = self._mean_loss()
            values = []
            for candidate in candidates:
                with model.routed_as(list(candidate)):
                    values.append(self._mean_loss() - base)
        finally:
            model.train(was_training)
        return [float(v) for v in self.reduce(torch.stack(values))] if values else []

    # ---- first-order untie gains ---------------------------------------------------------------------

    def position_gradients(self) -> dict[tuple[int, str, str], torch.Tensor]:
        """Each position's own gradient of the held-out loss w.r.t. the weights it routes to, summed over
        the scoring batches; keyed ``(position, leaf name, parameter name)``. No ``.grad`` is touched."""
        model = self.model
        was_training = model.training
        model.eval()
        grads: dict[tuple[int, str, str], torch.Tensor] = {}
        try:
            with torch.enable_grad(), capture_routed(model.dyntie_layers) as views:
                for inputs in self.batches:
                    views.clear()
                    loss = self.loss_of(inputs) / len(self.batches)
                    keys = list(views)
                    found = torch.autograd.grad(loss, [views[k] for k in keys], allow_unused=True)
                    for key, g in zip(keys, found):
                        if g is not None:
                            grads[key] = grads[key] + g.float() if key in grads else g.float()
        finally:
            model.train(was_training)
        return grads

    def untie_gains(self, splits: Sequence[tuple[int, Sequence[int]]]) -> list[float]:
        """Predicted held-out loss change over ``horizon`` steps for each ``(position, movers)`` split."""
        if not splits:
            return []
        model, layers, tie_map = self.model, self.model.dyntie_layers, self.model.tie_map
        follow = model.config.tie_mode == "follow"
        grads = self.position_gradients()
        scale = self.horizon_lr()
        values = []
        for p, movers in splits:
            root = tie_map[p]
            part_b = {p, *movers}
            part_a = {q for q, r in enumerate(tie_map) if r == root} - part_b
            # the weights' update comes from every user in share mode, from the root position only in follow mode
            keep_from = {root} if follow else part_a | part_b
            a_from, b_from = ({root}, {p}) if follow else (part_a, part_b)
            total = torch.zeros((), dtype=torch.float64)
            for leaf_name, leaf in tieable_leaves(layers[root]):
                for param_name, param in leaf._parameters.items():
                    if param is None:
                        continue
                    key = (leaf_name, param_name)
                    g_a, g_b = _summed(grads, part_a, key), _summed(grads, part_b, key)
                    keep = (g_a + g_b) * _step(_summed(grads, keep_from, key))
                    untie = g_a * _step(_summed(grads, a_from, key)) + g_b * _step(_summed(grads, b_from, key))
                    total += float(torch.as_tensor(untie - keep).sum())  # loss change: -lr * (untie - keep) per step
            values.append(-scale * total)
        return [float(v) for v in self.reduce(torch.tensor(values, dtype=torch.float64))]


def _step(gradient: torch.Tensor | float) -> torch.Tensor | float:
    """The direction an Adam-family optimizer moves a weight in steady state: the gradient normalised per
    coordinate, i.e. its sign (the second-moment estimate adapts within ~1 / (1 - beta2) steps, far
    shorter than a decision interval)."""
    return torch.sign(gradient) if isinstance(gradient, torch.Tensor) else 0.0


def _summed(grads: dict[tuple[int, str, str], torch.Tensor], positions: set[int], key: tuple[str, str]) -> torch.Tensor | float:
    """The sum of ``positions``' gradients for one parameter (0 where none flowed)."""
    parts = [grads[(q, *key)] for q in positions if (q, *key) in grads]
    return sum(parts) if parts else 0.0


def scoring_batches(batches: Iterable[dict[str, Any]], tokens: int) -> list[dict[str, Any]]:
    """The first ``tokens`` tokens of ``batches`` (the eval dataloader's, already on the device): the fixed
    scoring set. The last batch is cut to the rows still needed, so the set is ``tokens``, not a batch more."""
    kept, count = [], 0
    for batch in batches:
        rows = int(batch["input_ids"].shape[0])
        per_row = int(batch["input_ids"].numel()) // max(1, rows)
        keep = min(rows, -(-(tokens - count) // max(1, per_row)))  # rows still needed
        if keep < rows:
            batch = {k: v[:keep] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
        kept.append(batch)
        count += keep * per_row
        if count >= tokens:
            break
    return kept


def summed_lr(optimizer, lr_scheduler, step: int, horizon: int, max_steps: int) -> float:
    """Sum of the learning rates of the ``horizon`` optimizer steps from ``step``, from the schedule."""
    group = torch_optimizer(optimizer).param_groups[0]
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    if not lambdas or "initial_lr" not in group:  # not a LambdaLR: assume the current rate holds
        return float(group["lr"]) * horizon
    end = min(step + horizon, max(step + 1, max_steps))
    return float(sum(group["initial_lr"] * lambdas[0](s) for s in range(step, end)))


def score_metrics(scores: list[dict[str, Any]], chosen: list[int]) -> dict[str, float]:
    """``tie/score_*`` logs of one scored decision: how many candidates, the best score of each kind and
    the chosen map's (0 for keeping the current map)."""
    out = {"tie/score_candidates": float(len(scores))}
    for kind in ("tie", "move", "untie"):
        values = [e["score"] for e in scores if e["kind"] == kind]
        if values:
            out[f"tie/score_best_{kind}"] = float(min(values))
    out["tie/score_chosen"] = next((float(e["score"]) for e in scores if e["tie_map"] == chosen), 0.0)
    return out
