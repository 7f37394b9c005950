"""Compiled blocks: ``torch.compile`` of one block with the tie routing outside the compiled region.

One compiled graph then serves every tie map (docs/design.md, "Compiled layers"); ``model.compile_layers``
installs a :class:`CompiledBlock` on every block of the stack, :func:`block_kinds` counts the graphs a stack needs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .leaves import tieable_leaves


# what a stock block's forward calls its KV cache, across families and transformers versions
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


def cache_argument(block: nn.Module) -> tuple[str, int | None] | None:
    """``(name, positional index)`` of the KV-cache argument of the block's forward (index ``None`` when it is
    keyword-only), or ``None`` when it takes no cache."""
    parameters = list(inspect.signature(type(block).forward).parameters.values())[1:]  # without self
    for index, parameter in enumerate(parameters):
        if parameter.name in CACHE_ARGUMENTS:
            positional = parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
            return parameter.name, index if positional else None
    return None


class CompiledBlock:
    """A block's compiled call with the tie routing done *outside* the compiled region.

    Installed as the block's ``_compiled_call_impl`` (what ``nn.Module.compile`` sets), so ``block(...)``
    lands here. Before the compiled call it puts into every tied leaf's ``_parameters`` the tensors that
    leaf is routed to (the root's parameter, detached in follow mode) and marks the leaf untied; the
    compiled graph then reads them as ordinary graph inputs, checked by shape, dtype and ``requires_grad``
    only. So one graph serves every tie map: dynamo never sees which root a position runs, only whether
    its weights need a gradient (two graphs in follow mode: tied blocks take detached weights, and their
    backward skips the weight-gradient work). An untied block (the identity map) costs one dictionary
    look-up per leaf.

    Two kinds of call run the block eagerly, with the leaves routing themselves as without compile:
    scoring's captured views (``capture_routed``), and a call carrying a KV cache outside training (cached
    generation: the cache slot is per position, so a compiled graph would be specialised per position). In
    training with gradients the cache is dropped, as transformers does under gradient checkpointing: no
    training step reads it.
    """

    def __init__(self, block: nn.Module, compiled: Callable[..., Any]) -> None:
        self.block = block
        self.compiled = compiled
        self.cache = cache_argument(block)

    def __call__(self, *args, **kwargs):
        block = self.block
        leaves = tieable_leaves(block)
        if any(leaf.__dict__.get("_tie_capture") is not None for _, leaf in leaves):
            return block._call_impl(*args, **kwargs)
        args, kwargs, eager = self._without_training_cache(args, kwargs)
        if eager:
            return block._call_impl(*args, **kwargs)
        swapped = [_route_outside(leaf) for _, leaf in leaves
                   if leaf.__dict__.get("_tie_source") is not None or leaf.__dict__.get("_tie_root_offsets")]
        try:
            return self.compiled(*args, **kwargs)
        finally:
            for leaf, own, source, root_offsets in swapped:
                leaf._parameters.update(own)
                leaf.__dict__["_tie_source"] = source
                leaf.__dict__["_tie_root_offsets"] = root_offsets

    def _without_training_cache(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, bool]:
        """The call's arguments with a KV cache dropped in training, and whether the call must run eagerly
        (a cache outside training)."""
        if self.cache is None:
            return args, kwargs, False
        name, index = self.cache
        in_args = index is not None and index < len(args)
        value = args[index] if in_args else kwargs.get(name)
        if value is None:
            return args, kwargs, False
        if not (self.block.training and torch.is_grad_enabled()):
            return args, kwargs, True
        if in_args:
            args = args[:index] + (None,) + args[index + 1:]
        else:
            kwargs = {**kwargs, name: None}
        return args, kwargs, False


def _route_outside(leaf: nn.Module) -> tuple[nn.Module, dict[str, Any], nn.Module | None, bool]:
    """Put the routed tensors into a tied leaf's (or a relaxed root's) ``_parameters`` and mark it plain for
    the compiled call; returns what to restore. Without gradients the root's parameter itself is routed even
    in follow mode (detaching changes nothing there), so every no-grad call (evaluation, scoring) shares one
    graph."""
    own = dict(leaf._parameters)
    source = leaf.__dict__["_tie_source"]
    root_offsets = leaf.__dict__.get("_tie_root_offsets", False)
    grad = torch.is_grad_enabled()
    routed = {name: leaf.routed(name) if grad or source is None else source._parameters[name] for name in own}
    leaf._parameters.update(leaf.routed_tensors(routed))  # a relaxed tie's vector offsets, outside the graph too
    leaf.__dict__["_tie_source"] = None
    leaf.__dict__["_tie_root_offsets"] = False
    return leaf, own, source, root_offsets


def compile_block(block: nn.Module, **compile_kwargs: Any) -> None:
    """``torch.compile`` one block with the routing outside the graph (see :class:`CompiledBlock`). Every
    block of a stack shares the compiled code of its class (dynamo caches per code object and checks the
    module's attributes, not its identity), so the whole stack compiles once per graph kind."""
    uncompile_block(block)
    block._compiled_call_impl = CompiledBlock(block, torch.compile(block._call_impl, **compile_kwargs))


def uncompile_block(block: nn.Module) -> None:
    """Back to the eager call (a no-op for a block that is not compiled)."""
    block.__dict__.pop("_compiled_call_impl", None)


def is_compiled_block(block: nn.Module) -> bool:
    return isinstance(block.__dict__.get("_compiled_call_impl"), CompiledBlock)


def block_kinds(layers: nn.ModuleList) -> int:
    """How many differently configured blocks the stack holds, as a compiled graph sees them: blocks whose
    modules differ in a plain setting (GPT-2's ``scaling`` under ``scale_attn_by_inverse_layer_idx``,
    Qwen2's per-layer ``sliding_window``) get a graph each. ``layer_idx`` does not count: only the KV cache
    reads it, and compiled blocks run without one."""
    return len({_block_settings(block) for block in layers})


def _block_settings(block: nn.Module) -> tuple:
    settings = []
    for name, module in block.named_modules():
        for key, value in sorted(vars(module).items()):
            if key.startswith("_") or key in ("training", "layer_idx"):
                continue
            if isinstance(value, (bool, int, float, str)) or value is None:
                settings.append((name, key, value))
    return tuple(settings)
