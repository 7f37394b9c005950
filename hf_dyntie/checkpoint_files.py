"""What a checkpoint folder holds, read from its files: ``config.json`` and the safetensors headers, checked
against each other the way ``from_pretrained`` checks them, without loading a weight.

One reader for every tool that looks at a folder before loading it: ``python -m hf_dyntie inspect`` and
``expand`` (:func:`inspect_checkpoint`), and the trainer's resume check (:func:`weight_keys`, through
``training/checkpoints.py``). So ``inspect`` refuses what ``from_pretrained`` refuses, and a truncated file
is named the same way everywhere.

This module imports torch, transformers and the DynTie classes only inside the functions that need them:
``python -m hf_dyntie --help``, a flag error or a missing folder answer before torch would have loaded.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .tie_map import relaxed_positions

if TYPE_CHECKING:
    from transformers import PretrainedConfig

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DELTA_SEGMENTS = (".tie_delta.", ".tie_offset.")  # key segments of a relaxed tie's own modules (deltas.py)


def is_delta_key(name: str) -> bool:
    """Whether a state-dict key belongs to a relaxed tie's own delta or offset: every position's own, never
    tied, copied or folded into a stock file."""
    return any(segment in name for segment in DELTA_SEGMENTS)

Entries = dict[str, tuple[str, list[int]]]  # tensor name -> (safetensors dtype, shape)

# safetensors dtype names -> bytes per element
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def numel(shape: list[int]) -> int:
    """Elements of a tensor of ``shape`` (1 for a scalar), without torch."""
    n = 1
    for d in shape:
        n *= d
    return n


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): what one-line errors print."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---- files and headers -------------------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors file's JSON header (``dtype``, ``shape``, ``data_offsets``),
    checked against the file: a short, truncated or corrupt file is a one-line ``ValueError`` naming it."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (only {size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise ValueError(f"{path} is truncated or not a safetensors file (its header claims {length} bytes)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path} is corrupt: its safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is corrupt: its safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    for name, info in header.items():
        _check_entry(path, name, info, data_bytes=size - 8 - length)
    return header


def _check_entry(path: Path, name: str, info: Any, data_bytes: int) -> None:
    """One header entry against the file: its span fits its dtype and shape, and the file holds it."""
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        expected = DTYPE_BYTES[dtype] * numel(shape)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path} is corrupt: bad header entry for tensor {name!r}") from None
    if end - begin != expected or begin < 0:
        raise ValueError(f"{path} is corrupt: tensor {name!r} spans {end - begin} bytes, its shape needs {expected}")
    if end > data_bytes:
        raise ValueError(f"{path} is truncated: tensor {name!r} ends at byte {end} of the data, the file holds {data_bytes}")


def _weight_map(index: Path) -> dict[str, str]:
    """An index file's tensor name -> shard file; a ``ValueError`` naming it when it is not one."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{index} is corrupt: not a safetensors index with a weight_map") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} is corrupt: its weight_map is not a JSON object")
    return weight_map


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (one file, or the shards its index names)."""
    if (folder / INDEX_NAME).is_file():
        return [folder / name for name in sorted(set(_weight_map(folder / INDEX_NAME).values()))]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    raise ValueError(f"{folder} has no {WEIGHTS_NAME} (or index); inspect reads safetensors checkpoints only")


def weight_keys(folder: str | os.PathLike) -> set[str] | None:
    """Tensor names of a folder's safetensors weights, from the index or the file's checked header only;
    ``None`` when the folder holds no safetensors weights (another format, left to its own loader). Raises
    ``ValueError`` or ``OSError`` for an unreadable index or file."""
    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        return set(_weight_map(folder / INDEX_NAME))
    if (folder / WEIGHTS_NAME).is_file():
        return set(read_safetensors_header(folder / WEIGHTS_NAME))
    return None


def read_entries(folder: Path, files: list[Path]) -> Entries:
    """Every tensor of ``files`` as (dtype, shape), from their headers."""
    entries: Entries = {}
    for file in files:
        if not file.is_file():
            raise ValueError(f"{folder}: the index names {file.name}, which is missing")
        for name, info in read_safetensors_header(file).items():
            entries[name] = (info["dtype"], info["shape"])
    return entries


def estimated_file_size(entries: Entries) -> int:
    """Size of one safetensors file holding ``entries`` (name -> (dtype, shape)): 8 length bytes, the
    compact JSON header padded to 8 bytes, then the tensor bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(entries):
        dtype, shape = entries[name]
        size = DTYPE_BYTES[dtype] * numel(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + header_bytes + (-header_bytes % 8) + offset


# ---- the config --------------------------------------------------------------------------------------------


def read_config(folder: Path) -> PretrainedConfig:
    """``config.json`` as ``AutoConfig`` reads it, the DynTie model types registered first (under
    ``python -m hf_dyntie`` the package registers them only when a command needs them)."""
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a checkpoint folder (no config.json)")
    from transformers import AutoConfig

    from . import register_auto_classes

    register_auto_classes()
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as err:  # unreadable JSON, a config class that refuses it
        raise ValueError(f"{folder}/config.json cannot be read: {first_line(err)}") from None


def model_class_of(folder: Path, config: PretrainedConfig) -> tuple[type, str, list[int], str | None]:
    """The DynTie class that loads ``config`` (a plain checkpoint's config: the DynTie class of its
    architecture), the architecture the folder names, its tie map and tie mode (``None``: plain, untied)."""
    from . import convert

    if type(config) in convert.DYNTIE_CONFIG_TO_STOCK:
        model_class = convert.model_class_for(config, convert.DYNTIE_TO_STOCK)
        return model_class, model_class.__name__, list(config.tie_map or range(config.num_hidden_layers)), config.tie_mode
    if type(config) in convert.STOCK_CONFIG_TO_DYNTIE:
        stock_class = convert.model_class_for(config, convert.STOCK_TO_DYNTIE)
        return convert.STOCK_TO_DYNTIE[stock_class], stock_class.__name__, list(range(config.num_hidden_layers)), None
    supported = (*convert.DYNTIE_CONFIG_TO_STOCK, *convert.STOCK_CONFIG_TO_DYNTIE)
    raise ValueError(
        f"{folder}: model_type {config.model_type!r} is not supported; supported: "
        f"{', '.join(c.model_type for c in supported)}"
    )


# ---- the inspection ----------------------------------------------------------------------------------------


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Tie map, unique layers, parameter counts and file sizes of a DynTie (or plain GPT-2/BERT/Llama/...) folder.

    ``total_parameters``: as if every position held its own weights; ``stored_parameters``: what the files
    hold; ``trainable_parameters``: roots plus everything outside the stack (tied positions train through
    their root) plus the relaxed deltas of tied positions. ``expanded_bytes`` is the size of the single
    safetensors file ``expand`` would write (deltas folded in, so not stored).
    """
    folder = Path(path)
    config = read_config(folder)
    model_class, architecture, tie_map, tie_mode = model_class_of(folder, config)
    files = weight_files(folder)
    entries, unused = check_tensors_fit_config(folder, config, model_class, tie_map, read_entries(folder, files))
    check_tied_positions_hold_root_copies(folder, files, model_class._dyntie_layers_path, tie_map, entries)

    prefix = model_class._dyntie_layers_path + "."
    expanded = expanded_entries(entries, prefix, tie_map)
    on = relaxed_positions(tie_map, getattr(config, "tie_lora_roots", False))
    idle_deltas = [name for name in entries if is_delta_key(name) and position(name, prefix) not in on]
    stored = sum(numel(shape) for _, shape in entries.values())
    stock = {name: entry for name, entry in expanded.items() if not is_delta_key(name)}  # what expand writes
    return {
        "path": str(folder),
        "model_type": config.model_type,
        "architecture": architecture,
        "tie_map": tie_map,
        "tie_mode": tie_mode,
        "num_layers": len(tie_map),
        "unique_layers": sum(1 for i, r in enumerate(tie_map) if r == i),
        "total_parameters": sum(numel(shape) for _, shape in expanded.values()),
        "stored_parameters": stored,
        "trainable_parameters": stored - sum(numel(entries[name][1]) for name in idle_deltas),
        "tie_lora_rank": getattr(config, "tie_lora_rank", 0),
        "tie_lora_vectors": getattr(config, "tie_lora_vectors", False),
        "tie_lora_roots": getattr(config, "tie_lora_roots", False),
        "stored_tensors": len(entries),
        "expanded_tensors": len(stock),
        "file_bytes": sum(os.path.getsize(f) for f in files),
        "expanded_bytes": estimated_file_size(stock),
        "unused_tensors": unused,
    }


def expanded_entries(entries: Entries, prefix: str, tie_map: list[int]) -> Entries:
    """``entries`` with every tied position given a copy of its root's tensors, as expanding writes them.
    Tied positions are absent from a compact file; relaxed ties' deltas and offsets (``.tie_delta.``,
    ``.tie_offset.``) are every position's own, so they are not copied."""
    expanded = dict(entries)
    for i, r in enumerate(tie_map):
        if r != i:
            root_prefix = f"{prefix}{r}."
            for name, entry in entries.items():
                if name.startswith(root_prefix) and not is_delta_key(name):
                    expanded[f"{prefix}{i}.{name[len(root_prefix):]}"] = entry
    return expanded


