"""Structure changes that keep what was learned: the unique-layer budget, unties that carry weights and
optimizer state, tie merges, and the monotone ``grow`` policy."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import TrainerCallback

from hf_dyntie.training.optimizer_state import carry_optimizer_state
from hf_dyntie.training.policies import make_policy
from hf_dyntie.training.policies.static import cycle_map, sequence_map
from hf_dyntie.tie_map import diff_tie_maps, num_unique_layers, positions_per_root
from hf_dyntie.training.trainer import DynTieTrainer

from helpers import build, byte_blocks, gpt2_config, input_ids, make_args, max_diff, paper_config, tiny_model
from hf_dyntie import DynTieGPT2LMHeadModel


class RandomScorer:
    """A stand-in scorer with random scores: exercises every candidate kind a scored policy may pick."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def loss_deltas(self, candidates):
        return [self.rng.uniform(-0.05, 0.05) for _ in candidates]

    def untie_gains(self, splits):
        return [self.rng.uniform(-0.05, 0.01) for _ in splits]


# ---- budget ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qlearning", "random", "greedy", "grow"])
@pytest.mark.parametrize("budget", [1, 3])
def test_no_dynamic_policy_ever_exceeds_the_budget(name, budget):
    config = paper_config(seed=1, budget=budget, q_hidden=8, reward="neg_loss",
                          epsilon_decay=0.99, score_margin=0.0, grow_order="scored" if name == "grow" else "sequence")
    policy = make_policy(name, 8, config)
    policy.begin_run(400)
    tie_map, rng, seen = policy.initial_tie_map(), random.Random(0), set()
    scorer = RandomScorer(2)
    for step in range(400):
        decision = policy.decide(tie_map, step, scorer)
        policy.learn(rng.uniform(1.0, 5.0))
        if decision is not None:
            tie_map = decision.tie_map
        assert num_unique_layers(tie_map) <= budget, (name, step, tie_map)
        seen.add(tuple(tie_map))
    if budget > 1 and name != "grow":
        assert len(seen) > 3, f"{name} explored only {seen}"  # the budget masks, it does not freeze the policy


def test_qlearning_greedy_choice_is_masked_not_clipped():
    """The agent's argmax skips actions over budget (it never proposes them); without a budget it is unchanged."""
    policy = make_policy("qlearning", 4, paper_config(start_map=[0, 1, 2, 2], budget=3, epsilon_start=0.0, epsilon_min=0.0))
    policy.decisions = 2  # the next decision acts on layer 3
    with torch.no_grad():
        policy.q_net[2].bias.zero_()
        policy.q_net[2].weight.zero_()
        policy.q_net[2].bias[6 + 3] = 5.0  # "untie layer 3" would make 4 unique layers
        policy.q_net[2].bias[6 + 1] = 1.0  # second best: run layer 1
    assert policy.decide([0, 1, 2, 2], 0).tie_map == [0, 1, 2, 1]
    free = make_policy("qlearning", 4, paper_config(start_map=[0, 1, 2, 2], epsilon_start=0.0, epsilon_min=0.0))
    free.decisions = 2
    free.q_net.load_state_dict(policy.q_net.state_dict())
    assert free.decide([0, 1, 2, 2], 0).tie_map == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(tie_budget=0), "tie_budget must be >= 1"),
        (dict(tie_budget=7), "tie_budget must lie in 1..6"),
        (dict(tie_budget=2, tie_init="untied"), "6 unique layers, more than tie_budget=2"),
        (dict(tie_budget=2, tie_policy="sequence", tie_unique_layers=3), "3 unique layers, more than tie_budget=2"),
        (dict(tie_merge="sum"), "tie_merge must be one of"),
        (dict(tie_policy="grow", tie_grow_order="random"), "tie_grow_order must be one of"),
        (dict(tie_policy="grow", tie_grow_until=0.0), "tie_grow_until must lie in"),
        (dict(tie_policy="greedy"), "pass an eval_dataset"),
    ],
)
def test_bad_structure_settings_fail_in_one_line_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        DynTieTrainer(model=tiny_model(), args=make_args(tmp_path, **overrides), train_dataset=byte_blocks())
    assert "\n" not in str(error.value)


# ---- untie carries weights and optimizer state ---------------------------------------------------------


def _states_equal_not_aliased(state_a: dict, state_b: dict) -> None:
    assert set(state_a) == set(state_b) and state_a
    for key in state_a:
        a, b = state_a[key], state_b[key]
        assert torch.equal(a, b), key
        assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr(), f"{key} is aliased"


