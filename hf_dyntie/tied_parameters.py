"""Which parameters the live tie map leaves where: the state-dict keys of tied positions (what a compact
checkpoint omits), the parameters that take no gradient, and the parameter counts (``tie_summary``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .deltas import relaxed_parameters
from .leaves import leaf_parameters
from .tie_map import num_unique_layers, relaxed_positions


class TiedParametersMixin:
    """Parameter names and counts of :class:`~hf_dyntie.modeling_dyntie.DynTieMixin` under its current map (mixed
    into it; reads its live ``_tie_map`` and ``dyntie_layers``)."""

    def _position_parameter_names(self, i: int) -> list[str]:
        """The keys of position ``i``'s tieable leaves (never an adapter's tensors), as named today."""
        return [f"{self._dyntie_layers_path}.{i}.{key}" for _, key, _ in leaf_parameters(self.dyntie_layers[i])]

    def tied_parameter_names(self) -> list[str]:
        """State-dict keys of tied positions: not stored in a compact checkpoint."""
        tie_map = self.__dict__.get("_tie_map")
        if tie_map is None:
            return []
        return [name for i, r in enumerate(tie_map) if r != i for name in self._position_parameter_names(i)]

    def idle_parameters(self) -> list[nn.Parameter]:
        """Parameters that take no gradient under the current map: tied positions' own leaves (they alias their
        root) and the relaxed deltas that are off (untied positions', and roots' unless tie_lora_roots). They hold no optimizer state."""
        idle = []
        active = relaxed_positions(self._tie_map, self.config.tie_lora_roots)
        for i, (layer, r) in enumerate(zip(self.dyntie_layers, self._tie_map)):
            if r != i:
                idle += [p for _, _, p in leaf_parameters(layer)]
            if i not in active:
                idle += relaxed_parameters(layer)
        return idle

    def tie_summary(self) -> dict[str, Any]:
        """Parameter counts under the current map: ``total`` as if untied, ``stored`` (unique storage,
        what a compact checkpoint holds: every relaxed delta included) and ``trainable`` (roots, everything
        outside the stack and the relaxed deltas of tied positions, counted apart as ``delta_parameters``)."""
        layers = self.dyntie_layers
        deltas = [sum(p.numel() for p in relaxed_parameters(layer)) for layer in layers]
        per_layer = [sum(p.numel() for p in layer.parameters()) - d for layer, d in zip(layers, deltas)]
        stack_ids = {id(p) for p in layers.parameters()}
        outside = sum(p.numel() for p in self.parameters() if id(p) not in stack_ids)
        roots = sum(n for i, n in enumerate(per_layer) if self._tie_map[i] == i)
        on = relaxed_positions(self._tie_map, self.config.tie_lora_roots)  # tied positions (and relaxed roots)
        active = sum(d for i, d in enumerate(deltas) if i in on)
        return {
            "tie_map": self.tie_map,
            "num_layers": len(layers),
            "unique_layers": num_unique_layers(self._tie_map),
            "total_parameters": outside + sum(per_layer) + sum(deltas),
            "stored_parameters": outside + roots + sum(deltas),
            "trainable_parameters": outside + roots + active,
            "parameters_per_layer": per_layer[0],
            "parameters_outside_layers": outside,
            "tie_lora_rank": self.config.tie_lora_rank,
            "tie_lora_roots": self.config.tie_lora_roots,
            "delta_parameters": active,
            "delta_parameters_per_layer": deltas[0],
        }
