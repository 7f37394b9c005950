"""Layer tying under FSDP2 (``fully_shard``): each tied position runs inside its root's sharded call.

FSDP2 as accelerate applies it shards every block of the stack on its own (``fully_shard`` on each
``_no_split_modules`` block, then on the model). A block's parameters are whole only inside that block's own
call, between the all-gather of its pre-forward hook and the reshard of its post-forward hook; outside, they
are ``DTensor`` shards. A tied position computes with its root's weights, so it must run while the *root's*
block is unsharded, and its gradient must reach the root's reduce-scatter. Two things make that so:

- **Calls.** A tied block's call is redirected through its root block's call (:class:`RootCall`, installed as
  the tied block's ``_compiled_call_impl``): the root's FSDP hooks all-gather the root's weights, the *tied*
  block's own forward code runs (its ``layer_idx``, its KV-cache slot, its attention settings), and the root's
  hooks reshard and register the backward all-gather and reduce-scatter. FSDP2 allows a unit to be called
  several times per forward, each call its own all-gather and reduce-scatter, the gradients summed into the
  root's shard. The tied block's own hooks never fire, so its own (unused) parameters are never gathered.
- **Storage.** A tied position's own parameters are kept as *views of its root's local shard*
  (:func:`alias_shard`), exactly as they are views of the root's storage on one device: they cost no bytes,
  get no gradient and no optimizer state. Every position's parameter has the same shape and placement, so
  an untie copies the root's local shard (:func:`copy_shard`), a merge averages local shards, and neither
  gathers anything.

A relaxed tie's delta and offset (``deltas.TieDelta``, ``deltas.TieOffset``) belong to the tied position, not to
its root, so each must be an FSDP unit of its own (DynTie models list both in ``_no_split_modules``, which
accelerate's wrap reads;
``model.shard()`` does the same). Nothing here imports the rest of hf_dyntie: it works on modules and
parameters. See docs/design.md, "Sharded training".
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

FSDP_MODULE_PATH = "torch.distributed.fsdp"
WRAP_HINT = ("wrap every block of the layer stack as one fully_shard unit (what accelerate's FSDP2 does; "
             "model.shard() does the same)")


def _fsdp_module_class() -> type | None:
    """``FSDPModule`` if torch's FSDP was imported (nothing can be sharded otherwise), else ``None``."""
    fsdp = sys.modules.get(FSDP_MODULE_PATH)
    return getattr(fsdp, "FSDPModule", None) if fsdp is not None else None


def is_fsdp_module(module: nn.Module) -> bool:
    cls = _fsdp_module_class()
    return cls is not None and isinstance(module, cls)


def is_sharded(layers: nn.ModuleList) -> bool:
    """Whether any block of the stack is an FSDP2 unit (``fully_shard`` was applied to it)."""
    cls = _fsdp_module_class()
    return cls is not None and any(isinstance(block, cls) for block in layers)


def is_dtensor(tensor: torch.Tensor | None) -> bool:
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def _param_groups(module: nn.Module) -> list[Any]:
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)  # torch >= 2.10; one group per state before
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [group] if group is not None else []
    return list(groups)


def shard_index(root: nn.Module) -> dict[int, Any]:
    """``id(sharded parameter) -> FSDPParam`` for every FSDP2 unit in ``root``'s tree (empty when unsharded)."""
    cls = _fsdp_module_class()
    if cls is None:
        return {}
    index: dict[int, Any] = {}
    for module in root.modules():
        if isinstance(module, cls):
            for group in _param_groups(module):
                for fsdp_param in group.fsdp_params:
                    index[id(fsdp_param.sharded_param)] = fsdp_param
    return index


# ---- the storage of one parameter, whole or sharded -------------------------------------------------------


def local(p: torch.Tensor) -> torch.Tensor:
    """The tensor that holds this process's values of ``p``: its local shard when sharded, else its data."""
    return p._local_tensor if is_dtensor(p) else p.data


def full(p: torch.Tensor) -> torch.Tensor:
    """All of ``p``'s values (an all-gather when sharded: every rank must call it, in the same order)."""
    return p.full_tensor().detach() if is_dtensor(p) else p.detach()