def test_untie_copies_weights_and_adam_state_so_function_and_next_update_match():
    model = build(DynTieGPT2LMHeadModel, gpt2_config([0, 0, 2, 3, 4, 5])).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = input_ids()
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    with torch.no_grad():
        before = model(ids).logits
    report = model.retie([0, 1, 2, 3, 4, 5])
    carry_optimizer_state(optimizer, report.moves)
    with torch.no_grad():
        assert max_diff(model(ids).logits, before) == 0.0  # the function does not change
    layers = model.dyntie_layers
    pairs = list(zip(layers[1].parameters(), layers[0].parameters()))
    for p, q in pairs:
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
        _states_equal_not_aliased(optimizer.state[p], optimizer.state[q])
    # the same gradient now moves the copy exactly as it moves the root: the state is the root's, not fresh
    optimizer.zero_grad(set_to_none=True)
    for p, q in pairs:
        g = torch.randn_like(q)
        p.grad, q.grad = g.clone(), g.clone()
    optimizer.step()
    for p, q in pairs:
        assert torch.equal(p, q)


class UntieWatcher(TrainerCallback):
    """Right before the optimizer step that follows an untie, the untied position's weights and AdamW state
    must equal its former root's, as copies."""

    def __init__(self):
        self.trainer, self.last_map, self.checked = None, None, 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.last_map = self.trainer.dyntie_model.tie_map  # before this step's decision

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        model = self.trainer.dyntie_model
        inner = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)
        changes = diff_tie_maps(self.last_map, model.tie_map)
        for i in changes.untied:
            root = self.last_map[i]
            for p, q in zip(model.dyntie_layers[i].parameters(), model.dyntie_layers[root].parameters()):
                assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
                _states_equal_not_aliased(inner.state[p], inner.state[q])
                self.checked += 1


@pytest.mark.parametrize("accumulation", [1, 2])
def test_grow_untie_carries_state_through_the_trainer(tmp_path, accumulation):
    watcher = UntieWatcher()
    args = make_args(tmp_path, tie_policy="grow", tie_budget=4, tie_interval=1, max_steps=12, tie_grow_until=0.75,
                     gradient_accumulation_steps=accumulation, per_device_train_batch_size=4 // accumulation)
    trainer = DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks(), callbacks=[watcher])
    watcher.trainer = trainer
    trainer.train()
    assert watcher.checked == 3 * 12  # three unties, 12 parameters per GPT-2 block
    maps = [r["tie_map"] for r in trainer.history.records]
    assert maps == [[0, 0, 0, 3, 3, 3], [0, 0, 0, 3, 3, 5], [0, 1, 1, 3, 3, 5]] or maps[-1] == sequence_map(6, 4)
    assert [r["step"] for r in trainer.history.records] == [3, 6, 9]  # evenly spaced, the last at 0.75 * 12


def test_grow_resume_is_exact_and_keeps_the_carried_state(tmp_path):
    def run(resume=None):
        watcher = UntieWatcher()
        args = make_args(tmp_path / "run", tie_policy="grow", tie_budget=3, tie_interval=1, max_steps=12,
                         save_strategy="steps", save_steps=4, logging_steps=1, tie_grow_until=0.8)
        trainer = DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks(), callbacks=[watcher])
        watcher.trainer = trainer
        trainer.train(resume_from_checkpoint=resume)
        return trainer, watcher

    full, _ = run()
    resumed, watcher = run(str(tmp_path / "run" / "checkpoint-8"))  # between the unties at steps 5 and 10
    assert [r["step"] for r in full.history.records] == [5, 10]
    assert watcher.checked == 12  # the untie after the resume carried the state the checkpoint restored
    assert full.history.records == resumed.history.records and full.dyntie_model.tie_map == resumed.dyntie_model.tie_map
    a, b = full.dyntie_model.state_dict(), resumed.dyntie_model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- merges --------------------------------------------------------------------------------------------


