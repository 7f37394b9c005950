"""Tying policies other than the sweep (those: test_qlearning.py): static patterns, replay, the factory, and each
policy option declared once."""

from __future__ import annotations

import json

import pytest

from helpers import paper_config
from hf_dyntie.training.policies import POLICIES, PolicyConfig, QLearningPolicy, ReplayPolicy, make_policy
from hf_dyntie.training.training_args import DynTieTrainingArguments
from hf_dyntie.training.policies.replay import permute_groups
from hf_dyntie.tie_map import normalize_tie_map, num_unique_layers, positions_per_root


# ---- static maps ---------------------------------------------------------------------------------


STATIC_EXPECTED = {
    (6, 3): {"sequence": [0, 0, 2, 2, 4, 4], "cycle": [0, 1, 2, 0, 1, 2], "cycle_rev": [0, 1, 2, 2, 1, 0]},
    (6, 2): {"sequence": [0, 0, 0, 3, 3, 3], "cycle": [0, 1, 0, 1, 0, 1], "cycle_rev": [0, 1, 0, 1, 1, 0]},
    (7, 3): {"sequence": [0, 0, 0, 3, 3, 5, 5], "cycle": [0, 1, 2, 0, 1, 2, 0], "cycle_rev": [0, 1, 2, 0, 1, 2, 2]},
    (9, 3): {"cycle_rev": [0, 1, 2, 0, 1, 2, 2, 1, 0]},
    (12, 4): {
        "sequence": [0, 0, 0, 3, 3, 3, 6, 6, 6, 9, 9, 9],
        "cycle": [0, 1, 2, 3] * 3,
        "cycle_rev": [0, 1, 2, 3, 0, 1, 2, 3, 3, 2, 1, 0],
    },
    (12, 6): {"cycle_rev": [0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0]},
    (48, 6): {
        "sequence": [8 * (i // 8) for i in range(48)],
        "cycle": [i % 6 for i in range(48)],
        "cycle_rev": [i % 6 for i in range(42)] + [5, 4, 3, 2, 1, 0],
    },
    (48, 48): {"sequence": list(range(48)), "cycle": list(range(48)), "cycle_rev": list(range(48))},
}


@pytest.mark.parametrize("num_layers, unique", STATIC_EXPECTED)
def test_static_patterns_give_the_documented_maps(num_layers, unique):
    for name, expected in STATIC_EXPECTED[num_layers, unique].items():
        policy = make_policy(name, num_layers, paper_config(unique_layers=unique))
        assert policy.initial_tie_map() == expected, name


@pytest.mark.parametrize("num_layers", [6, 12, 48])
def test_static_patterns_are_valid_for_every_unique_count(num_layers):
    assert make_policy("untied", num_layers).initial_tie_map() == list(range(num_layers))
    assert make_policy("all_tied", num_layers).initial_tie_map() == [0] * num_layers
    for name in ("sequence", "cycle", "cycle_rev"):
        for unique in range(1, num_layers + 1):
            policy = make_policy(name, num_layers, paper_config(unique_layers=unique))
            tie_map = policy.initial_tie_map()
            assert normalize_tie_map(tie_map, num_layers) == tie_map, (name, unique)
            assert num_unique_layers(tie_map) == unique, (name, unique)
            assert not policy.dynamic and policy.decide(tie_map, step=4) is None


@pytest.mark.parametrize("unique", [None, 0, 7])
def test_static_patterns_need_a_sensible_unique_count(unique):
    with pytest.raises(ValueError, match="unique_layers"):
        make_policy("cycle", 6, paper_config(unique_layers=unique))


# ---- replay --------------------------------------------------------------------------------------


RECORDS = [
    {"step": 0, "tie_map": [0, 0, 0, 0, 0, 0], "layer": None, "action": None, "reward": None},
    {"step": 8, "tie_map": [0, 1, 1, 0, 4, 4], "layer": 4, "action": 4, "reward": -10.0},
    {"step": 16, "tie_map": [0, 1, 2, 0, 2, 5], "layer": 5, "action": 5, "reward": -9.0},
]


def groups(tie_map: list[int]) -> set[frozenset[int]]:
    return {frozenset(p) for p in positions_per_root(tie_map).values()}


def write_history(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_replay_follows_the_recorded_steps(tmp_path):
    policy = make_policy("replay", 6, paper_config(replay_file=write_history(tmp_path / "h.jsonl", RECORDS)))
    tie_map = policy.initial_tie_map()
    assert tie_map == RECORDS[0]["tie_map"]
    assert policy.decide(tie_map, step=4) is None  # still the step-0 map
    decision = policy.decide(tie_map, step=8)
    assert (decision.tie_map, decision.layer, decision.action) == ([0, 1, 1, 0, 4, 4], 4, 4)
    assert policy.decide(decision.tie_map, step=12) is None
    assert policy.decide(decision.tie_map, step=100).tie_map == [0, 1, 2, 0, 2, 5]

    later = make_policy("replay", 6, paper_config(replay_file=write_history(tmp_path / "l.jsonl", RECORDS[1:])))
    assert later.initial_tie_map() == [0] * 6  # no step-0 record: the start map (all tied)
    assert later.decide([0] * 6, step=3) is None


def test_replay_with_permuted_positions_keeps_the_groups(tmp_path):
    records = RECORDS + [{"step": 24, "tie_map": [0, 1, 1, 3, 3, 1]}]
    config = paper_config(replay_file=write_history(tmp_path / "h.jsonl", records), replay_permute_seed=7)
    policy = make_policy("replay", 6, config)
    perm = policy.permutation
    assert perm[0] == 0 and sorted(perm) == list(range(6)) and perm != list(range(6))
    assert make_policy("replay", 6, config).permutation == perm  # fixed by the seed
    for record in records:
        permuted = policy.decide([0] * 6, step=record["step"])
        permuted = permuted.tie_map if permuted else [0] * 6
        assert normalize_tie_map(permuted) == permuted
        assert num_unique_layers(permuted) == num_unique_layers(record["tie_map"])
        assert groups(permuted) == {frozenset(perm[i] for i in g) for g in groups(record["tie_map"])}
    # by hand: positions 1 and 2 share; moved to 3 and 1 they share at root 1, and lone 3 moves to 2
    assert permute_groups([0, 1, 1], [0, 2, 1]) == [0, 1, 1]
    assert permute_groups([0, 1, 1, 3], [0, 3, 1, 2]) == [0, 1, 2, 1]


def test_replay_rejects_bad_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        make_policy("replay", 6, paper_config(replay_file=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ValueError, match="no records"):
        make_policy("replay", 6, paper_config(replay_file=write_history(tmp_path / "empty.jsonl", [])))
    with pytest.raises(ValueError, match="length 6 but the model has 4"):
        make_policy("replay", 4, paper_config(replay_file=write_history(tmp_path / "h.jsonl", RECORDS)))


# ---- factory -------------------------------------------------------------------------------------


def test_make_policy_knows_every_name_the_arguments_accept():
    from hf_dyntie.training.training_args import POLICY_NAMES

    assert set(POLICIES) == set(POLICY_NAMES)
    assert isinstance(make_policy("qlearning", 4, paper_config(q_hidden=4)), QLearningPolicy)
    with pytest.raises(ValueError, match="qlearning.*cycle_rev"):
        make_policy("bandit", 4, paper_config())
    assert ReplayPolicy.name == "replay"


def test_the_policy_owns_its_epsilon_schedule():
    """epsilon_decay=None: the policy scales it to the run once begin_run tells it the length; nothing else
    writes it (the config keeps None), and deciding before that is refused."""
    from hf_dyntie.training.policies.base import scaled_epsilon_decay

    config = paper_config(epsilon_decay=None, interval=4, q_hidden=8)
    policy = QLearningPolicy(6, config)
    with pytest.raises(RuntimeError, match="begin_run"):
        policy.decide(policy.initial_tie_map(), 0)
    policy.begin_run(1000)
    assert policy.epsilon_decay == scaled_epsilon_decay(1.0, 0.01, 1000, 4, 6)
    for step in range(0, 40, 4):
        policy.decide(policy.initial_tie_map(), step)
    assert policy.epsilon == pytest.approx(policy.epsilon_decay ** 2)  # two full sweeps of 5 layers
    assert config.epsilon_decay is None


def test_all_shared_is_a_deprecated_name_of_all_tied():
    """One vocabulary for named maps ("untied", "all_tied"); "all_shared" stays readable where it was stored
    (checkpoints' dyntie_state.json, result files), with a FutureWarning where a user passes it."""
    from hf_dyntie.training.policies import AllTiedPolicy
    from hf_dyntie.training.training_args import DynTieTrainingArguments

    with pytest.warns(FutureWarning, match="'all_tied'"):
        policy = make_policy("all_shared", 4)
    assert isinstance(policy, AllTiedPolicy) and policy.name == "all_tied" and policy.initial_tie_map() == [0] * 4
    policy.load_state_dict({}, {"name": "all_shared", "num_layers": 4})  # a state saved under the old name
    with pytest.warns(FutureWarning):
        args = DynTieTrainingArguments(output_dir="unused", tie_policy="all_shared", report_to=[])
    assert args.tie_policy == "all_tied"


def test_each_policy_option_is_declared_once_with_one_default():
    """The trainer's tie_<option> fields carry PolicyConfig's default and help, and default arguments give the
    policy PolicyConfig() gives (only the interval is resolved: each policy's own)."""
    from hf_dyntie.training.policies.options import policy_options

    args = DynTieTrainingArguments(output_dir="unused", report_to=[], use_cpu=True, seed=0)
    fields = DynTieTrainingArguments.__dataclass_fields__
    config, defaults = args.policy_config(), PolicyConfig()
    for option in policy_options():
        assert fields[f"tie_{option.name}"].default == option.default, option.name
        assert fields[f"tie_{option.name}"].metadata["help"] == option.metadata["help"], option.name
        if option.name != "interval":
            assert getattr(config, option.name) == getattr(defaults, option.name), option.name
    assert defaults.interval is None and config.interval == POLICIES[args.tie_policy].default_interval == 1
    with pytest.raises(ValueError, match="tie_epsilon_min must lie in"):  # one check, named as the user spelled it
        DynTieTrainingArguments(output_dir="unused", report_to=[], use_cpu=True, tie_epsilon_min=1.5)
    with pytest.raises(ValueError, match="^epsilon_min must lie in"):
        make_policy("qlearning", 4, PolicyConfig(epsilon_min=1.5))
