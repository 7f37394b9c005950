"""Replay the tie maps of an earlier run, step for step.

This separates the *schedule* an agent found from the agent: train a fresh model (another seed, another
size of data) under exactly the recorded maps, or under the same grouping with the positions shuffled
(``replay_permute_seed``) to test whether *which* layers share matters or only *how many* do.

The file is the ``tie_history.jsonl`` the trainer writes: one JSON object per line with at least
``{"step": int, "tie_map": [...]}`` (also ``layer``, ``action``, ``reward``, which are carried over when the
maps are not permuted).
"""

from __future__ import annotations

import bisect
import json
import os
from typing import Any

import torch

from ...tie_map import check_budget, normalize_tie_map, positions_per_root
from .base import Decision, MapScorer, TyingPolicy
from .options import PolicyConfig
from .rewards import RewardFunction
from .static import tie_map_from_groups


def load_tie_history(path: str | os.PathLike, num_layers: int) -> list[dict[str, Any]]:
    """The records of ``path`` sorted by step (stable: of two records at one step the later line wins), each
    map validated for ``num_layers`` positions. ``ValueError`` for a missing or empty file or a bad record."""
    if not path or not os.path.isfile(path):
        raise ValueError(f"replay_file {path!r} does not exist; pass the tie_history.jsonl of an earlier run")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not JSON ({error})") from None
            if not isinstance(record, dict) or "step" not in record or "tie_map" not in record:
                raise ValueError(f"{where}: a record needs 'step' and 'tie_map', got {line.strip()[:200]}")
            if isinstance(record["step"], bool) or not isinstance(record["step"], int):
                raise ValueError(f"{where}: 'step' must be an integer, got {record['step']!r}")
            try:
                record["tie_map"] = normalize_tie_map(record["tie_map"], num_layers)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
            records.append(record)
    if not records:
        raise ValueError(f"replay_file {path!r} holds no records")
    records.sort(key=lambda r: r["step"])
    return records


def position_permutation(num_layers: int, seed: int) -> list[int]:
    """A fixed random permutation of positions ``1..L-1``; position 0 stays (it can only be a root)."""
    generator = torch.Generator().manual_seed(seed)
    return [0] + (1 + torch.randperm(num_layers - 1, generator=generator)).tolist()


def permute_groups(tie_map: list[int], permutation: list[int]) -> list[int]:
    """Move every position ``i`` to ``permutation[i]``, keeping who shares with whom; each moved group runs
    the weights at its smallest new position. Same number of unique layers, same group sizes."""
    group_ids = [0] * len(tie_map)
    for root, positions in positions_per_root(tie_map).items():
        for i in positions:
            group_ids[permutation[i]] = root
    return tie_map_from_groups(group_ids)


class ReplayPolicy(TyingPolicy):
    """``decide(tie_map, step)`` returns the map of the latest record at or before ``step`` (``None`` when
    that is the current map). ``learn`` only computes the reward, for the logs."""

    name = "replay"
    dynamic = True
    default_interval = 1  # every step, so that each recorded step is a decision step

    def __init__(self, num_layers: int, config: PolicyConfig):
        super().__init__(num_layers, config)
        self.records = load_tie_history(config.replay_file, num_layers)
        self.steps = [int(r["step"]) for r in self.records]
        self.permutation = None
        if config.replay_permute_seed is not None:
            self.permutation = position_permutation(num_layers, config.replay_permute_seed)
        self.reward_fn = RewardFunction(config.reward, config.reward_clip, config.reward_baseline_decay)
        for index, record in enumerate(self.records):  # a replay cannot mask: refuse up front
            check_budget(self.recorded_map(index), config.budget, f"recorded map at step {record['step']}")

    def schedule_problem(self, max_steps: int) -> tuple[str, bool] | None:
        """A replay follows the recorded steps: a recorded step that is no decision step would be applied late or
        not at all (refused), and one at or past the end of the run is never reached (said)."""
        off = [s for s in self.steps if s % self.interval != 0]
        if off:
            shown = ", ".join(map(str, off[:5])) + (" ..." if len(off) > 5 else "")
            return (f"replay with a decision every {self.interval} steps would apply the maps recorded at steps {shown} late "
                    f"or drop them: use --tie_interval 1 (replay's default)", True)
        late = [s for s in self.steps if s >= max_steps]
        if late:
            return (f"replay: {len(late)} recorded map(s) at step {late[0]} or later fall after the run's {max_steps} "
                    f"steps and are not replayed", False)
        return None

    def recorded_map(self, index: int) -> list[int]:
        """Record ``index``'s map, permuted when asked."""
        tie_map = self.records[index]["tie_map"]
        return tie_map if self.permutation is None else permute_groups(tie_map, self.permutation)

    def initial_tie_map(self) -> list[int]:
        if self.steps[0] == 0:
            return self.recorded_map(0)
        return self.start_map()

    def decide(self, tie_map: list[int], step: int, scorer: MapScorer | None = None) -> Decision | None:
        index = bisect.bisect_right(self.steps, step) - 1
        if index < 0:
            return None
        new_map = self.recorded_map(index)
        if new_map == list(tie_map):  # the model's map, in root form already
            return None
        if self.permutation is not None:  # the recorded layer/action describe other positions
            return Decision(tie_map=new_map)
        record = self.records[index]
        return Decision(tie_map=new_map, layer=record.get("layer"), action=record.get("action"))

    def learn(self, loss: float, scorer: MapScorer | None = None) -> dict[str, float]:
        reward = self.reward_fn(loss)
        return {"skipped_nonfinite_loss": 1.0} if reward is None else {"reward": reward}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {**self.state_header(), "reward": self.reward_fn.state_dict()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        self.check_state_header(values)
        self.reward_fn.load_state_dict(values["reward"])