def position(name: str, prefix: str) -> int:
    """The stack position a ``<prefix><i>.…`` key belongs to."""
    return int(name[len(prefix):].split(".", 1)[0])


def check_tied_positions_hold_root_copies(
    folder: Path, files: list[Path], layers_path: str, tie_map: list[int], entries: Entries
) -> None:
    """A ``ValueError`` (what ``from_pretrained`` refuses too) where the files hold weights of their own for a
    position config.json's map ties, and they differ from the root's: loading would silently drop them. Equal
    copies (an expanded checkpoint) pass. Reads only the tensors of tied positions present in the files."""
    prefix = layers_path + "."
    tied = {i: r for i, r in enumerate(tie_map) if r != i}
    present = [n for n in entries if n.startswith(prefix) and not is_delta_key(n) and position(n, prefix) in tied]
    if not present:
        return
    import torch
    from safetensors import safe_open

    where = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            where.update(dict.fromkeys(f.keys(), file))
    for name in present:
        i = position(name, prefix)
        root_name = f"{prefix}{tied[i]}.{name[len(prefix):].split('.', 1)[1]}"
        if root_name not in where or name not in where:
            continue
        with safe_open(str(where[name]), "pt") as a, safe_open(str(where[root_name]), "pt") as b:
            if not torch.equal(a.get_tensor(name), b.get_tensor(root_name)):
                raise ValueError(
                    f"{folder}: config.json's tie_map {tie_map} ties position {i} to layer {tied[i]}, but the weights "
                    f"hold different tensors of its own ({name!r}); from_pretrained refuses it too"
                )