def test_average_merge_keeps_parameters_and_routes_the_group_to_one_root():
    model = build(DynTieGPT2LMHeadModel, gpt2_config([0, 1, 1, 3, 3, 3])).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = input_ids()
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    layers = model.dyntie_layers
    ids_before = [id(p) for p in model.parameters()]
    old = {i: [p.detach().clone() for p in layers[i].parameters()] for i in (1, 3)}
    old_state = {i: [{k: v.clone() for k, v in optimizer.state[p].items()} for p in layers[i].parameters()] for i in (1, 3)}
    report = model.retie([0, 1, 1, 1, 1, 1], merge="average")  # root 3 (3 positions) merges into root 1 (2)
    carry_optimizer_state(optimizer, report.moves)
    assert model.tie_map == [0, 1, 1, 1, 1, 1] and [id(p) for p in model.parameters()] == ids_before
    assert positions_per_root(model.tie_map) == {0: [0], 1: [1, 2, 3, 4, 5]}
    for k, p in enumerate(layers[1].parameters()):
        torch.testing.assert_close(p.detach(), (2 * old[1][k] + 3 * old[3][k]) / 5, rtol=0, atol=1e-6)
        merged = optimizer.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            expected = (2 * old_state[1][k][key] + 3 * old_state[3][k][key]) / 5
            torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-10)
    for i in (2, 3, 4, 5):
        for p, q in zip(layers[i].parameters(), layers[1].parameters()):
            assert p.data_ptr() == q.data_ptr() and not optimizer.state.get(p)


def test_discard_merge_keeps_the_surviving_root_and_reroutes_dependents():
    model = build(DynTieGPT2LMHeadModel, gpt2_config([0, 1, 1, 3, 3, 3]))
    keep = [p.detach().clone() for p in model.dyntie_layers[1].parameters()]
    model.retie([0, 1, 1, 1, 1, 1])
    assert all(torch.equal(p, k) for p, k in zip(model.dyntie_layers[1].parameters(), keep))


# ---- grow ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order, target", [("sequence", sequence_map(8, 4)), ("spread", cycle_map(8, 4))])
def test_grow_never_reties_and_reaches_the_budget_in_time(order, target):
    policy = make_policy("grow", 8, paper_config(budget=4, grow_order=order, grow_until=0.5))
    policy.begin_run(1000)
    tie_map, reached = policy.initial_tie_map(), None
    assert tie_map == [0] * 8
    for step in range(1000):
        decision = policy.decide(tie_map, step)
        if decision is None:
            continue
        changes = diff_tie_maps(tie_map, decision.tie_map)
        assert not changes.tied, "grow re-tied a root"
        assert len(changes.untied) == 1 and num_unique_layers(decision.tie_map) == num_unique_layers(tie_map) + 1
        for p in changes.rerouted:  # movers follow the new root, which is a copy of the weights they ran
            assert tie_map[p] == tie_map[changes.untied[0]]
        tie_map = decision.tie_map
        if num_unique_layers(tie_map) == 4 and reached is None:
            reached = step
    assert tie_map == target and reached == 500


def test_grow_without_budget_grows_to_untied():
    policy = make_policy("grow", 6, paper_config(grow_until=0.9))
    policy.begin_run(60)
    tie_map = policy.initial_tie_map()
    for step in range(60):
        decision = policy.decide(tie_map, step)
        tie_map = decision.tie_map if decision else tie_map
    assert tie_map == list(range(6))


def test_accounting_and_compact_checkpoint_stay_exact_after_grow_and_merge(tmp_path):
    """After grow's unties and an average merge, the training state is the roots-only figure and the
    compact checkpoint holds the roots only and reloads to the same logits."""
    from hf_dyntie.training.accounting import training_state_bytes

    args = make_args(tmp_path, tie_policy="grow", tie_budget=4, tie_interval=1, max_steps=10, tie_grow_until=0.6,
                     tie_merge="average")
    trainer = DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks())
    trainer.train()
    model = trainer.dyntie_model
    report = model.retie([r if r != 3 else 1 for r in model.tie_map], merge="average")  # a merge on top
    carry_optimizer_state(trainer.optimizer, report.moves)
    ids = input_ids(length=8)
    model.train()
    model(ids, labels=ids).loss.backward()
    state = training_state_bytes(model, trainer.optimizer)
    summary = model.tie_summary()
    stepped = sum(1 for st in getattr(trainer.optimizer, "optimizer", trainer.optimizer).state.values() if st)
    roots_only = 4 * 4 * summary["trainable_parameters"]  # weight + grad + exp_avg + exp_avg_sq, fp32
    assert roots_only <= state["total"] <= roots_only + 4 * stepped  # + AdamW's 4-byte step per parameter
    model.save_pretrained(tmp_path / "saved")
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "saved" / "model.safetensors").keys()
    assert not any(name in keys for name in model.tied_parameter_names())
    reloaded = DynTieGPT2LMHeadModel.from_pretrained(tmp_path / "saved").eval()
    model.eval()
    with torch.no_grad():
        assert max_diff(reloaded(ids).logits, model(ids).logits) == 0.0
    assert reloaded.tie_map == model.tie_map
