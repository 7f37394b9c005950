"""Saves and pushes that carry the modeling code: the ``auto_map`` a DynTie folder needs to load with
``trust_remote_code=True`` where hf_dyntie is not installed, and a class registered for an Auto class while it
saves or pushes (transformers asks the class, not the instance, whether a save carries its code).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from transformers.utils import logging

from .families import family_of_class

logger = logging.get_logger(__name__)


@contextmanager
def registered_for_auto_class(cls: type, auto_class: str) -> Iterator[None]:
    """Register ``cls`` for ``auto_class`` while the block saves or pushes, then restore the inherited ``None``:
    transformers decides whether a save carries the modeling code by asking the class, not the instance. A class
    the user registered stays as it is."""
    if cls.is_remote_code():
        yield
        return
    cls._auto_class = auto_class
    try:
        yield
    finally:
        del cls._auto_class


class HubMixin:
    """``save_pretrained`` and ``push_to_hub`` of :class:`~hf_dyntie.modeling_dyntie.DynTieMixin` (mixed into it;
    reads the class's ``_dyntie_auto_map``)."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Stock ``save_pretrained`` (roots only, see ``_keys_to_ignore_on_save``). When the class was
        registered for an auto class, ``config.json`` gets an ``auto_map`` with every entry point of the
        family so ``trust_remote_code=True`` loads it with any Auto class."""
        if getattr(self, "_auto_class", None) is not None:
            self.config.auto_map = dict(self._dyntie_auto_map)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def push_to_hub(self, *args, **kwargs):
        """Stock ``push_to_hub``, with the modeling code and an ``auto_map``: a pushed DynTie folder must load
        where hf_dyntie is not installed (``trust_remote_code=True``). A family class not registered with
        ``register_for_auto_class`` is registered for this push only (transformers asks the class)."""
        cls = type(self)
        found = family_of_class(cls)
        if found is None:
            if not cls.is_remote_code():
                logger.warning(f"{cls.__name__} is not registered for an Auto class: the pushed folder carries no "
                               "modeling code and loads only where hf_dyntie is installed")
            return super().push_to_hub(*args, **kwargs)
        with registered_for_auto_class(cls, found[1].auto_class):
            return super().push_to_hub(*args, **kwargs)
