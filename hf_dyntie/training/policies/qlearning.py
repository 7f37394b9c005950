"""The paper's Q-learning agent (docs/design.md, "Policies"), with replay and a target network as options.

One decision acts on one layer ``l``; the decisions sweep ``l = 1, 2, ..., L-1, 1, 2, ...`` (layer 0 has
nothing earlier to tie to). The Q-network reads the tie map as ``L`` floats and outputs ``L(L+1)/2`` values:
layer ``l`` owns the slice ``[l(l+1)/2, l(l+1)/2 + l]`` of ``l+1`` values, index ``j < l`` meaning "run layer
``j``'s weights" and index ``l`` meaning "train layer ``l`` itself". Only that slice is looked at when
acting for ``l``, so the agent can never propose ``a > l``.

``PolicyConfig(**PAPER_OPTIONS)`` is the paper code: epsilon 1.0 decaying by 0.95 per sweep to 0.01, AdamW
1e-3 with weight decay 0.01, target ``r + 0.99 * max Q(s')[slice of l]``, one update per transition, no replay,
no target network, reward ``-perplexity`` clipped. The default ``PolicyConfig()`` differs in the reward
(``neg_loss``) and the epsilon decay (scaled to the run), as the trainer's defaults do (docs/RESULTS.md). All randomness (network init, exploration, replay sampling) comes from one
``torch.Generator`` seeded with ``config.seed``; the global torch RNG is never touched, so the policy does
not change the model's dropout or data order.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from ...tie_map import apply_actions
from .base import Decision, MapScorer, scaled_epsilon_decay
from .options import PolicyConfig
from .sweep import SweepPolicy

STATE_FORMAT = 1


def slice_offset(layer: int) -> int:
    """Where layer ``layer``'s actions start in the Q-network output: ``l(l+1)/2`` (layers 0..l-1 own
    1 + 2 + ... + l values before it)."""
    return layer * (layer + 1) // 2


def num_actions(num_layers: int) -> int:
    """Size of the Q-network output: ``1 + 2 + ... + L = L(L+1)/2``."""
    return num_layers * (num_layers + 1) // 2


def slice_masks(num_layers: int) -> torch.Tensor:
    """``(L, L(L+1)/2)`` bool: row ``l`` is True exactly on layer ``l``'s slice."""
    masks = torch.zeros(num_layers, num_actions(num_layers), dtype=torch.bool)
    for layer in range(num_layers):
        masks[layer, slice_offset(layer) : slice_offset(layer) + layer + 1] = True
    return masks


def state_size(num_layers: int, q_state: str) -> int:
    """Width of the Q-network input: ``L`` raw root indices (parity), or ``L*L`` one-hot roots plus progress."""
    return num_layers if q_state == "map" else num_layers * num_layers + 1


def build_q_network(num_layers: int, hidden: int, generator: torch.Generator, q_state: str = "map") -> nn.Sequential:
    """``Linear(in, hidden) -> ReLU -> Linear(hidden, L(L+1)/2)``, initialised like ``nn.Linear`` (uniform in
    ``+-1/sqrt(fan_in)``) but from ``generator``, so the same seed gives the same network."""
    width = state_size(num_layers, q_state)
    net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, num_actions(num_layers)))
    with torch.no_grad():
        for linear in (net[0], net[2]):
            bound = 1.0 / math.sqrt(linear.in_features)
            linear.weight.uniform_(-bound, bound, generator=generator)
            linear.bias.uniform_(-bound, bound, generator=generator)
    return net


def _state_tensor(tie_map: list[int] | torch.Tensor, progress: float | torch.Tensor = 0.0, q_state: str = "map") -> torch.Tensor:
    """The Q-network's input. ``"map"``: the tie map as floats (the paper code feeds the raw indices).
    ``"onehot_progress"``: each position's root one-hot (so "tied to 3" is not "3x tied to 1") and the
    fraction of training done (so late and early decisions can differ). Works on one map or a batch."""
    maps = torch.as_tensor(tie_map, dtype=torch.long)
    if q_state == "map":
        return maps.float()
    onehot = nn.functional.one_hot(maps, maps.shape[-1]).float().flatten(-2)
    progress = torch.as_tensor(progress, dtype=torch.float32).reshape(*maps.shape[:-1], 1)
    return torch.cat([onehot, progress], dim=-1)


