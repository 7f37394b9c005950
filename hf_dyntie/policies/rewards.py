"""Rewards: how a tying decision is scored from the loss the model reached after it.

Three kinds (``PolicyConfig.reward``):

- ``"neg_ppl_clipped"``: ``-exp(loss)`` clipped to ``[-clip, clip]``, the paper code's reward. With the default
  clip of 10 it is a constant -10 whenever perplexity exceeds 10, which is most of training on real corpora,
  so the agent then learns nothing from it; kept for parity.
- ``"neg_loss"``: ``-loss``. Same ordering as ``-perplexity`` but on a scale that never saturates.
- ``"loss_improvement"``: ``baseline - loss``, with the baseline an exponential moving average of the losses
  seen so far. Removes the slow downward drift of the loss over training, so the reward says whether this
  decision did better than recent ones rather than whether training has progressed.
- ``"paired"`` (Q-learning only): the value given is already a paired score of the decision on the fixed
  held-out scoring set (positive: the change helped; see ``QLearningPolicy.learn``); the reward is that value
  in centinats (x100) so that it sits on the Q-network's scale. No trend, no batch noise.

A non-finite loss yields ``None``: there is nothing to learn from it, and it must not touch the baseline.
"""

from __future__ import annotations

import math
from typing import Any

from .base import REWARDS


class RewardFunction:
    """Turns a mean token loss into a reward; stateful only for ``"loss_improvement"`` (its baseline)."""

    def __init__(self, kind: str = "neg_ppl_clipped", clip: float = 10.0, baseline_decay: float = 0.9):
        if kind not in REWARDS:
            raise ValueError(f"unknown reward {kind!r}; choose one of {', '.join(REWARDS)}")
        if not clip > 0:
            raise ValueError(f"reward_clip must be > 0, got {clip}")
        if not 0.0 <= baseline_decay <= 1.0:
            raise ValueError(f"reward_baseline_decay must lie in [0, 1], got {baseline_decay}")
        self.kind = kind
        self.clip = float(clip)
        self.baseline_decay = float(baseline_decay)
        self.baseline: float | None = None  # "loss_improvement": EMA of past losses, None until the first loss
        self.count = 0  # finite losses seen

    def __call__(self, loss: float) -> float | None:
        """The reward for ``loss``, or ``None`` if the loss is not finite (the caller skips learning)."""
        loss = float(loss)
        if not math.isfinite(loss):
            return None
        self.count += 1
        if self.kind == "paired":
            return 100.0 * loss
        if self.kind == "neg_loss":
            return -loss
        if self.kind == "neg_ppl_clipped":
            return max(-self.clip, min(self.clip, -_exp(loss)))
        # loss_improvement: compare with the baseline of the *earlier* losses, then fold this one in.
        if self.baseline is None:
            self.baseline = loss
        reward = self.baseline - loss
        self.baseline = self.baseline_decay * self.baseline + (1.0 - self.baseline_decay) * loss
        return reward

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "baseline": self.baseline, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"this reward state is for reward {state['kind']!r}, not {self.kind!r}")
        self.baseline = None if state["baseline"] is None else float(state["baseline"])
        self.count = int(state["count"])


def _exp(x: float) -> float:
    """``math.exp`` that returns ``inf`` instead of raising on overflow (a loss above ~709)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
