"""The sweep policies: the paper's Q-learning agent (action slices, TD learning, rewards, replay buffer, target
network, state round trips) and its random control."""

from __future__ import annotations

import collections
import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from helpers import paper_config
from hf_dyntie.training.policies import QLearningPolicy, RandomPolicy, RewardFunction, make_policy
from hf_dyntie.training.policies.qlearning import num_actions, slice_masks, slice_offset
from hf_dyntie.training.training_args import DynTieTrainingArguments
from hf_dyntie.tie_map import apply_actions, normalize_tie_map


# ---- helpers -------------------------------------------------------------------------------------


def set_constant_q(policy: QLearningPolicy, values: list[float]) -> None:
    """Make the Q-network output ``values`` for every input: hidden = ReLU(0 * s + 1) = 1, out = 0 * h + b."""
    with torch.no_grad():
        policy.q_net[0].weight.zero_()
        policy.q_net[0].bias.fill_(1.0)
        policy.q_net[2].weight.zero_()
        policy.q_net[2].bias.copy_(torch.tensor(values))


def q_weights(policy: QLearningPolicy) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in policy.q_net.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def through_disk(tensors: dict[str, torch.Tensor], values: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """What a checkpoint gives back: safetensors bytes and JSON text (so nothing may need pickling)."""
    return safetensors_load(safetensors_save(tensors)), json.loads(json.dumps(values))


LOSSES = [3.0 + 0.5 * math.sin(i) for i in range(12)]


# ---- action slices -------------------------------------------------------------------------------


def test_action_slices_for_four_layers():
    # Layer l owns l+1 values at offset l(l+1)/2: layer 0 -> [0], 1 -> [1, 2], 2 -> [3, 4, 5], 3 -> [6..9].
    assert [slice_offset(l) for l in range(4)] == [0, 1, 3, 6]
    assert num_actions(4) == 10
    masks = slice_masks(4)
    assert masks[1].nonzero().flatten().tolist() == [1, 2]
    assert masks[2].nonzero().flatten().tolist() == [3, 4, 5]
    assert masks[3].nonzero().flatten().tolist() == [6, 7, 8, 9]
    assert masks.sum(dim=0).tolist() == [1] * 10  # every output belongs to exactly one layer

    policy = QLearningPolicy(4, paper_config(q_hidden=8))
    assert policy.q_net[0].in_features == 4 and policy.q_net[2].out_features == 10


def test_greedy_action_looks_only_at_the_layers_slice():
    policy = QLearningPolicy(4, paper_config(epsilon_start=0.0, q_hidden=8))
    values = [0.0] * 10
    values[9] = 100.0  # layer 3's "train" value: the global maximum, but not layer 1's business
    values[2] = 1.0  # layer 1: train independently beats tie-to-0 (values[1] = 0)
    set_constant_q(policy, values)
    decision = policy.decide([0, 0, 0, 0], step=0)
    assert (decision.layer, decision.action) == (1, 1)
    assert decision.tie_map == [0, 1, 0, 0]


def test_explored_actions_stay_in_range_and_follow_the_transition():
    policy = QLearningPolicy(6, paper_config(epsilon_start=1.0, epsilon_decay=1.0, q_hidden=8))
    tie_map = policy.initial_tie_map()
    seen = collections.defaultdict(set)
    for i in range(250):
        decision = policy.decide(tie_map, step=4 * i)
        assert decision.layer == 1 + i % 5  # the sweep 1..L-1
        assert 0 <= decision.action <= decision.layer
        assert decision.tie_map == apply_actions(tie_map, {decision.layer: decision.action})
        seen[decision.layer].add(decision.action)
        tie_map = decision.tie_map
    assert {l: sorted(a) for l, a in seen.items()} == {l: list(range(l + 1)) for l in range(1, 6)}


def test_transition_keeps_root_form_when_a_followed_layer_gets_tied():
    # Layers 2 and 3 run layer 1's weights; tying layer 1 to layer 0 moves all three onto layer 0.
    policy = QLearningPolicy(4, paper_config(start_map=[0, 1, 1, 1], epsilon_start=0.0, q_hidden=8))
    values = [0.0] * 10
    values[1] = 5.0  # layer 1: tie to layer 0
    set_constant_q(policy, values)
    assert policy.initial_tie_map() == [0, 1, 1, 1]
    decision = policy.decide(policy.initial_tie_map(), step=0)
    assert decision.tie_map == [0, 0, 0, 0]
    assert normalize_tie_map(decision.tie_map) == decision.tie_map


# ---- learning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bootstrap, best_next", [("same_layer", 0.5), ("next_layer", 2.0)])
def test_td_target_and_loss_on_hand_computed_numbers(bootstrap, best_next):
    # L = 3: layer 1 owns outputs [1, 2], layer 2 owns [3, 4, 5]. Q(s) is the same vector for every s.
    config = paper_config(epsilon_start=0.0, reward="neg_loss", bootstrap=bootstrap, q_hidden=4)
    policy = QLearningPolicy(3, config)
    set_constant_q(policy, [0.0, 0.5, -1.0, 2.0, 1.5, -3.0])
    decision = policy.decide([0, 0, 0], step=0)
    assert (decision.layer, decision.action) == (1, 0)  # greedy: 0.5 > -1.0
    out = policy.learn(2.0)
    target = -2.0 + 0.99 * best_next  # reward -loss, max over layer 1's slice (same) or layer 2's (next)
    assert out["reward"] == -2.0
    assert out["q_value"] == pytest.approx(0.5)
    assert out["td_target"] == pytest.approx(target)
    assert out["q_loss"] == pytest.approx((0.5 - target) ** 2)


def test_td_target_uses_q_of_the_next_state():
    policy = QLearningPolicy(4, paper_config(epsilon_start=0.0, reward="neg_loss", q_hidden=16))
    decision = policy.decide([0, 0, 0, 0], step=0)
    q_now = policy.q_values([0, 0, 0, 0], decision.layer)[decision.action].item()
    best_next = policy.q_values(decision.tie_map, decision.layer).max().item()
    before = q_weights(policy)
    out = policy.learn(1.5)
    assert out["q_value"] == pytest.approx(q_now)
    assert out["td_target"] == pytest.approx(-1.5 + 0.99 * best_next)
    assert out["q_loss"] == pytest.approx((q_now - out["td_target"]) ** 2)
    assert not same_weights(before, q_weights(policy))  # one AdamW step was taken
    assert policy.learn(1.5) == {}  # nothing pending any more


def test_epsilon_decays_once_per_sweep_and_floors():
    config = paper_config(epsilon_start=1.0, epsilon_decay=0.5, epsilon_min=0.1, q_hidden=8)
    policy = QLearningPolicy(4, config)  # a sweep is 3 decisions (layers 1, 2, 3)
    tie_map = policy.initial_tie_map()
    history = []
    for i in range(15):
        tie_map = policy.decide(tie_map, step=i).tie_map
        history.append(policy.metrics()["epsilon"])
    assert history == [1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125, 0.125, 0.125, 0.1, 0.1, 0.1, 0.1]


def test_nonfinite_loss_is_skipped_and_leaves_the_network_alone():
    policy = QLearningPolicy(4, paper_config(reward="loss_improvement", q_hidden=8))
    before = q_weights(policy)
    for bad in (float("nan"), float("inf")):
        policy.decide(policy.initial_tie_map(), step=0)
        assert policy.learn(bad) == {"skipped_nonfinite_loss": 1.0}
    assert same_weights(before, q_weights(policy))
    assert policy.optimizer.state_dict()["state"] == {}
    assert policy.reward_fn.baseline is None and policy.updates == 0
    assert policy.learn(3.0) == {}  # the skipped transition is gone, not learned later


# ---- rewards -------------------------------------------------------------------------------------


def test_clipped_negative_perplexity_reward():
    reward = RewardFunction("neg_ppl_clipped", clip=10.0)
    assert reward(math.log(20.0)) == -10.0  # ppl 20 > 10: the constant the paper code's reward sits at
    assert reward(1.0) == pytest.approx(-math.e)
    assert reward(0.0) == pytest.approx(-1.0)
    assert reward(5000.0) == -10.0  # exp overflows: treated as infinite perplexity, no crash
    assert reward(float("nan")) is None


def test_better_scaled_rewards():
    assert RewardFunction("neg_loss")(2.5) == -2.5
    improvement = RewardFunction("loss_improvement", baseline_decay=0.5)
    assert improvement(4.0) == 0.0  # baseline starts at the first loss
    assert improvement(3.0) == 1.0  # baseline 4.0 -> then 3.5
    assert improvement(5.0) == -1.5  # baseline 3.5 -> then 4.25
    assert improvement(float("inf")) is None
    assert improvement.state_dict() == {"kind": "loss_improvement", "baseline": 4.25, "count": 3}
    with pytest.raises(ValueError, match="neg_loss"):
        RewardFunction("accuracy")


def test_absurd_finite_losses_are_clipped_before_the_q_network():
    policy = QLearningPolicy(4, paper_config(epsilon_start=0.0, reward="neg_loss", q_hidden=8))
    for loss in (3.0, 1e8, 2.9):
        policy.decide([0, 1, 2, 3], step=0)
        out = policy.learn(loss)
        assert abs(out["reward"]) <= 20.0 and out["q_loss"] < 1e3, out
    assert RewardFunction("neg_loss")(1e8) == -20.0
    assert RewardFunction("neg_loss")(2.5) == -2.5  # sane values untouched
    assert RewardFunction("paired")(-1e6) == -2000.0
    improvement = RewardFunction("loss_improvement")
    improvement(3.0)
    improvement(1e8)
    assert improvement.baseline <= 20.0  # the running baseline is not poisoned
    assert abs(improvement(3.0)) <= 40.0


# ---- replay buffer, target network ---------------------------------------------------------------


def test_replay_buffer_keeps_the_newest_and_updates_on_the_whole_batch():
    config = paper_config(replay_size=3, replay_batch=8, reward="neg_loss", epsilon_start=0.5, q_hidden=8)
    policy = QLearningPolicy(4, config)
    tie_map, done = policy.initial_tie_map(), []
    for i in range(5):
        tie_map = policy.decide(tie_map, step=i).tie_map
        newest = {**policy.pending, "reward": -LOSSES[i]}
        if i == 4:  # the update uses the 3 stored transitions (batch 8 > 3 held) plus the newest
            batch = policy.replay.as_tensors(done[-3:] + [newest])
            targets = policy.td_targets(batch)
            index = torch.tensor([slice_offset(int(l)) for l in batch["layer"]]) + batch["action"]
            with torch.no_grad():
                q = policy.q_net(batch["state"].float()).gather(1, index[:, None]).squeeze(1)
            expected_loss = torch.mean((q - targets) ** 2).item()
        out = policy.learn(LOSSES[i])
        done.append(newest)
    assert out["q_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert (policy.replay.count, policy.replay.added) == (3, 5)

    def key(t):
        return (tuple(t["state"]), t["layer"], t["action"], tuple(t["next_state"]), t["next_layer"])

    stored = policy.replay.tensors
    held = [
        (tuple(stored["state"][k].tolist()), int(stored["layer"][k]), int(stored["action"][k]),
         tuple(stored["next_state"][k].tolist()), int(stored["next_layer"][k]))
        for k in range(3)
    ]
    assert collections.Counter(held) == collections.Counter(key(t) for t in done[-3:])


def test_target_network_is_frozen_between_syncs():
    config = paper_config(target_update=3, reward="neg_loss", epsilon_start=0.0, q_hidden=8)
    policy = QLearningPolicy(4, config)
    synced = {k: v.clone() for k, v in policy.target_net.state_dict().items()}
    assert same_weights(synced, q_weights(policy))
    tie_map = policy.initial_tie_map()
    for i in range(7):
        decision = policy.decide(tie_map, step=i)
        tie_map = decision.tie_map
        best_next = policy.q_values(tie_map, decision.layer, net=policy.target_net).max().item()
        out = policy.learn(LOSSES[i])
        assert out["td_target"] == pytest.approx(-LOSSES[i] + 0.99 * best_next)  # bootstrapped from the target
        target = {k: v.clone() for k, v in policy.target_net.state_dict().items()}
        if (i + 1) % 3 == 0:
            assert same_weights(target, q_weights(policy))
            synced = target
        else:
            assert same_weights(target, synced)
            assert not same_weights(target, q_weights(policy))


# ---- determinism and state -----------------------------------------------------------------------


def play(policy, tie_map, start, stop):
    """Decisions ``start..stop-1``, each followed by learn(LOSSES[i]); returns (layer, action, map) per step."""
    out = []
    for i in range(start, stop):
        decision = policy.decide(tie_map, step=4 * i)
        tie_map = decision.tie_map
        out.append((decision.layer, decision.action, tie_map))
        policy.learn(LOSSES[i])
    return out, tie_map


def test_same_seed_same_run_and_the_global_rng_is_untouched():
    config = paper_config(epsilon_start=0.5, q_hidden=16)
    a, b = QLearningPolicy(5, config), QLearningPolicy(5, config)
    c = QLearningPolicy(5, dataclasses.replace(config, seed=1))
    rng_before = torch.get_rng_state()
    assert play(a, a.initial_tie_map(), 0, 8) == play(b, b.initial_tie_map(), 0, 8)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the model's dropout and data order are not disturbed
    assert same_weights(q_weights(a), q_weights(b))
    assert not same_weights(q_weights(QLearningPolicy(5, config)), q_weights(c))


ROUND_TRIP_CONFIGS = {
    "parity": paper_config(epsilon_start=0.5, epsilon_decay=0.7, q_hidden=16),
    "improved": paper_config(
        epsilon_start=0.5, epsilon_decay=0.7, q_hidden=16, reward="loss_improvement", replay_size=4,
        replay_batch=2, target_update=3, bootstrap="next_layer",
    ),
}


@pytest.mark.parametrize("name", ROUND_TRIP_CONFIGS)
def test_qlearning_state_round_trip_continues_bit_identically(name):
    config = ROUND_TRIP_CONFIGS[name]
    reference = QLearningPolicy(5, config)
    expected, _ = play(reference, reference.initial_tie_map(), 0, 10)

    first = QLearningPolicy(5, config)
    got, tie_map = play(first, first.initial_tie_map(), 0, 5)
    decision = first.decide(tie_map, step=20)  # save between a decision and its reward
    got.append((decision.layer, decision.action, decision.tie_map))
    tensors, values = through_disk(*first.state_dict())

    resumed = QLearningPolicy(5, dataclasses.replace(config, seed=1234))  # the state overrides the seed
    resumed.load_state_dict(tensors, values)
    resumed.learn(LOSSES[5])
    more, _ = play(resumed, decision.tie_map, 6, 10)
    assert got + more == expected
    assert same_weights(q_weights(resumed), q_weights(reference))
    assert resumed.metrics() == reference.metrics()
    saved_after, _ = resumed.state_dict()
    reference_after, _ = reference.state_dict()
    assert same_weights(saved_after, reference_after)  # optimizer moments, generator, replay, target net too


def test_random_policy_round_trip_and_schedule():
    config = paper_config(seed=3, reward="neg_loss")
    reference = RandomPolicy(5, config)
    expected, _ = play(reference, reference.initial_tie_map(), 0, 10)
    assert [layer for layer, _, _ in expected] == [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    assert all(0 <= action <= layer for layer, action, _ in expected)

    first = RandomPolicy(5, config)
    got, tie_map = play(first, first.initial_tie_map(), 0, 5)
    resumed = RandomPolicy(5, dataclasses.replace(config, seed=99))
    resumed.load_state_dict(*through_disk(*first.state_dict()))
    more, _ = play(resumed, tie_map, 5, 10)
    assert got + more == expected
    resumed.decide(tie_map, step=0)
    assert resumed.learn(2.0) == {"reward": -2.0}  # logged, not learned


def test_loading_another_policys_state_is_refused():
    tensors, values = QLearningPolicy(5, paper_config(q_hidden=8)).state_dict()
    with pytest.raises(ValueError, match="5 layers"):
        QLearningPolicy(6, paper_config(q_hidden=8)).load_state_dict(tensors, values)
    with pytest.raises(ValueError, match="'qlearning'"):
        RandomPolicy(5, paper_config()).load_state_dict(tensors, values)
    with pytest.raises(ValueError, match="q_hidden"):
        QLearningPolicy(5, paper_config(q_hidden=16)).load_state_dict(tensors, values)
    with pytest.raises(ValueError, match="'untied'"):
        make_policy("all_shared", 5).load_state_dict(*make_policy("untied", 5).state_dict())


def test_single_layer_has_nothing_to_decide():
    for policy in (QLearningPolicy(1, paper_config(q_hidden=4)), RandomPolicy(1, paper_config())):
        assert policy.initial_tie_map() == [0]
        assert policy.decide([0], step=0) is None
        assert policy.learn(2.0) == {}


def test_initial_map_from_config():
    assert QLearningPolicy(4, paper_config(q_hidden=4)).initial_tie_map() == [0, 0, 0, 0]
    assert RandomPolicy(4, paper_config(start_map=list(range(4)))).initial_tie_map() == [0, 1, 2, 3]
    assert RandomPolicy(4, paper_config(start_map=[0, 0, 2, 1])).initial_tie_map() == [0, 0, 2, 0]  # chain resolved
    with pytest.raises(ValueError, match="length 3"):
        RandomPolicy(4, paper_config(start_map=[0, 0, 2]))
    with pytest.raises(ValueError, match="all_tied"):  # a map by name: tie_init, checked where the arguments are
        DynTieTrainingArguments(output_dir="unused", report_to=[], use_cpu=True, tie_init="tied")
