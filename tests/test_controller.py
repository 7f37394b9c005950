"""The scored controller measures the map: paired scores equal what they claim, and decisions follow the
model, not the loss curve (the replay-invariance probe of shared/research/tying-agent-diagnosis.md)."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_dyntie import DynTieGPT2LMHeadModel
from hf_dyntie.training.policies import make_policy
from hf_dyntie.training.scoring import HeldOutScorer
from hf_dyntie.tie_map import untie_candidates

from helpers import build, gpt2_config, input_ids, paper_config, randomize_layers

LR_SUM = 1e-3


def scorer_for(model) -> HeldOutScorer:
    batches = [{"input_ids": input_ids(batch=4, length=12, seed=s), "labels": input_ids(batch=4, length=12, seed=s)} for s in (5, 6)]
    return HeldOutScorer(model, batches, lambda inputs: model(**inputs).loss, lambda: LR_SUM)


def held_out_loss(model, scorer) -> float:
    model.eval()
    with torch.no_grad():
        return sum(float(model(**b).loss) for b in scorer.batches) / len(scorer.batches)


def test_loss_deltas_equal_the_loss_of_a_model_retied_to_the_candidate():
    model = build(DynTieGPT2LMHeadModel, gpt2_config([0, 1, 1, 3, 3, 5]))
    randomize_layers(model)
    scorer = scorer_for(model)
    candidates = [[0, 1, 1, 1, 1, 5], [0, 0, 0, 3, 3, 5], [0, 1, 1, 3, 1, 5], [0, 1, 2, 3, 3, 5]]
    deltas = scorer.loss_deltas(candidates)
    base = held_out_loss(model, scorer)
    for candidate, delta in zip(candidates, deltas):
        other = copy.deepcopy(model)
        other.retie(candidate)
        assert delta == pytest.approx(held_out_loss(other, scorer) - base, abs=1e-6)
    assert deltas[3] == pytest.approx(0.0, abs=1e-7)  # an untie copies: no immediate change
    assert model.tie_map == [0, 1, 1, 3, 3, 5]  # scoring leaves the model's routing as it was


def test_untie_gains_use_each_positions_own_gradient():
    """Per-position gradients captured through the routing equal the gradients of an expanded (untied)
    copy, and the gain is the Adam sign-step conflict ``-lr (|g_A|_1 + |g_B|_1 - |g_A + g_B|_1)``."""
    tie_map = [0, 0, 0, 3, 3, 3]
    model = build(DynTieGPT2LMHeadModel, gpt2_config(tie_map))
    randomize_layers(model)
    scorer = scorer_for(model)
    expanded = copy.deepcopy(model)
    expanded.retie(list(range(6)))
    expanded.eval()
    loss = sum(expanded(**b).loss for b in scorer.batches) / len(scorer.batches)
    loss.backward()
    per_position = {i: [p.grad for p in expanded.dyntie_layers[i].parameters()] for i in range(6)}
    splits = untie_candidates(tie_map)
    gains = scorer.untie_gains(splits)
    for (p, movers), gain in zip(splits, gains):
        root = tie_map[p]
        part_b = {p, *movers}
        part_a = {q for q, r in enumerate(tie_map) if r == root} - part_b
        expected = 0.0
        for k in range(len(per_position[0])):
            g_a = sum(per_position[q][k] for q in part_a)
            g_b = sum(per_position[q][k] for q in part_b)
            expected -= LR_SUM * float(g_a.abs().sum() + g_b.abs().sum() - (g_a + g_b).abs().sum())
        assert gain == pytest.approx(expected, rel=1e-4, abs=1e-9), (p, movers)
        assert gain <= 0
    assert all(p.grad is None for p in model.parameters())  # scoring touches no .grad


def run_decisions(policy, model, losses, with_scorer: bool) -> list[list[int]]:
    tie_map, maps = policy.initial_tie_map(), []
    model.retie(tie_map)
    scorer = scorer_for(model) if with_scorer else None
    for step, loss in enumerate(losses):  # the trainer's order: reward of the last decision, then the next one
        policy.learn(loss, scorer)
        decision = policy.decide(tie_map, step * 10, scorer)
        if decision is not None:
            tie_map = decision.tie_map
            model.retie(tie_map)
        maps.append(tie_map)
    return maps


LOSSES_A = [5.0 - 0.1 * t for t in range(12)]
LOSSES_B = [4.0 + 0.3 * ((t * 7) % 5) for t in range(12)]


def two_models():
    a = build(DynTieGPT2LMHeadModel, gpt2_config(None), seed=0)
    b = build(DynTieGPT2LMHeadModel, gpt2_config(None), seed=1)
    randomize_layers(a, seed=2)
    randomize_layers(b, seed=3)
    return a, b


def test_the_old_agent_fails_the_replay_probe():
    """The Q-learning agent (improved settings) takes the same decisions on two different models fed the
    same losses: its decisions are a function of its seed and the loss curve, not of the map."""
    config = paper_config(seed=0, reward="neg_loss", replay_size=8, replay_batch=4, target_update=2,
                          bootstrap="next_layer", q_hidden=16)
    a, b = two_models()
    maps_a = run_decisions(make_policy("qlearning", 6, config), a, LOSSES_A, with_scorer=False)
    maps_b = run_decisions(make_policy("qlearning", 6, config), b, LOSSES_A, with_scorer=False)
    assert maps_a == maps_b


# weights do not train in this probe, so an untie scores 0: the paired agent starts untied and learns from ties
PAIRED_AGENT = {"start_map": list(range(6)), "reward": "paired", "q_state": "onehot_progress", "gamma": 0.5, "epsilon_start": 0.5, "epsilon_min": 0.5,
                "q_hidden": 16, "q_lr": 1e-2}


@pytest.mark.parametrize(
    "name, extra",
    [("greedy", {"budget": 4}), ("grow", {"budget": 4, "grow_order": "scored"}), ("qlearning", PAIRED_AGENT)],
    ids=["greedy", "grow_scored", "qlearning_paired"],
)
def test_scored_controllers_pass_the_replay_probe(name, extra):
    """Same policy, same losses, different models: different decisions. Same model, other losses: the same
    decisions (nothing is read from the loss curve)."""
    config = paper_config(**{"seed": 0, "score_margin": 0.0, "grow_until": 0.9, **extra})
    a, b = two_models()

    def fresh():
        policy = make_policy(name, 6, config)
        policy.begin_run(120)
        return policy

    maps_a = run_decisions(fresh(), a, LOSSES_A, with_scorer=True)
    maps_b = run_decisions(fresh(), b, LOSSES_A, with_scorer=True)
    assert maps_a != maps_b, "decisions did not depend on the model"
    a2, _ = two_models()
    assert run_decisions(fresh(), a2, LOSSES_B, with_scorer=True) == maps_a
