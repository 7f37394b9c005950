"""The TieMap rules (DESIGN.md section 1): validation, root form, the paper's transition, accounting."""

from __future__ import annotations

import pytest

from hf_dyntie.tie_map import (
    apply_actions,
    diff_tie_maps,
    followed_roots,
    format_tie_map,
    normalize_tie_map,
    num_unique_layers,
    positions_per_root,
    relaxed_positions,
    relaxed_positions_across,
    root_layers,
    tied_fraction,
    trainable_parameters,
)


# ---- rejections: each a ValueError naming the position and the value ------------------------------


@pytest.mark.parametrize(
    ("tie_map", "num_layers", "expected"),
    [
        ([0, 0, 1], 4, ["length 3", "4 layers"]),
        ([0, 0, 3, 0], None, ["tie_map[2]", "3"]),  # r > i
        ([0, -1, 0], None, ["tie_map[1]", "-1"]),
        ([0, 0, 1.5], None, ["tie_map[2]", "1.5"]),
        ([0, "0", 1], None, ["tie_map[1]", "'0'"]),
        ([0, True, 1], None, ["tie_map[1]", "True"]),
        ([1, 1, 2], None, ["tie_map[0]", "1"]),
    ],
    ids=["wrong-length", "points-forward", "negative", "float", "string", "bool", "first-not-zero"],
)
def test_rejections_name_position_and_value(tie_map, num_layers, expected):
    with pytest.raises(ValueError) as info:
        normalize_tie_map(tie_map, num_layers)
    for fragment in expected:
        assert fragment in str(info.value)


@pytest.mark.parametrize("bad", ["0,0,1", 3, {0: 0}, []], ids=["str", "int", "dict", "empty"])
def test_rejects_values_that_are_not_lists(bad):
    with pytest.raises(ValueError):
        normalize_tie_map(bad)


def test_none_means_untied():
    assert normalize_tie_map(None, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        normalize_tie_map(None)


# ---- root form ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chain", "roots"),
    [
        ([0, 0, 1], [0, 0, 0]),
        ([0, 1, 1, 2, 3], [0, 1, 1, 1, 1]),
        ([0, 0, 2, 2, 3, 5], [0, 0, 2, 2, 2, 5]),
        ([0, 1, 2, 3], [0, 1, 2, 3]),
    ],
)
def test_chains_normalise_to_roots(chain, roots):
    result = normalize_tie_map(chain)
    assert result == roots
    assert all(result[r] == r for r in result)  # every pointer lands on a root
    assert normalize_tie_map(result) == result  # idempotent


def test_integer_like_values_are_accepted():
    import numpy as np

    assert normalize_tie_map([np.int64(0), np.int32(0), 2]) == [0, 0, 2]


# ---- the paper's transition -----------------------------------------------------------------------


def paper_transition(actions: list[int]) -> list[int]:
    """Reference: s'_i = i if a_i == i else s'_{a_i}, in increasing i (a full action vector)."""
    new: list[int] = []
    for i, a in enumerate(actions):
        new.append(i if a == i else new[a])
    return new


@pytest.mark.parametrize(
    "actions",
    [[0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5], [0, 0, 2, 0, 2, 5], [0, 1, 1, 3, 1, 4], [0, 0, 0, 0, 0, 0]],
)
def test_apply_actions_is_the_paper_transition(actions):
    start = [0, 1, 2, 3, 4, 5]
    result = apply_actions(start, dict(enumerate(actions)))
    assert result == paper_transition(actions)


def test_apply_actions_single_layer_decisions():
    # the per-layer sweep: one action at a time, the others keep their pointer (a_j = s_j)
    state = [0, 0, 0, 0]
    state = apply_actions(state, {2: 2})  # layer 2 trains on its own
    assert state == [0, 0, 2, 0]
    state = apply_actions(state, {3: 2})  # layer 3 copies layer 2
    assert state == [0, 0, 2, 2]
    state = apply_actions(state, {2: 1})  # layer 2 ties to 1 (whose root is 0): 3 follows to the new root
    assert state == [0, 0, 0, 0]
    assert apply_actions(state, {}) == state  # no action, no change


@pytest.mark.parametrize(("actions", "fragment"), [({2: 3}, "a_2 = 3"), ({1: -1}, "a_1 = -1"), ({4: 0}, "position 4")])
def test_apply_actions_rejects_out_of_range(actions, fragment):
    with pytest.raises(ValueError, match=fragment):
        apply_actions([0, 1, 2, 3], actions)


# ---- accounting -----------------------------------------------------------------------------------


def test_accounting():
    tie_map = [0, 0, 2, 0, 2, 5]
    assert root_layers(tie_map) == [0, 2, 5]
    assert num_unique_layers(tie_map) == 3
    assert tied_fraction(tie_map) == pytest.approx(0.5)
    assert positions_per_root(tie_map) == {0: [0, 1, 3], 2: [2, 4], 5: [5]}
    assert trainable_parameters(tie_map, params_per_layer=100, params_outside_layers=7) == 307
    assert trainable_parameters(list(range(6)), params_per_layer=100) == 600
    assert format_tie_map(tie_map) == "[0 0 2 0 2 5]  (3 unique of 6)"


def test_diff_classifies_tied_untied_rerouted():
    changes = diff_tie_maps([0, 1, 1, 3, 3], [0, 0, 0, 3, 4])
    assert changes.tied == (1,)
    assert changes.untied == (4,)
    assert changes.rerouted == (2,)
    assert changes.any
    assert not diff_tie_maps([0, 0], [0, 0]).any


def test_maps_per_step_holds_each_map_until_the_next_record():
    from hf_dyntie.tie_map import maps_per_step

    records = [{"step": 0, "tie_map": [0, 0]}, {"step": 2, "tie_map": [0, 1]}, {"step": 3, "tie_map": [0, 0]}]
    assert maps_per_step(records, 5) == [[0, 0], [0, 0], [0, 1], [0, 0], [0, 0]]
    assert maps_per_step(records[1:], 4) == [[0, 1], [0, 1], [0, 1], [0, 0]]


def test_relaxed_positions_are_the_tied_ones_and_optionally_their_roots():
    tie_map = [0, 0, 2, 3, 3, 3]  # root 2 is alone: it shares nothing, so it never carries a delta
    assert followed_roots(tie_map) == {0, 3}
    assert relaxed_positions(tie_map) == {1, 4, 5}
    assert relaxed_positions(tie_map, roots=True) == {0, 1, 3, 4, 5}
    assert relaxed_positions(list(range(6)), roots=True) == set()


def test_relaxed_positions_across_a_retie():
    # 1 unties (keeps its delta to fold), 3 newly ties (starts at zero), 5 stays tied (keeps its delta)
    old, new = [0, 0, 2, 3, 4, 4], [0, 1, 2, 2, 4, 4]
    assert relaxed_positions_across(old, new) == {1, 5}
