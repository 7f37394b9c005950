"""Tieable leaves: the parameter-owning modules of a block, made able to compute with another leaf's parameters.

:func:`make_tieable` puts :class:`TieableLeaf` in front of each leaf's own class (one subclass per stock class,
made on first use) and records the block's leaves; :func:`tieable_leaves` and :func:`leaf_parameters` are how
routing, storage sharing, retie, relaxed deltas and compiled blocks find them. *Which* leaf a leaf computes with
is set by ``tying.route_layers``; this module carries it out in ``forward``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TieableLeaf:
    """Mixin that lets a parameter-owning leaf of any class run another leaf's parameters.

    ``make_tieable`` puts it in front of the leaf's own class (``TieableLinear``, ``TieableLlamaRMSNorm``,
    ...: one subclass per stock class, made on first use). Its ``forward`` runs the stock forward
    unchanged; only while a tied (or captured) leaf computes, the entries of ``_parameters`` that the stock
    code reads through ``self.weight`` / ``self.bias`` are swapped for the tensors it is routed to, and put
    back right after. Outside ``forward`` the leaf is its stock self: ``leaf.weight`` is its own parameter.
    A relaxed tied leaf then adds its own ``tie_delta`` of the input to the output, and computes with its
    root's vectors plus its own ``tie_offset`` where it has one; so does a relaxed root (``tie_lora_roots``),
    on its own weights.

    The source is kept in ``__dict__`` (not as a submodule) so it never shows in ``named_modules``,
    ``state_dict`` or ``parameters``.
    """

    _stock_class: type[nn.Module]

    def routed(self, name: str) -> torch.Tensor | None:
        """The tensor to compute with: our own parameter, or the root's (detached in follow mode)."""
        source = self.__dict__.get("_tie_source")
        tensor = (self if source is None else source)._parameters[name]
        capture = self.__dict__.get("_tie_capture")
        if capture is not None and tensor is not None:
            return capture(self, name, tensor)
        if source is not None and tensor is not None and self.__dict__.get("_tie_detach", False):
            return tensor.detach()
        return tensor

    def routed_tensors(self, tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
        """``tensors`` (what this leaf is routed to) shifted by the position's own vector offsets while it is
        a relaxed tie that has them (``tie_lora_vectors``)."""
        if self.__dict__.get("_tie_relaxed", False) and "tie_offset" in self._modules:
            return self._modules["tie_offset"](tensors)
        return tensors

    def forward(self, *args, **kwargs):
        out = self._routed_forward(*args, **kwargs)
        if self.__dict__.get("_tie_relaxed", False) and "tie_delta" in self._modules:
            out = out + self._modules["tie_delta"](args[0])  # a relaxed tie: this position's own delta on top
        return out

    def _routed_forward(self, *args, **kwargs):
        state = self.__dict__
        if state.get("_tie_source") is None and state.get("_tie_capture") is None and not state.get("_tie_root_offsets"):
            return super().forward(*args, **kwargs)  # untied: the stock forward on our own parameters
        own = self._parameters
        saved = dict(own)
        offload = _offload_hook(state.get("_tie_source"))
        if offload is not None:  # accelerate's offload: the root's weights are on meta until its hook loads them
            source = state["_tie_source"]
            args, kwargs = offload.pre_forward(source, *args, **kwargs)
        try:
            own.update(self.routed_tensors({name: self.routed(name) for name in saved}))
            out = super().forward(*args, **kwargs)
        finally:
            own.update(saved)
        return out if offload is None else offload.post_forward(source, out)

    def __reduce_ex__(self, protocol):
        # the class is made at run time, so pickle (``torch.save(model)``) rebuilds it from the stock class
        return _rebuild_leaf, (self._stock_class,), self.__getstate__()


def _offload_hook(source: nn.Module | None) -> Any:
    """The root leaf's accelerate hook when it offloads its weights (``cpu_offload``, ``disk_offload``): a tied
    leaf then runs inside it, so the root's weights are loaded for this call and offloaded again after."""
    hook = None if source is None else source.__dict__.get("_hf_hook")
    return hook if getattr(hook, "offload", False) else None


_TIEABLE_CLASSES: dict[type, type] = {}


def tieable_class(stock: type[nn.Module]) -> type[nn.Module]:
    """The tieable subclass of a leaf class (made once per class)."""
    tieable = _TIEABLE_CLASSES.get(stock)
    if tieable is None:
        attributes = {"_stock_class": stock, "__module__": __name__}
        tieable = type(f"Tieable{stock.__name__}", (TieableLeaf, stock), attributes)
        _TIEABLE_CLASSES[stock] = tieable
    return tieable


def _rebuild_leaf(stock: type[nn.Module]) -> nn.Module:
    cls = tieable_class(stock)
    return cls.__new__(cls)


def parameter_leaves(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of ``layer`` that own parameters directly, in registration order."""
    return [(name, module) for name, module in layer.named_modules() if module._parameters]


def stock_leaf_name(name: str) -> str:
    """A leaf's name as the stock block has it: PEFT's ``base_layer`` path segments stripped
    (``attn.c_attn.base_layer`` -> ``attn.c_attn``), so a wrapped position pairs with an unwrapped root."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def tieable_leaves(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """The leaves tying works on, as ``(stock name, leaf)``: those :func:`make_tieable` found, kept on the
    block, so modules added later (PEFT's ``lora_A``/``lora_B``, ...) are never tied, released or copied.
    A block never made tieable falls back to its parameter-owning modules now."""
    recorded = layer.__dict__.get("_dyntie_leaves")
    if recorded is not None:
        return list(recorded)
    return [(stock_leaf_name(name), leaf) for name, leaf in parameter_leaves(layer)]


def leaf_parameters(layer: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """``(stock key, current key, parameter)`` for every parameter of the block's tieable leaves, in order.
    The current key is the parameter's name in the block today (``attn.c_attn.base_layer.weight`` once PEFT
    wrapped the leaf), the stock key the name it pairs by (``attn.c_attn.weight``)."""
    current = {id(module): name for name, module in layer.named_modules()}
    found = []
    for stock, leaf in tieable_leaves(layer):
        path = current.get(id(leaf), stock)
        for key, p in leaf._parameters.items():
            if p is not None:
                found.append((f"{stock}.{key}" if stock else key, f"{path}.{key}" if path else key, p))
    return found


def make_tieable(layer: nn.Module) -> None:
    """Upgrade the leaves of one block in place to their tieable subclasses.

    Swapping ``__class__`` keeps the very same parameter objects, names, hooks and init, and keeps the
    stock block and attention forward code around them, and the leaf's own forward too; only which
    tensors that forward reads changes. Any leaf class works: ``nn.Linear``, GPT-2's ``Conv1D``,
    ``LlamaRMSNorm``, a class of your own.
    """
    leaves = tieable_leaves(layer)
    for _, leaf in leaves:
        if not isinstance(leaf, TieableLeaf):
            leaf.__class__ = tieable_class(type(leaf))
    layer.__dict__["_dyntie_leaves"] = leaves  # what tying touches from now on, whatever is added later