def check_tensors_fit_config(
    folder: Path, config: PretrainedConfig, model_class: type, tie_map: list[int], entries: Entries
) -> tuple[Entries, list[str]]:
    """The tensors of ``entries`` the model that ``config.json`` describes loads, named as it names them, and
    the names of the others (which ``from_pretrained`` would skip: a pooler or pretraining head the model
    lacks, old buffers). A ``ValueError`` where the files do not fit the config: a tensor the model needs (a
    root layer's, or one outside the stack) is missing or has another shape, or the files hold layers beyond
    the config's depth. Tensors a checkpoint may lack (tied positions, the output embedding tied to the input
    one) may be absent. The model is built on the meta device: no memory, no weights read."""
    model = _meta_model(folder, config, model_class, tie_map)
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    named, unused = _name_as_the_model_does(model, expected, entries)
    may_lack = set(model.tied_parameter_names()) | set(getattr(model, "all_tied_weights_keys", None) or {})
    problems = [f"the weights lack {name!r}" for name in expected if name not in named and name not in may_lack]
    problems += [
        f"{name!r} has shape {named[name][1]} in the weights but {shape} in the model config.json describes"
        for name, shape in expected.items() if name in named and list(named[name][1]) != shape
    ]
    problems += [f"the weights hold {name!r}, which the model config.json describes has no place for"
                 for name in named if name not in expected]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ValueError(f"{folder}: config.json does not fit the weights: {problems[0]}{more}")
    return named, sorted(unused)


def _meta_model(folder: Path, config: PretrainedConfig, model_class: type, tie_map: list[int]) -> Any:
    """The DynTie model ``config`` describes, tied to ``tie_map``, on the meta device (shapes only)."""
    import torch

    from .convert import DYNTIE_CONFIG_TO_STOCK, to_dyntie_config

    dyntie_config = config if type(config) in DYNTIE_CONFIG_TO_STOCK else to_dyntie_config(config)
    dyntie_config = type(dyntie_config).from_dict({**dyntie_config.to_dict(), "tie_map": list(tie_map)})
    try:
        with torch.device("meta"):
            return model_class(dyntie_config)
    except Exception as err:  # a config the model class cannot be built from
        raise ValueError(f"{folder}/config.json does not describe a buildable {model_class.__name__}: {first_line(err)}") from None


def _name_as_the_model_does(model: Any, expected: dict[str, list[int]], entries: Entries) -> tuple[Entries, list[str]]:
    """``entries`` renamed as the model names them (a base model's file lacks the head's prefix), and the names
    ``from_pretrained`` would skip: e.g. GPT-2's old ``attn.bias`` buffers, BERT's pooler."""
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    prefix = getattr(model, "base_model_prefix", "")
    stack = model._dyntie_layers_path + "."
    named: Entries = {}
    unused: list[str] = []
    for name, entry in entries.items():
        if name not in expected and prefix and f"{prefix}.{name}" in expected:
            name = f"{prefix}.{name}"  # saved by the base model class, without the head's prefix
        if name not in expected and (any(p.search(name) for p in ignored) or not name.startswith(stack)):
            unused.append(name)
            continue
        named[name] = entry
    return named, unused
