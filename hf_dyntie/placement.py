"""Where a tied model's layers may be placed by ``from_pretrained(..., device_map=...)``.

A tied position runs its root's weights through a view of the root's storage (docs/design.md). accelerate's
offloading replaces a module's weights by ``meta`` tensors and swaps the real ones in inside that module's own
hooks, and a split places modules on different devices; either way a tied position reads its root's weights
where they are not. So every tie group must sit whole on one device that keeps its weights resident: a
``device_map`` that splits a group, or puts one on ``"disk"`` (or on ``"cpu"`` while other modules are on
an accelerator, which is accelerate's CPU offload), is refused before anything loads. Untied models and
untied positions are placed freely.
"""

from __future__ import annotations

from typing import Any

import torch

from .tie_map import EXPAND_HINT, positions_per_root

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_of(name: str, device_map: dict[str, Any]) -> set[str]:
    """The devices module ``name`` and its submodules land on: its longest prefix key, and any deeper key."""
    found: set[str] = set()
    best = None
    for key in device_map:
        if key == "" or name == key or name.startswith(key + "."):
            if best is None or len(key) > len(best):
                best = key
        elif key.startswith(name + "."):
            found.add(str(device_map[key]))
    if best is not None:
        found.add(str(device_map[best]))
    return found


def _is_accelerator(device: str) -> bool:
    return device not in ("cpu", "disk", "meta")


def resolve_device_map(
    device_map: Any, layers_path: str, tie_map: list[int], offload_kwargs: bool = False
) -> Any:
    """The ``device_map`` to load a model with ``tie_map`` under, or ValueError (one line) when it would split
    or offload a tie group. A strategy string (``"auto"``...) becomes the single device it would fill when
    one accelerator (or none) is visible and no ``max_memory``/offload folder asks for more; otherwise it
    could split or offload a group, and is refused."""
    groups = [g for g in positions_per_root(tie_map).values() if len(g) > 1]
    if device_map is None or not groups:
        return device_map
    if isinstance(device_map, str) and device_map in STRATEGIES:
        if torch.cuda.device_count() > 1 or offload_kwargs:
            raise ValueError(
                f"device_map={device_map!r} may split or offload the tie groups {groups} of this tied model; pass a "
                f"dict that keeps each group on one device (e.g. device_map={{'': 0}}), or untie it first with {EXPAND_HINT}, which places freely"
            )
        return {"": 0 if torch.cuda.is_available() else "cpu"}
    if not isinstance(device_map, dict):
        return device_map  # one device ("cuda:1", torch.device, an int): nothing is split
    placed = {str(v) for v in device_map.values()}
    offloads_cpu = any(_is_accelerator(d) for d in placed)
    for group in groups:
        devices: set[str] = set()
        for position in group:
            devices |= _device_of(f"{layers_path}.{position}", device_map)
        problem = None
        if "disk" in devices:
            problem = f"offloads tie group {group} to disk"
        elif "cpu" in devices and offloads_cpu:
            problem = f"offloads tie group {group} to the CPU while other modules are on an accelerator"
        elif len(devices) > 1:
            problem = f"splits tie group {group} across devices {sorted(devices)}"
        if problem:
            raise ValueError(
                f"device_map {problem}: tied positions read their root's weights, so a group must sit whole on one "
                f"device and stay resident; place the group on one device, or untie it first with {EXPAND_HINT}, which places freely"
            )
    return device_map
