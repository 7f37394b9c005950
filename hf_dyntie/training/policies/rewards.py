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

A finite but absurd value (a diverging run reaches losses of 1e8) is clipped before it becomes a reward:
the loss, or the paired score, to ``[-limit, limit]`` nats (default :data:`REWARD_LIMIT_NATS`, 20 nats: a
perplexity of 5e8, far above a uniform guess over any vocabulary). So ``neg_loss`` and ``loss_improvement``
rewards stay within +-20 (+-40 for an improvement) and ``paired`` within +-2000 centinats, and one bad
interval can neither blow up the Q-network's regression nor poison the running baseline. The first clip is
logged once.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from .options import REWARDS

logger = logging.getLogger(__name__)

REWARD_LIMIT_NATS = 20.0


class RewardFunction:
    """Turns a mean token loss into a reward; stateful only for ``"loss_improvement"`` (its baseline)."""

    def __init__(
        self, kind: str = "neg_ppl_clipped", clip: float = 10.0, baseline_decay: float = 0.9,
        limit: float = REWARD_LIMIT_NATS,
    ):
        if kind not in REWARDS:
            raise ValueError(f"unknown reward {kind!r}; choose one of {', '.join(REWARDS)}")
        if not clip > 0:
            raise ValueError(f"reward_clip must be > 0, got {clip}")
        if not 0.0 <= baseline_decay <= 1.0:
            raise ValueError(f"reward_baseline_decay must lie in [0, 1], got {baseline_decay}")
        if not limit > 0:
            raise ValueError(f"the reward limit must be > 0 nats, got {limit}")
        self.kind = kind
        self.limit = float(limit)
        self.clipped = 0  # values clipped to +-limit so far (not saved: a diagnostic)
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
        if self.kind == "neg_ppl_clipped":  # bounded by its own clip already
            return max(-self.clip, min(self.clip, -perplexity(loss)))
        loss = self._clip(loss)
        if self.kind == "paired":
            return 100.0 * loss
        if self.kind == "neg_loss":
            return -loss
        # loss_improvement: compare with the baseline of the *earlier* losses, then fold this one in.
        if self.baseline is None:
            self.baseline = loss
        reward = self.baseline - loss
        self.baseline = self.baseline_decay * self.baseline + (1.0 - self.baseline_decay) * loss
        return reward

    def _clip(self, value: float) -> float:
        """``value`` limited to ``[-limit, limit]`` nats; the first clip of a run is logged."""
        if abs(value) <= self.limit:
            return value
        if self.clipped == 0:
            logger.warning(
                f"tying reward: a {'paired score' if self.kind == 'paired' else 'loss'} of {value:.4g} nats is "
                f"outside +-{self.limit:g}; clipped (is the run diverging? a lower learning rate may help)"
            )
        self.clipped += 1
        return math.copysign(self.limit, value)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "baseline": self.baseline, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"this reward state is for reward {state['kind']!r}, not {self.kind!r}")
        self.baseline = None if state["baseline"] is None else float(state["baseline"])
        self.count = int(state["count"])


def perplexity(loss: float) -> float:
    """``exp(loss)``, ``inf`` instead of an ``OverflowError`` for a loss above ~709 (one home for it: rewards,
    the scripts' results and the model card all use this one)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
