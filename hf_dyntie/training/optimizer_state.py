"""Optimizer state that follows the weights through a retie.

An untie starts the new layer from a copy of its root's weights; if its optimizer state started empty,
AdamW's first bias-corrected steps would move every weight by about the learning rate and throw away
what the root's moments knew. So the state is carried exactly as the weights are: copied on untie,
averaged with the same weights on ``merge="average"``, dropped on release.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .accounting import torch_optimizer
from ..retie import ParameterMoves


def _copy_state(state: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of one parameter's state: tensors cloned (never aliased), plain numbers kept."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.detach().clone()
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            raise TypeError(f"optimizer state '{key}' of type {type(value).__name__} cannot be copied")
    return out


def _merged_state(parts: list[tuple[dict[str, Any], float]]) -> dict[str, Any]:
    """Weighted mean of per-parameter states of equal layout. A step counter takes the largest count
    (bias correction must not restart); other tensors of the parameter's shape are averaged."""
    total = sum(w for _, w in parts)
    first = parts[0][0]
    out = _copy_state(first)
    for key, value in first.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        values = [s.get(key) for s, _ in parts]
        if any(not isinstance(v, torch.Tensor) or v.shape != value.shape for v in values):
            raise TypeError(f"optimizer state '{key}' differs in layout between the merged layers")
        if key == "step":
            out[key] = torch.stack([v.detach() for v in values]).max().clone()
        else:
            out[key] = sum(v.detach().float() * (w / total) for v, (_, w) in zip(values, parts)).to(value.dtype)
    return out


def carry_optimizer_state(optimizer: torch.optim.Optimizer | None, moves: ParameterMoves) -> bool:
    """Make ``optimizer``'s per-parameter state follow ``moves`` (from ``model.retie``).

    Copies first (from the roots' pre-merge state), then merges, then drops released parameters' state.
    Returns False, after one warning, when some state could not be copied or merged (an optimizer keeping
    something other than tensors and numbers per parameter): those parameters start with fresh state.
    """
    if optimizer is None:
        return True
    inner = torch_optimizer(optimizer)
    state = inner.state
    ok = True
    for p, source in moves.copied:
        state.pop(p, None)
        if source in state and state[source]:
            try:
                state[p] = _copy_state(state[source])
            except TypeError as error:
                ok = False
                reason = str(error)
    for root, parts in moves.merged:
        member_states = [(state.get(p), w) for p, w in parts]
        if any(not s for s, _ in member_states):
            continue  # a member that never stepped: keep the root's own state
        try:
            state[root] = _merged_state(member_states)
        except TypeError as error:
            ok = False
            reason = str(error)
            state.pop(root, None)
    for p in moves.released:
        state.pop(p, None)
        p.grad = None
    if not ok:
        warnings.warn(
            f"{type(inner).__name__}: {reason}; the untied or merged layers start with fresh optimizer state",
            stacklevel=2,
        )
    return ok



def fill_idle_state(optimizer: torch.optim.Optimizer, idle: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Give every idle parameter (``model.idle_parameters()``: tied leaves, untied positions' deltas) zero
    optimizer state shaped like a trainable one's; returns those filled, for :func:`drop_state`.

    Why: a sharded optimizer is saved and loaded through ``torch.distributed.checkpoint``, whose load template
    gives *every* parameter state and whose load is strict, so a checkpoint must hold state for every
    parameter. Filled just for the save (and dropped right after), a tied model's checkpoint loads through
    accelerate unchanged; the zeros are never used (an untie copies its root's state, a tie drops it)."""
    inner = torch_optimizer(optimizer)
    template = next(((p, s) for p, s in inner.state.items() if s), None)
    if template is None:
        return []
    shape_of = template[0].shape
    filled = []
    for p in idle:
        if inner.state.get(p):
            continue
        inner.state[p] = {
            k: (torch.zeros_like(p) if v.shape == shape_of else torch.zeros_like(v)) if isinstance(v, torch.Tensor) else v
            for k, v in template[1].items()
        }
        filled.append(p)
    return filled


def drop_state(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """Remove the optimizer state of ``params`` (idle parameters hold none: a tied model's memory is roots-only)."""
    state = torch_optimizer(optimizer).state
    for p in params:
        state.pop(p, None)