class QLearningPolicy(SweepPolicy):
    """Epsilon-greedy deep Q-learning over per-layer tie actions.

    ``decide`` returns a :class:`Decision` for every call (also when the chosen action keeps the map), so the
    trainer can log each action; ``learn(loss)`` completes the transition of the last decision with its reward
    and makes one AdamW step on the Q-network. It returns ``{"reward", "q_loss", "q_value", "td_target"}``
    (the last two for the newest transition), ``{"skipped_nonfinite_loss": 1.0}`` for a non-finite loss, and
    ``{}`` when no decision is waiting for its reward.
    """

    name = "qlearning"
    dynamic = True

    def __init__(self, num_layers: int, config: PolicyConfig):
        super().__init__(num_layers, config)
        self.q_net = build_q_network(num_layers, config.q_hidden, self.generator, config.q_state)
        self.optimizer = torch.optim.AdamW(self.q_net.parameters(), lr=config.q_lr, weight_decay=config.q_weight_decay)
        self.target_net = _frozen_copy(self.q_net) if config.target_update > 0 else None
        self.masks = slice_masks(num_layers)
        self.epsilon = float(config.epsilon_start)
        self.epsilon_decay = config.epsilon_decay  # None: scaled to the run's length by begin_run
        self.updates = 0  # Q-network updates (learn() calls that learned); drives target-network syncs
        self.pending: dict[str, Any] | None = None  # the last decision, waiting for its reward
        self.replay = _ReplayBuffer(config.replay_size, num_layers)
        self.needs_scorer = config.reward == "paired"
        self.max_steps: int | None = None

    # ----------------------------------------------------------------------------------------- acting

    def begin_run(self, max_steps: int) -> None:
        """The run's length: for the progress feature, and for the epsilon schedule when ``epsilon_decay`` is
        ``None`` (it then reaches ``epsilon_min`` 65% of the way through; the same value again on resume)."""
        self.max_steps = max_steps
        if self.config.epsilon_decay is None:
            self.epsilon_decay = scaled_epsilon_decay(
                self.config.epsilon_start, self.config.epsilon_min, max_steps, self.interval, self.num_layers
            )

    def progress(self, step: int) -> float:
        """Fraction of the run done at ``step`` (0 when the run length is unknown)."""
        return min(1.0, step / self.max_steps) if self.max_steps else 0.0

    @torch.no_grad()
    def q_values(self, tie_map: list[int], layer: int, net: nn.Module | None = None, progress: float = 0.0) -> torch.Tensor:
        """Layer ``layer``'s ``layer + 1`` action values in state ``tie_map`` (at ``progress`` of the run)."""
        q = (self.q_net if net is None else net)(_state_tensor(tie_map, progress, self.config.q_state))
        return q[slice_offset(layer) : slice_offset(layer) + layer + 1]

    def decide(self, tie_map: list[int], step: int, scorer: MapScorer | None = None) -> Decision | None:
        if self.num_layers == 1:
            return None  # one layer: nothing can be tied
        if self.epsilon_decay is None:
            raise RuntimeError("epsilon_decay=None is scaled to the run: the trainer calls begin_run(max_steps) first")
        state, layer, allowed = self.next_choice(tie_map)
        if torch.rand((), generator=self.generator).item() < self.epsilon:
            action = self.random_action(allowed)
        else:
            q = self.q_values(state, layer, progress=self.progress(step))
            action = max(allowed, key=lambda a: (q[a].item(), -a))  # argmax over the allowed, first on ties
        next_state = apply_actions(state, {layer: action})
        self.decisions += 1
        if layer == self.num_layers - 1:  # a sweep is complete
            self.epsilon = max(self.config.epsilon_min, self.epsilon * self.epsilon_decay)
        immediate = 0.0  # paired reward: what the change costs at once (ties, moves; 0 for an untie)
        if self.config.reward == "paired" and next_state != state:
            if scorer is None:
                raise RuntimeError("tie_reward='paired' needs the trainer's scorer (an eval dataset)")
            immediate = scorer.loss_deltas([next_state])[0]
        self.pending = {
            "immediate": immediate,
            "state": state,
            "layer": layer,
            "action": action,
            "next_state": next_state,
            "next_layer": self.next_layer(),
            "progress": self.progress(step),
            "next_progress": self.progress(step + 1),
        }
        return Decision(tie_map=next_state, layer=layer, action=action)

    # --------------------------------------------------------------------------------------- learning

    def learn(self, loss: float, scorer: MapScorer | None = None) -> dict[str, float]:
        if self.pending is None:
            return {}
        transition, self.pending = self.pending, None
        if self.config.reward == "paired":
            # the change's value, paired on the held-out scoring set: what it cost at once (a tie or a move;
            # the released weights are gone afterwards) plus what the previous map would lose now against the
            # current one after an interval of training (an untie: its root is still there to route back to)
            if scorer is None:
                raise RuntimeError("tie_reward='paired' needs the trainer's scorer (an eval dataset)")
            same = transition["state"] == transition["next_state"]
            later = 0.0 if same else scorer.loss_deltas([transition["state"]])[0]
            loss = later - transition.get("immediate", 0.0)
        reward = self.reward_fn(loss)
        if reward is None:
            return {"skipped_nonfinite_loss": 1.0}
        newest = _ReplayBuffer.as_tensors([{**transition, "reward": reward}])
        batch = newest
        if self.replay.capacity > 0:
            sampled = self.replay.sample(self.config.replay_batch, self.generator)
            if sampled is not None:
                batch = {key: torch.cat([sampled[key], newest[key]]) for key in newest}
            self.replay.add(newest)
        q_value, target, q_loss = self._update(batch)
        self.updates += 1
        if self.target_net is not None and self.updates % self.config.target_update == 0:
            self.target_net.load_state_dict(self.q_net.state_dict())
        return {"reward": reward, "q_loss": q_loss, "q_value": q_value, "td_target": target}

    def td_targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``r + gamma * max_a' Q(s', a')`` with ``a'`` over the bootstrap layer's slice: the same layer
        (paper code) or the layer the next decision acts on; ``Q`` is the target network when there is one."""
        net = self.target_net if self.target_net is not None else self.q_net
        layers = batch["layer"] if self.config.bootstrap == "same_layer" else batch["next_layer"]
        with torch.no_grad():
            q_next = net(_state_tensor(batch["next_state"], batch["next_progress"], self.config.q_state))
            best = q_next.masked_fill(~self.masks[layers], -math.inf).max(dim=1).values
        return batch["reward"] + self.config.gamma * best

    def _update(self, batch: dict[str, torch.Tensor]) -> tuple[float, float, float]:
        """One AdamW step on the mean squared TD error of ``batch``; returns the newest (last) transition's
        Q value and target, and the loss that was minimised."""
        targets = self.td_targets(batch)
        index = torch.tensor([slice_offset(int(l)) for l in batch["layer"]]) + batch["action"]
        q = self.q_net(_state_tensor(batch["state"], batch["progress"], self.config.q_state)).gather(1, index[:, None]).squeeze(1)
        loss = nn.functional.mse_loss(q, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return q[-1].item(), targets[-1].item(), loss.item()

    def metrics(self) -> dict[str, float]:
        return {"epsilon": self.epsilon}

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors: ``q_net.*`` (and ``target_net.*``), ``optimizer.<param index>.<exp_avg|exp_avg_sq|step>``,
        ``generator_state``, ``replay.*``. Values: the header (name, num_layers), sizes the tensors depend on,
        epsilon, counters, the pending transition and the reward state. No pickling anywhere."""
        tensors = {f"q_net.{k}": v.detach().clone() for k, v in self.q_net.state_dict().items()}
        if self.target_net is not None:
            tensors.update({f"target_net.{k}": v.detach().clone() for k, v in self.target_net.state_dict().items()})
        for index, param_state in self.optimizer.state_dict()["state"].items():
            for key, value in param_state.items():
                tensors[f"optimizer.{index}.{key}"] = value.detach().clone()
        tensors["generator_state"] = self.generator.get_state()
        if self.replay.capacity > 0:
            tensors.update({f"replay.{k}": v.clone() for k, v in self.replay.tensors.items()})
        values = {
            **self.state_header(),
            "format": STATE_FORMAT,
            "q_hidden": self.config.q_hidden,
            "q_state": self.config.q_state,
            "replay_size": self.replay.capacity,
            "replay_count": self.replay.count,
            "replay_added": self.replay.added,
            "epsilon": self.epsilon,
            "decisions": self.decisions,
            "updates": self.updates,
            "pending": self.pending,
            "reward": self.reward_fn.state_dict(),
        }
        return tensors, values

    def load_state_dict(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        self.check_state_header(values)
        if values.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown qlearning state format {values.get('format')!r}; expected {STATE_FORMAT}")
        for key in ("q_hidden", "replay_size", "q_state"):
            saved, current = values.get(key, "map"), getattr(self.config, key)
            if saved != current:
                raise ValueError(f"this state was saved with {key}={saved}; this policy has {key}={current}")
        self.q_net.load_state_dict(_strip(tensors, "q_net."))
        if self.target_net is not None:
            saved_target = _strip(tensors, "target_net.")
            self.target_net.load_state_dict(saved_target or self.q_net.state_dict())  # new option: start in sync
        optimizer_state = self.optimizer.state_dict()
        optimizer_state["state"] = {}
        for key, value in _strip(tensors, "optimizer.").items():
            index, name = key.split(".", 1)
            optimizer_state["state"].setdefault(int(index), {})[name] = value.clone()
        self.optimizer.load_state_dict(optimizer_state)
        self.generator.set_state(tensors["generator_state"].clone())
        if self.replay.capacity > 0:
            self.replay.load(_strip(tensors, "replay."), values["replay_count"], values["replay_added"])
        self.epsilon = float(values["epsilon"])
        self.decisions = int(values["decisions"])
        self.updates = int(values["updates"])
        self.pending = values["pending"]
        self.reward_fn.load_state_dict(values["reward"])


class _ReplayBuffer:
    """A ring buffer of transitions ``(s, l, a, r, s', next_l)`` kept as tensors (so it saves to safetensors).
    Tie maps are stored as integers, exactly."""

    def __init__(self, capacity: int, num_layers: int):
        self.capacity = capacity
        self.count = 0  # transitions held (<= capacity)
        self.added = 0  # transitions ever added; the next one overwrites slot added % capacity
        self.tensors = {
            "state": torch.zeros(capacity, num_layers, dtype=torch.long),
            "layer": torch.zeros(capacity, dtype=torch.long),
            "action": torch.zeros(capacity, dtype=torch.long),
            "reward": torch.zeros(capacity, dtype=torch.float32),
            "next_state": torch.zeros(capacity, num_layers, dtype=torch.long),
            "next_layer": torch.zeros(capacity, dtype=torch.long),
            "progress": torch.zeros(capacity, dtype=torch.float32),
            "next_progress": torch.zeros(capacity, dtype=torch.float32),
        }

    @staticmethod
    def as_tensors(transitions: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """A batch in the buffer's layout from transition dicts."""
        return {
            "state": torch.tensor([t["state"] for t in transitions], dtype=torch.long),
            "layer": torch.tensor([t["layer"] for t in transitions], dtype=torch.long),
            "action": torch.tensor([t["action"] for t in transitions], dtype=torch.long),
            "reward": torch.tensor([t["reward"] for t in transitions], dtype=torch.float32),
            "next_state": torch.tensor([t["next_state"] for t in transitions], dtype=torch.long),
            "next_layer": torch.tensor([t["next_layer"] for t in transitions], dtype=torch.long),
            "progress": torch.tensor([t.get("progress", 0.0) for t in transitions], dtype=torch.float32),
            "next_progress": torch.tensor([t.get("next_progress", 0.0) for t in transitions], dtype=torch.float32),
        }

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        for row in range(len(batch["layer"])):
            slot = self.added % self.capacity
            for key, store in self.tensors.items():
                store[slot] = batch[key][row]
            self.added += 1
            self.count = min(self.count + 1, self.capacity)

    def sample(self, size: int, generator: torch.Generator) -> dict[str, torch.Tensor] | None:
        """Up to ``size`` distinct stored transitions, uniformly at random; ``None`` when empty."""
        if self.count == 0:
            return None
        index = torch.randperm(self.count, generator=generator)[:size]
        return {key: store[index] for key, store in self.tensors.items()}

    def load(self, tensors: dict[str, torch.Tensor], count: int, added: int) -> None:
        for key in self.tensors:
            if key in tensors:  # states saved before a field existed keep its zeros
                self.tensors[key] = tensors[key].clone()
        self.count, self.added = int(count), int(added)


def _frozen_copy(net: nn.Module) -> nn.Module:
    """A copy of ``net`` that takes no gradients (the target network)."""
    return copy.deepcopy(net).requires_grad_(False)


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with the prefix removed."""
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
