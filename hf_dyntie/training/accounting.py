"""Training-state accounting from live tensors: what parameters, gradients and optimizer state occupy.

Counting is by unique storage, so a tied position (whose parameters are views of its root's storage)
costs nothing, exactly as in memory. A sharded (FSDP2) tensor counts its local shard: what this rank holds.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..sharding import local


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def unique_storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (``None`` and empty tensors cost nothing)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is None or t.numel() == 0 or t.device.type == "meta":
            continue
        t = local(t)
        seen.setdefault(_storage_key(t), t.untyped_storage().nbytes())
    return sum(seen.values())


def torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer behind accelerate's ``AcceleratedOptimizer`` wrapper (or ``optimizer`` itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    inner = torch_optimizer(optimizer)
    return [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state, each by unique storage, and their total."""
    params = list(model.parameters())
    out = {
        "parameters": unique_storage_bytes(params),
        "gradients": unique_storage_bytes(p.grad for p in params),
        "optimizer": unique_storage_bytes(optimizer_state_tensors(optimizer)) if optimizer is not None else 0,
    }
    out["total"] = sum(out.values())
    return out
