"""Relaxed ties: a tied position's own low-rank delta over its root's weights (docs/design.md, "Relaxed ties").

:func:`relax_layer` gives every linear tieable leaf a :class:`TieDelta` child (``tie_delta``) and, with
``vectors=True`` (``tie_lora_vectors``), every leaf with vector parameters (norm weights, biases) a
:class:`TieOffset` child (``tie_offset``): the position's own full offset of each, since a vector is not
low-rank. Neither is ever tied itself; ``tying.route_layers`` switches them on while their position is tied.
A new tie starts them at zero (``retie.retie_layers``) or at what the position gives up (:func:`init_deltas_from`,
for ``tie_trained(delta_init="svd")``: the truncated SVD of the weight residual, the exact vector residual);
an untie folds them into the position's copied weights (:func:`fold_deltas`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from .leaves import tieable_leaves
from .sharding import full, local, local_part


class TieDelta(nn.Module):
    """A position's own rank-``r`` correction to the linear map it is tied to: ``x -> (x A^T) B^T``.

    A relaxed tie (the idea of Relaxed Recursive Transformers and Zamba2's per-position LoRA): a tied
    position still computes with its root's weights, plus this delta, which is its own and trains with it.
    ``up`` (B) is set to zero when a position ties, so a newly tied position starts at exactly its root's
    function. The delta is off while its position is untied (no gradient, no optimizer state): an untie
    folds it into the weights the position copies from its root, then zeroes ``up``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, transposed: bool,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.up = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.transposed = transposed  # the leaf stores its weight as (in, out), GPT-2's Conv1D
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # LoRA's start: A random, B zero
        nn.init.zeros_(self.up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up)

    def weight_delta(self) -> torch.Tensor:
        """The delta in the leaf's own weight layout (what folding adds to ``leaf.weight``), whole: under
        FSDP2 the two rank-``r`` factors are gathered (every rank must call it)."""
        delta = full(self.up) @ full(self.down)
        return delta.t() if self.transposed else delta

    def extra_repr(self) -> str:
        return f"rank={self.down.shape[0]}"


class TieOffset(nn.Module):
    """A tied position's own offset of each vector parameter of a leaf (a norm's weight and bias, a linear
    map's bias): the leaf computes with ``root's vector + offset``. Vectors cost ``d`` numbers each, so the
    offset is full, not low-rank; with it and a full-rank :class:`TieDelta` a tied position can compute
    exactly what its own untied weights did. Starts at zero (the root's function), off while untied.

    Called with the routed tensors (``forward``), so FSDP2 gathers its parameters like any unit's."""

    def __init__(self, vectors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, vector in vectors.items():
            self.register_parameter(name, nn.Parameter(torch.zeros_like(vector, memory_format=torch.contiguous_format)))

    def reset_parameters(self) -> None:
        for p in self.parameters(recurse=False):
            nn.init.zeros_(p)

    def forward(self, tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
        """The routed tensors with this position's offsets added to its vectors."""
        offsets = self._parameters
        return {name: t + offsets[name] if t is not None and name in offsets else t for name, t in tensors.items()}


DELTA_CLASSES = (TieDelta, TieOffset)  # a relaxed tie's own modules: each an FSDP2 unit of its own (sharding.py)


def vector_parameters(leaf: nn.Module) -> dict[str, torch.Tensor]:
    """A leaf's own 1-D parameters (norm weights and biases, linear biases): what a :class:`TieOffset` offsets."""
    return {name: p for name, p in leaf._parameters.items() if p is not None and p.dim() == 1}


def linear_layout(leaf: nn.Module) -> tuple[int, int, bool] | None:
    """``(in, out, transposed)`` of a leaf that computes an affine map of its input (``nn.Linear``, GPT-2's
    ``Conv1D``, which stores its weight transposed); ``None`` for anything else (norms get no delta)."""
    if isinstance(leaf, nn.Linear):
        return leaf.in_features, leaf.out_features, False
    if isinstance(leaf, Conv1D):
        n_in, n_out = leaf.weight.shape
        return n_in, n_out, True
    return None


def relax_layer(layer: nn.Module, rank: int, vectors: bool = False) -> None:
    """Give every linear tieable leaf of a block a :class:`TieDelta` of ``rank`` (a child named
    ``tie_delta``: its own parameters, saved with the block, never tied, released or copied) and, with
    ``vectors``, every leaf with vector parameters a :class:`TieOffset` (``tie_offset``)."""
    for _, leaf in tieable_leaves(layer):
        layout = linear_layout(leaf)
        if layout is not None and "tie_delta" not in leaf._modules:
            n_in, n_out, transposed = layout
            weight = leaf.weight
            delta = TieDelta(n_in, n_out, rank, transposed, device=weight.device, dtype=weight.dtype)
            leaf.add_module("tie_delta", delta)
        own_vectors = vector_parameters(leaf)
        if vectors and own_vectors and "tie_offset" not in leaf._modules:
            leaf.add_module("tie_offset", TieOffset(own_vectors))


def tie_deltas(layer: nn.Module) -> list[tuple[str, nn.Module, TieDelta]]:
    """``(stock leaf name, leaf, delta)`` for every tieable leaf of the block that carries a delta."""
    return [(name, leaf, leaf._modules["tie_delta"]) for name, leaf in tieable_leaves(layer) if "tie_delta" in leaf._modules]


def tie_offsets(layer: nn.Module) -> list[tuple[str, nn.Module, TieOffset]]:
    """``(stock leaf name, leaf, offset)`` for every tieable leaf of the block that carries vector offsets."""
    return [(name, leaf, leaf._modules["tie_offset"]) for name, leaf in tieable_leaves(layer) if "tie_offset" in leaf._modules]


def relaxed_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """Every parameter of the block's relaxed ties (deltas and offsets): trained only while the position is tied."""
    parts = [d for _, _, d in tie_deltas(layer)] + [o for _, _, o in tie_offsets(layer)]
    return [p for part in parts for p in part.parameters()]


def fold_deltas(layer: nn.Module) -> list[nn.Parameter]:
    """Add each delta and offset of a block into its leaf's own weights and zero it (an untie keeps the
    function); returns their parameters, whose optimizer state is void from now on. Under FSDP2 each rank adds
    the part of the (rank-``r``, cheap to gather) delta that matches its own shard of the weight; an offset is
    sharded as its vector is, so the local shards add."""
    folded = []
    for _, leaf, delta in tie_deltas(layer):
        weight = leaf.weight
        local(weight).add_(local_part(weight, delta.weight_delta()).to(weight.dtype))
        local(delta.up).zero_()
        folded += [delta.down, delta.up]
    for _, leaf, offset in tie_offsets(layer):
        for name, p in offset.named_parameters(recurse=False):
            own = leaf._parameters[name]
            local(own).add_(local(p).to(own.dtype))
            local(p).zero_()
            folded.append(p)
    return folded


def reset_relaxed(layer: nn.Module) -> list[nn.Parameter]:
    """Zero a newly tied block's deltas (their ``up`` factor, so ``down`` keeps a random start) and offsets: the
    position starts at exactly its root's function. Returns every relaxed parameter, whose optimizer state
    starts fresh."""
    for _, _, delta in tie_deltas(layer):
        local(delta.up).zero_()
    for _, _, offset in tie_offsets(layer):
        for p in offset.parameters():
            local(p).zero_()
    return relaxed_parameters(layer)


def relaxed_targets(layer: nn.Module) -> dict[str, torch.Tensor]:
    """What :func:`init_deltas_from` fits a position's deltas and offsets to, copied: each delta-carrying
    leaf's weight as the affine map it computes, ``(out, in)`` (GPT-2's ``Conv1D`` stores the transpose), keyed
    by leaf, and each offset leaf's vectors, keyed ``leaf/param``."""
    out = {}
    for name, leaf, delta in tie_deltas(layer):
        weight = full(leaf.weight).float()
        out[name] = (weight.t() if delta.transposed else weight).clone()
    for name, leaf, offset in tie_offsets(layer):
        for key, _ in offset.named_parameters(recurse=False):
            out[f"{name}/{key}"] = full(leaf._parameters[key]).float().clone()
    return out


@torch.no_grad()
def computed_targets(layer: nn.Module, root: nn.Module) -> dict[str, torch.Tensor]:
    """What a position computes now, in :func:`relaxed_targets`' keys and layout: its root's weights (its own
    when untied) plus its own deltas and offsets where they are on (a tied position, a relaxed root). What a
    position that changes root, or whose root's weights a merge replaces, is refitted to (its function, not
    its stale weights)."""
    out = relaxed_targets(root)
    for name, leaf, delta in tie_deltas(layer):
        if leaf.__dict__.get("_tie_relaxed"):
            out[name] += full(delta.up).float() @ full(delta.down).float()  # (out, in), as relaxed_targets
    for name, leaf, offset in tie_offsets(layer):
        if leaf.__dict__.get("_tie_relaxed"):
            for key, p in offset.named_parameters(recurse=False):
                out[f"{name}/{key}"] += full(p).float()
    return out


@torch.no_grad()
def init_deltas_from(layer: nn.Module, root: nn.Module, own: dict[str, torch.Tensor]) -> None:
    """Start a tied position's deltas at the rank-``r`` truncated SVD of (its own weights ``own``, from
    :func:`relaxed_targets` before it was tied) - (the root's weights now), the best rank-``r`` approximation
    (Eckart-Young): with ``r`` at full rank the position's linear maps are exactly its own again. The two
    factors share the singular values' square roots. Vectors are not low-rank: an offset (``tie_lora_vectors``)
    starts at the exact residual, so with offsets and full rank the position computes its own function again;
    without them norms and biases stay the root's."""
    roots = relaxed_targets(root)
    for name, leaf, offset in tie_offsets(layer):
        for key, p in offset.named_parameters(recurse=False):
            residual = own[f"{name}/{key}"] - roots[f"{name}/{key}"]
            local(p).copy_(local_part(p, residual).to(p.dtype))
    for name, leaf, delta in tie_deltas(layer):
        residual = own[name] - roots[name]
        u, sv, vh = torch.linalg.svd(residual, full_matrices=False)
        rank = delta.down.shape[0]
        scale = sv[:rank].sqrt()
        up = torch.zeros(delta.up.shape, dtype=torch.float32, device=residual.device)  # where the SVD ran
        down = torch.zeros(delta.down.shape, dtype=torch.float32, device=residual.device)
        k = min(rank, sv.shape[0])
        up[:, :k] = u[:, :k] * scale[:k]
        down[:k] = scale[:k, None] * vh[:k]
        local(delta.up).copy_(local_part(delta.up, up).to(delta.up.dtype))
        local(delta.down).copy_(local_part(delta.down, down).to(delta.down.dtype))
