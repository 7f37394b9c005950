"""Command line: ``python -m hf_dyntie inspect PATH`` and ``python -m hf_dyntie expand SRC DST``.

``inspect`` reads only ``config.json`` and the safetensors headers (no weights are loaded), so it is
instant even for large checkpoints. ``expand`` writes a plain transformers folder (see
:func:`hf_dyntie.convert.expand`).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

# safetensors dtype names -> bytes per element
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors file's JSON header (``dtype``, ``shape``, ``data_offsets``)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (one file, or the shards its index names)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise ValueError(f"{folder} has no model.safetensors (or index); inspect reads safetensors checkpoints only")


def estimated_file_size(entries: dict[str, tuple[str, list[int]]]) -> int:
    """Size of one safetensors file holding ``entries`` (name -> (dtype, shape)): 8 length bytes, the
    compact JSON header padded to 8 bytes, then the tensor bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(entries):
        dtype, shape = entries[name]
        size = _DTYPE_BYTES[dtype] * _numel(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + header_bytes + (-header_bytes % 8) + offset


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Tie map, unique layers, parameter counts and file sizes of a DynTie (or plain GPT-2/BERT) folder.

    ``total_parameters``: as if every position held its own weights; ``stored_parameters``: what the files
    hold; ``trainable_parameters``: roots plus everything outside the stack (tied positions train through
    their root). ``expanded_bytes`` is the size of the single safetensors file :func:`expand` would write.
    """
    from transformers import AutoConfig

    from . import convert  # also registers the DynTie configs

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a checkpoint folder (no config.json)")
    config = AutoConfig.from_pretrained(folder)
    if type(config) in convert.DYNTIE_CONFIG_TO_STOCK:
        model_class = convert._class_for(config, convert.DYNTIE_TO_STOCK)
        architecture = model_class.__name__
        tie_map, tie_mode = list(config.tie_map or range(config.num_hidden_layers)), config.tie_mode
    elif type(config) in convert.STOCK_CONFIG_TO_DYNTIE:  # a plain checkpoint: untied
        stock_class = convert._class_for(config, convert.STOCK_TO_DYNTIE)
        model_class, architecture = convert.STOCK_TO_DYNTIE[stock_class], stock_class.__name__
        tie_map, tie_mode = list(range(config.num_hidden_layers)), None
    else:
        raise ValueError(
            f"{folder}: model_type {config.model_type!r} is not supported; supported: "
            f"{', '.join(c.model_type for c in (*convert.DYNTIE_CONFIG_TO_STOCK, *convert.STOCK_CONFIG_TO_DYNTIE))}"
        )

    files = weight_files(folder)
    entries: dict[str, tuple[str, list[int]]] = {}
    for file in files:
        for name, info in read_safetensors_header(file).items():
            entries[name] = (info["dtype"], info["shape"])

    # tied positions are absent from a compact file; expanding gives each a copy of its root's tensors
    prefix = model_class._dyntie_layers_path + "."
    expanded = dict(entries)
    for i, r in enumerate(tie_map):
        if r != i:
            root_prefix = f"{prefix}{r}."
            for name, entry in entries.items():
                if name.startswith(root_prefix):
                    expanded[f"{prefix}{i}.{name[len(root_prefix):]}"] = entry

    stored = sum(_numel(shape) for _, shape in entries.values())
    total = sum(_numel(shape) for _, shape in expanded.values())
    return {
        "path": str(folder),
        "model_type": config.model_type,
        "architecture": architecture,
        "tie_map": tie_map,
        "tie_mode": tie_mode,
        "num_layers": len(tie_map),
        "unique_layers": sum(1 for i, r in enumerate(tie_map) if r == i),
        "total_parameters": total,
        "stored_parameters": stored,
        "trainable_parameters": stored,
        "stored_tensors": len(entries),
        "expanded_tensors": len(expanded),
        "file_bytes": sum(os.path.getsize(f) for f in files),
        "expanded_bytes": estimated_file_size(expanded),
    }


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError("unreachable")


def format_inspection(info: dict[str, Any]) -> str:
    from .tie_map import format_tie_map

    mode = f", tie_mode {info['tie_mode']}" if info["tie_mode"] else " (plain checkpoint, untied)"
    lines = [
        f"checkpoint:            {info['path']}",
        f"model:                 {info['architecture']} ({info['model_type']}){mode}",
        f"tie map:               {format_tie_map(info['tie_map'])}",
        f"unique layers:         {info['unique_layers']} of {info['num_layers']}",
        f"parameters total:      {info['total_parameters']}  (every position counted)",
        f"parameters stored:     {info['stored_parameters']}  ({info['stored_tensors']} tensors)",
        f"parameters trainable:  {info['trainable_parameters']}",
        f"file size compact:     {info['file_bytes']} bytes  ({_human(info['file_bytes'])})",
        f"file size expanded:    {info['expanded_bytes']} bytes  ({_human(info['expanded_bytes'])}, "
        f"{info['expanded_tensors']} tensors, estimated)",
    ]
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    info = inspect_checkpoint(args.path)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def _expand(args: argparse.Namespace) -> int:
    from .convert import expand

    output = expand(args.src, args.dst)
    config = json.loads((output / "config.json").read_text())
    size = sum(f.stat().st_size for f in output.glob("*.safetensors"))
    print(f"wrote {output}: {config['architectures'][0]} ({config['model_type']}), {size} bytes of weights")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hf_dyntie", description="Inspect and convert DynTie (dynamic layer tying) checkpoints."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser(
        "inspect", help="print the tie map, parameter counts and file sizes of a checkpoint folder",
        description="Print the tie map, unique layers, parameters (total, stored, trainable) and file sizes "
        "(compact, and what the expanded plain checkpoint would take). Reads config.json and the "
        "safetensors headers only.",
    )
    inspect.add_argument("path", help="checkpoint folder (DynTie, or plain GPT-2/BERT)")
    inspect.add_argument("--json", action="store_true", help="print the numbers as JSON")
    inspect.set_defaults(run=_inspect)

    expand = commands.add_parser(
        "expand", help="write a plain GPT-2/BERT folder that loads with stock transformers",
        description="Expand a DynTie checkpoint into a plain transformers folder (every layer materialised, "
        "stock model_type, no custom code). Tokenizer files are copied along.",
    )
    expand.add_argument("src", help="DynTie checkpoint folder")
    expand.add_argument("dst", help="output folder")
    expand.set_defaults(run=_expand)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