def local_part(p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """The part of ``whole`` (a tensor of ``p``'s global shape) that this process holds of ``p``."""
    if not is_dtensor(p):
        return whole
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(whole.shape, p.device_mesh, p.placements)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return whole[index]


def alias_shard(p: nn.Parameter, q: nn.Parameter, shards: dict[int, Any]) -> None:
    """Make ``p``'s storage a view of ``q``'s (its local shard when sharded): zero extra bytes."""
    if not is_dtensor(p):
        p.data = q.data
    else:
        mine, theirs = _fsdp_param(p, shards), _fsdp_param(q, shards)
        mine._sharded_param_data = theirs._sharded_param_data  # what FSDP all-gathers from
        p._local_tensor = q._local_tensor  # what the optimizer, state_dict and full_tensor() read
    p.grad = None


def copy_shard(p: nn.Parameter, q: nn.Parameter, shards: dict[int, Any]) -> None:
    """Give ``p`` storage of its own holding a copy of ``q``'s values (an untie: each rank copies its shard)."""
    if not is_dtensor(p):
        p.data = q.data.clone()
    else:
        mine, theirs = _fsdp_param(p, shards), _fsdp_param(q, shards)
        padded = theirs._sharded_param_data.clone()
        dim = theirs.fsdp_placement.dim
        mine._sharded_param_data = padded
        p._local_tensor = padded.view(theirs.padded_sharded_param_size).narrow(dim, 0, q._local_tensor.size(dim))
    p.grad = None


def _fsdp_param(p: nn.Parameter, shards: dict[int, Any]) -> Any:
    found = shards.get(id(p))
    if found is None:
        raise RuntimeError(f"a sharded parameter of shape {tuple(p.shape)} is not managed by any FSDP2 unit of the "
                           f"model; {WRAP_HINT}")
    return found


# ---- calls: a tied block runs inside its root block's FSDP call -----------------------------------------


class RootCall:
    """A tied block's call under FSDP2: the tied block's own ``forward`` run *as a call of its root block*,
    so the root's FSDP hooks gather the root's weights around it (and gather again and reduce-scatter in
    backward). Installed as the tied block's ``_compiled_call_impl`` (what ``block(...)`` calls before its
    own hooks), so the tied block's own hooks never fire and its unused parameters are never gathered."""

    def __init__(self, block: nn.Module, root: nn.Module) -> None:
        self.block, self.root = block, root

    def __call__(self, *args, **kwargs):
        root = self.root
        root.__dict__["forward"] = self.block.forward  # the tied position's code, the root's hooks
        try:
            return root._call_impl(*args, **kwargs)
        finally:
            del root.__dict__["forward"]


def route_calls(layers: nn.ModuleList, tie_map: Sequence[int]) -> None:
    """Redirect the call of every tied block whose root is an FSDP2 unit through the root's call; untied
    blocks (and tied ones whose root is gathered by an enclosing unit) call themselves."""
    for i, (block, r) in enumerate(zip(layers, tie_map)):
        if r != i and is_fsdp_module(layers[r]):
            block._compiled_call_impl = RootCall(block, layers[r])
        elif isinstance(block.__dict__.get("_compiled_call_impl"), RootCall):
            del block.__dict__["_compiled_call_impl"]


def check_wrap(layers: nn.ModuleList, delta_class: type[nn.Module] | tuple[type[nn.Module], ...]) -> None:
    """Refuse, in one line, an FSDP2 wrap that tying cannot run under: units inside a block (other than
    the relaxed deltas, which must be units of their own), or deltas left inside their block's unit."""
    for i, block in enumerate(layers):
        if not is_fsdp_module(block):
            if any(is_dtensor(p) for p in block.parameters(recurse=False)):
                raise ValueError(f"layer {i} is sharded but not an FSDP2 unit of its own; {WRAP_HINT}")
            continue
        for name, module in block.named_modules():
            if module is block:
                continue
            if isinstance(module, delta_class) != is_fsdp_module(module):
                what = "a relaxed delta is not" if isinstance(module, delta_class) else f"'{name}' is"
                raise ValueError(f"layer {i}: {what} a fully_shard unit of its own; tied layers need the relaxed "
                                 f"deltas (TieDelta, TieOffset) wrapped apart and nothing else inside a block: {WRAP_HINT}")


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model, gathered to the CPU (a collective: every rank must call it).
    Saved with ``save_pretrained(..., state_dict=...)`` it gives the compact file of a single process: tied
    positions' keys are left out by ``_keys_to_ignore_on_save`` as always."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def shard_model(model: nn.Module, layers: nn.ModuleList, delta_class: type[nn.Module] | tuple[type[nn.Module], ...],
                **fully_shard_kwargs: Any) -> nn.Module:
    """Shard a model with FSDP2 the way tying runs best: every relaxed delta (``delta_class``) and every block of
    ``layers`` as a unit of its own (children first), then the model, which keeps the embeddings and the head.
    ``fully_shard_kwargs`` go to every ``fully_shard`` call (``mesh``, ``reshard_after_forward``, ``mp_policy``,
    ``offload_policy``). accelerate's FSDP2 wrap gives the same units (it wraps ``_no_split_modules``)."""
    from torch.distributed.fsdp import fully_shard

    for block in layers:
        for module in block.modules():
            if isinstance(module, delta_class):
                fully_shard(module, **fully_shard_kwargs)
        fully_shard(block, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model
