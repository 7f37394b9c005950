"""PEFT adapters on a DynTie model: merging is refused while the model has ties (docs/design.md, "Adapters").

A tied position computes with its root's storage, so PEFT's ``merge`` would write every position's delta into
the shared weights. PEFT gives the base model no say before it merges; the model puts a :class:`_MergeGuard` in
front of each adapter layer's ``merge`` instead, when PEFT hands it its ``peft_config`` and again after ``.to()``
and ``retie``.
"""

from __future__ import annotations

from torch import nn

from .tie_map import EXPAND_HINT


class _MergeGuard:
    """Stands in for ``merge`` on a PEFT adapter layer of a DynTie model: refuses while the model has ties
    (see :meth:`AdapterGuardMixin._refuse_merge_into_ties`), else runs the layer's own ``merge``. A plain object,
    so the model still pickles and deep-copies."""

    def __init__(self, model: nn.Module, layer: nn.Module) -> None:
        self.model, self.layer = model, layer

    def __call__(self, *args, **kwargs):
        self.model._refuse_merge_into_ties()
        return type(self.layer).merge(self.layer, *args, **kwargs)


class AdapterGuardMixin:
    """The adapter guards of :class:`~hf_dyntie.modeling_dyntie.DynTieMixin` (mixed into it; reads its live
    ``_tie_map`` and ``dyntie_layers``)."""

    def _adapter_layers(self) -> list[nn.Module]:
        """PEFT's adapter layers anywhere in the model (each wraps a stock module as ``base_layer``)."""
        return [m for m in self.modules() if isinstance(m.__dict__.get("_modules", {}).get("base_layer"), nn.Module)]

    def _guard_adapter_merges(self) -> None:
        """Put a :class:`_MergeGuard` in front of every adapter layer's ``merge`` (``merge_and_unload``,
        ``merge_adapter``): merging is refused while the model has ties, before any weight changes."""
        for layer in self._adapter_layers():
            if callable(getattr(type(layer), "merge", None)) and not isinstance(layer.__dict__.get("merge"), _MergeGuard):
                layer.__dict__["merge"] = _MergeGuard(self, layer)

    def _refuse_merge_into_ties(self) -> None:
        """A tied position computes with its root's storage: merging a delta there would write it into
        every position of the group (or, with ``safe_merge``, drop it). Refuse while any position is tied
        and the layer stack carries adapters."""
        tied = [i for i, r in enumerate(self._tie_map) if r != i]
        stack = {id(m) for m in self.dyntie_layers.modules()}
        if tied and any(id(m) in stack for m in self._adapter_layers()):
            raise ValueError(
                f"Cannot merge adapters into a tied DynTie model (tie_map {self._tie_map}): tied positions share "
                f"their root's weights, so a merge would change the function. Save the adapter, untie with "
                f"{EXPAND_HINT}, load the adapter on the expanded model and merge there."
            )

    # PEFT copies its config onto the model once the adapters are in place: the moment to guard them.
    @property
    def peft_config(self):
        try:
            return self.__dict__["_dyntie_peft_config"]
        except KeyError:
            raise AttributeError("peft_config") from None

    @peft_config.setter
    def peft_config(self, value) -> None:
        self.__dict__["_dyntie_peft_config"] = value
        if "_tie_map" in self.__dict__:
            self._guard_adapter_merges()

    @peft_config.deleter
    def peft_config(self) -> None:
        self.__dict__.pop("_dyntie_peft_config", None)
