"""Per-position routing of a layer stack, and tie/untie on live weights.

Every position ``i`` of the stack keeps its own block object (its attention module keeps ``layer_idx =
i``, so KV-cache slots, hidden-state indices and ``scale_attn_by_inverse_layer_idx`` follow the
position) and its own parameters (so the set and order of parameters the optimizer and DDP see never
change). What tying changes is *which weights the leaves compute with*: every parameter-owning leaf of
a tied position is routed to the same leaf of its root.

- ``tie_mode="share"``: the leaf computes with the root's parameters, gradients accumulate into the root.
- ``tie_mode="follow"``: the leaf computes with the root's parameters detached (the paper code's
  behaviour): the root learns only from its own position and tied positions skip weight-gradient work.

While a position is tied its own parameters keep their shape but point at the root's storage, so they
cost no memory; they are unused in forward, so their ``grad`` stays ``None`` and AdamW skips them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .tie_map import diff_tie_maps

TIE_MODES = ("share", "follow")


class TieableLeaf:
    """Mixin for a parameter-owning leaf that may run another leaf's parameters.

    The source is kept in ``__dict__`` (not as a submodule) so it never shows in ``named_modules``,
    ``state_dict`` or ``parameters``.
    """

    def routed(self, name: str) -> torch.Tensor | None:
        """The tensor to compute with: our own parameter, or the root's (detached in follow mode)."""
        source = self.__dict__.get("_tie_source")
        if source is None:
            return getattr(self, name)
        tensor = getattr(source, name)
        if tensor is not None and self.__dict__.get("_tie_detach", False):
            return tensor.detach()
        return tensor


class TieableLinear(TieableLeaf, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.routed("weight"), self.routed("bias"))


class TieableLayerNorm(TieableLeaf, nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.routed("weight"), self.routed("bias"), self.eps)


class TieableConv1D(TieableLeaf, Conv1D):
    """GPT-2's transposed linear layer (``y = x @ W + b`` with ``W`` of shape ``(in, out)``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.routed("bias"), x.view(-1, x.size(-1)), self.routed("weight"))
        return x.view(size_out)


_TIEABLE_CLASSES: dict[type, type] = {
    nn.Linear: TieableLinear,
    nn.LayerNorm: TieableLayerNorm,
    Conv1D: TieableConv1D,
}


def parameter_leaves(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of ``layer`` that own parameters directly, in registration order."""
    return [(name, module) for name, module in layer.named_modules() if module._parameters]


def make_tieable(layer: nn.Module) -> None:
    """Upgrade the leaves of one block in place to their tieable subclasses.

    Swapping ``__class__`` keeps the very same parameter objects, names, hooks and init, and keeps the
    stock block and attention forward code around them; only the leaf's forward learns to route.
    """
    for name, leaf in parameter_leaves(layer):
        if isinstance(leaf, TieableLeaf):
            continue
        tieable = _TIEABLE_CLASSES.get(type(leaf))
        if tieable is None:
            raise TypeError(f"cannot tie {type(leaf).__name__} at '{name}': no tieable version of this leaf type")
        leaf.__class__ = tieable


def route_layers(layers: nn.ModuleList, tie_map: Sequence[int], tie_mode: str) -> None:
    """Point every leaf of every position at the leaf it computes with (itself when untied)."""
    if tie_mode not in TIE_MODES:
        raise ValueError(f"tie_mode must be one of {TIE_MODES}, got {tie_mode!r}")
    for i, r in enumerate(tie_map):
        sources = dict(parameter_leaves(layers[r]))
        for name, leaf in parameter_leaves(layers[i]):
            leaf.__dict__["_tie_source"] = None if r == i else sources[name]
            leaf.__dict__["_tie_detach"] = tie_mode == "follow"


def _paired_parameters(layers: nn.ModuleList, i: int, r: int) -> list[tuple[nn.Parameter, nn.Parameter]]:
    own, root = list(layers[i].named_parameters()), list(layers[r].named_parameters())
    if [n for n, _ in own] != [n for n, _ in root]:
        raise ValueError(f"layers {i} and {r} have different parameters and cannot be tied")
    return [(p, q) for (_, p), (_, q) in zip(own, root)]


def share_storage(layers: nn.ModuleList, tie_map: Sequence[int]) -> None:
    """Make each tied position's own parameters views of its root's storage (zero extra bytes).

    A parameter still on the meta device (``from_pretrained`` leaves a compact checkpoint's tied keys
    there) cannot take real storage through ``.data``; it is replaced by a new ``Parameter`` on the root's
    storage. That happens only while loading, before any optimizer holds the old object.
    """
    for i, r in enumerate(tie_map):
        if r == i:
            continue
        sources = dict(parameter_leaves(layers[r]))
        for name, leaf in parameter_leaves(layers[i]):
            for key, p in leaf._parameters.items():
                q = sources[name]._parameters[key]
                if p is None or q is None:
                    continue
                if p.is_meta and not q.is_meta:
                    leaf._parameters[key] = nn.Parameter(q.data, requires_grad=p.requires_grad)
                else:
                    p.data = q.data
                    p.grad = None


def release_storage(layers: nn.ModuleList, tie_map: Sequence[int]) -> None:
    """Detach tied positions' parameters from any storage (used around ``Module._apply``)."""
    for i, r in enumerate(tie_map):
        if r != i:
            for p in layers[i].parameters():
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
                p.grad = None


@torch.no_grad()
def retie_layers(layers: nn.ModuleList, old: Sequence[int], new: Sequence[int], tie_mode: str) -> list[nn.Parameter]:
    """Move a live stack from ``old`` to ``new`` (both in root form); return the parameters whose
    optimizer state is now invalid (newly tied: released; newly untied: must start fresh).

    Untied positions first take a copy of their former root's current weights, before any root is
    released in the same step, so a layer that unties and a root that ties at once stay correct.
    """
    changes = diff_tie_maps(old, new)
    for i in changes.untied:
        for p, q in _paired_parameters(layers, i, old[i]):
            p.data = q.data.clone()
            p.grad = None
    share_storage(layers, new)
    route_layers(layers, new, tie_mode)
    return [p for i in (*changes.tied, *changes.untied) for p in layers[i].parameters()]
