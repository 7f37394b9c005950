"""The generic leaf routing (``hf_dyntie/leaves.py``): a parameter-owning leaf class nobody declared routes to its
root's parameters, and tieable leaves copy and pickle."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from helpers import max_diff
from hf_dyntie.leaves import TieableLeaf, make_tieable, parameter_leaves
from hf_dyntie.tying import route_layers, share_storage


class ScaledTanh(nn.Module):
    """A leaf class no table or mapping knows: it owns a parameter and reads it in its own forward."""

    def __init__(self, width: int):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(width))

    def forward(self, x):
        return torch.tanh(x) * self.gain


def small_stack() -> nn.ModuleList:
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), ScaledTanh(4)) for _ in range(3))
    for layer in layers:
        make_tieable(layer)
    return layers


def run_stack(layers, x):
    for layer in layers:
        x = layer(x)
    return x


@pytest.mark.parametrize("tie_mode", ["share", "follow"])
def test_an_unseen_leaf_class_routes_to_its_root(tie_mode):
    layers = small_stack()
    leaf = layers[2][1]
    assert isinstance(leaf, ScaledTanh) and isinstance(leaf, TieableLeaf) and type(leaf).__name__ == "TieableScaledTanh"
    reference = copy.deepcopy(layers)  # untied copy with layer 2 holding layer 0's weights
    reference[2].load_state_dict(layers[0].state_dict())
    route_layers(reference, [0, 1, 2], tie_mode)

    tie_map = [0, 1, 0]
    share_storage(layers, tie_map)
    route_layers(layers, tie_map, tie_mode)
    own = leaf.gain
    x = torch.randn(2, 4)
    out = run_stack(layers, x)
    assert max_diff(out, run_stack(reference, x)) <= 1e-6
    assert leaf.gain is own and leaf._parameters["gain"] is own  # outside forward a leaf is its stock self
    out.sum().backward()
    assert layers[2][1].gain.grad is None  # tied: the position's own parameter gets nothing
    run_stack(reference, x).sum().backward()
    expected = reference[0][1].gain.grad + (reference[2][1].gain.grad if tie_mode == "share" else 0)
    assert max_diff(layers[0][1].gain.grad, expected) <= 1e-6


def test_tieable_leaves_copy_and_pickle():
    layers = small_stack()
    route_layers(layers, [0, 0, 2], "share")
    for clone in (copy.deepcopy(layers), pickle.loads(pickle.dumps(layers))):
        assert [type(m).__name__ for _, m in parameter_leaves(clone[1])] == ["TieableLinear", "TieableScaledTanh"]
        x = torch.randn(2, 4)
        assert max_diff(run_stack(clone, x), run_stack(layers, x)) == 0.0
