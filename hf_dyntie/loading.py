"""Saving and loading a compact checkpoint: the keys it stores and may lack, and the checks that refuse
weights that do not fit the tie map (``from_pretrained``, ``load_state_dict``) before anything is dropped or
initialised at random.
"""

from __future__ import annotations

import re

import torch
from transformers import PretrainedConfig

from .leaves import leaf_parameters
from .placement import resolve_device_map
from .tie_map import normalize_tie_map

# from_pretrained's arguments that reach the config file too (a device_map is checked against its tie map)
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "trust_remote_code")


class LoadingMixin:
    """The checkpoint side of :class:`~hf_dyntie.modeling_dyntie.DynTieMixin` (mixed into it; reads its live
    ``_tie_map`` and ``dyntie_layers`` and the names in tied_parameters.py, and calls its ``_apply_ties``)."""

    # transformers reads these two instance attributes when saving and loading; they follow the live map.
    @property
    def _keys_to_ignore_on_save(self) -> set[str]:
        return set(self.__dict__.get("_dyntie_ignore_on_save", ())) | set(self.tied_parameter_names())

    @_keys_to_ignore_on_save.setter
    def _keys_to_ignore_on_save(self, value) -> None:
        self.__dict__["_dyntie_ignore_on_save"] = set(value or ())

    @property
    def _keys_to_ignore_on_load_missing(self) -> set[str]:
        tied = {rf"^{re.escape(name)}$" for name in self.tied_parameter_names()}
        return set(self.__dict__.get("_dyntie_ignore_on_load_missing", ())) | tied

    @_keys_to_ignore_on_load_missing.setter
    def _keys_to_ignore_on_load_missing(self, value) -> None:
        self.__dict__["_dyntie_ignore_on_load_missing"] = set(value or ())

    # ---- loading, moving, saving ----------------------------------------------------------------

    def tie_weights(self, missing_keys: set[str] | None = None, recompute_mapping: bool = True) -> None:
        """Stock embedding tying, then the layer ties. ``from_pretrained`` calls this after the weights
        are loaded, with the keys the checkpoint lacked: that is where a compact checkpoint's sharing is
        rebuilt, and where a checkpoint that does not fit the tie map is refused."""
        super().tie_weights(missing_keys=missing_keys, recompute_mapping=recompute_mapping)
        if "_tie_map" not in self.__dict__:
            return  # called from post_init, before the stack is tieable
        if missing_keys is not None:
            self._check_checkpoint_fits_tie_map(missing_keys)
        self._apply_ties()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Stock ``from_pretrained``, with a ``device_map`` checked against the tie map first (placement.py):
        one that would split or offload a tie group is refused in one line before anything loads."""
        if kwargs.get("device_map") is not None:
            config = kwargs.get("config")
            if not isinstance(config, PretrainedConfig):
                hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
                config = cls.config_class.from_pretrained(config or pretrained_model_name_or_path, **hub)
            tie_map = normalize_tie_map(config.tie_map, config.num_hidden_layers)
            offload = any(kwargs.get(k) for k in ("max_memory", "offload_folder"))
            kwargs["device_map"] = resolve_device_map(kwargs["device_map"], cls._dyntie_layers_path, tie_map, offload)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _move_missing_keys_from_meta_to_device(self, missing_keys, *args, **kwargs):
        """``from_pretrained`` materialises (and then randomly initialises) every key the checkpoint lacks.
        A compact checkpoint lacks the tied positions by design: leave them on meta, ``tie_weights`` points
        them at their roots' storage right after. Halves the load time of a mostly tied model."""
        tied = set(self.tied_parameter_names())
        return super()._move_missing_keys_from_meta_to_device(
            {key for key in missing_keys if key not in tied}, *args, **kwargs
        )

    @staticmethod
    def _load_pretrained_model(model, *args, **kwargs):
        """``from_pretrained``'s loading step, then the tie-map check at once: a checkpoint that does not fit
        config.json's tie map is refused here, before transformers initialises the missing weights and prints
        its load report (``tie_weights`` checks again for every other way in)."""
        loaded = super(LoadingMixin, type(model))._load_pretrained_model(model, *args, **kwargs)
        missing = getattr(loaded[0], "missing_keys", None)
        if missing is not None and "_tie_map" in model.__dict__:
            model._check_checkpoint_fits_tie_map(set(missing))
        return loaded

    def _check_checkpoint_fits_tie_map(self, missing_keys: set[str]) -> None:
        lacking = [
            name for i, r in enumerate(self._tie_map) if r == i for name in self._position_parameter_names(i)
            if name in missing_keys
        ]
        embedding = self.get_input_embeddings()
        own_names = {id(p): n for n, p in self.named_parameters()}
        no_embedding = [own_names[id(p)] for p in (embedding.parameters() if embedding is not None else ())
                        if own_names.get(id(p)) in missing_keys]
        if no_embedding and len(missing_keys) < len(own_names):  # a partial file, not an empty one
            raise ValueError(
                f"The checkpoint lacks the token embedding ({', '.join(no_embedding)}). Refusing to initialise it "
                f"randomly; the checkpoint is incomplete."
            )
        if lacking:
            raise ValueError(
                f"The checkpoint lacks weights of layers that train on their own under tie_map "
                f"{self._tie_map}: {lacking}. Refusing to initialise them randomly; check that config.json's "
                f"tie_map matches the weights file."
            )
        loaded = {k: v for k, v in self.state_dict(keep_vars=True).items() if k not in missing_keys}
        self._refuse_own_weights_at_tied_positions(loaded)

    def _refuse_own_weights_at_tied_positions(self, values: dict[str, torch.Tensor]) -> None:
        """Raise if ``values`` (full key -> tensor) holds weights for a tied position that differ from its
        root's (taken from ``values`` too, else from the live root). Equal copies (an expanded checkpoint)
        pass; meta tensors (keys a checkpoint lacked) are skipped."""
        prefix = self._dyntie_layers_path
        for i, r in enumerate(self._tie_map):
            if r == i:
                continue
            own = {stock: key for stock, key, _ in leaf_parameters(self.dyntie_layers[i])}
            for stock, root_key, root_param in leaf_parameters(self.dyntie_layers[r]):
                key = f"{prefix}.{i}.{own.get(stock, stock)}"
                value = values.get(key)
                if value is None or value.is_meta:
                    continue
                root = values.get(f"{prefix}.{r}.{root_key}", root_param)
                if not torch.equal(value.detach().cpu(), root.detach().cpu()):
                    raise ValueError(
                        f"The checkpoint holds its own weights for layer {i} ('{key}'), but tie_map {self._tie_map} "
                        f"ties position {i} to layer {r} and the weights differ: loading would silently drop them. "
                        f"Load it untied (tie_map=None) and call model.retie(...) to tie on purpose."
                    )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that refuses weights of their own at tied positions. A tied
        position's parameters alias its root's storage, so loading them would silently overwrite the root
        (the last key written wins). Tied keys equal to their root's (an expanded checkpoint) load fine;
        keys a compact state dict lacks are left to ``strict``."""
        if "_tie_map" in self.__dict__:
            self._refuse_own_weights_at_tied_positions(state_dict)
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:  # parameters were replaced: tie the embeddings and alias the tied positions again
            self.tie_weights()
        return result
