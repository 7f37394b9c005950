"""Command line: ``python -m hf_dyntie inspect PATH`` and ``python -m hf_dyntie expand SRC DST``.

``inspect`` reads only ``config.json`` and the safetensors headers (no weights are loaded), so it is
instant even for large checkpoints; it checks them the way ``from_pretrained`` would (a truncated file, or a
``config.json`` that does not fit the tensors, is an error, not a report with wrong numbers). ``expand``
writes a plain transformers folder (see :func:`hf_dyntie.convert.expand`) through a temporary folder that is
renamed at the end, so a failure never leaves half a folder, and it never writes into its source.

Errors are one line on stderr, ``error: ...``, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
import tempfile
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
    data_bytes = size - 8 - length
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            expected = _DTYPE_BYTES[dtype] * _numel(shape)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path} is corrupt: bad header entry for tensor {name!r}") from None
        if end - begin != expected or begin < 0:
            raise ValueError(f"{path} is corrupt: tensor {name!r} spans {end - begin} bytes, its shape needs {expected}")
        if end > data_bytes:
            raise ValueError(
                f"{path} is truncated: tensor {name!r} ends at byte {end} of the data, the file holds {data_bytes}"
            )
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
    """Tie map, unique layers, parameter counts and file sizes of a DynTie (or plain GPT-2/BERT/Llama/...) folder.

    ``total_parameters``: as if every position held its own weights; ``stored_parameters``: what the files
    hold; ``trainable_parameters``: roots plus everything outside the stack (tied positions train through
    their root) plus the relaxed deltas of tied positions. ``expanded_bytes`` is the size of the single
    safetensors file :func:`expand` would write (deltas folded in, so not stored).
    """
    from transformers import AutoConfig

    from . import convert  # also registers the DynTie configs

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a checkpoint folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as err:  # unreadable JSON, a config class that refuses it
        raise ValueError(f"{folder}/config.json cannot be read: {_first_line(err)}") from None
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
        if not file.is_file():
            raise ValueError(f"{folder}: the index names {file.name}, which is missing")
        for name, info in read_safetensors_header(file).items():
            entries[name] = (info["dtype"], info["shape"])
    entries, unused = check_tensors_fit_config(folder, config, model_class, tie_map, entries)
    check_tied_positions_hold_root_copies(folder, files, model_class._dyntie_layers_path, tie_map, entries)

    # tied positions are absent from a compact file; expanding gives each a copy of its root's tensors. Relaxed
    # ties' deltas (``.tie_delta.``) are every position's own: stored, trainable while tied, folded by expand.
    prefix = model_class._dyntie_layers_path + "."
    expanded = dict(entries)
    for i, r in enumerate(tie_map):
        if r != i:
            root_prefix = f"{prefix}{r}."
            for name, entry in entries.items():
                if name.startswith(root_prefix) and DELTA not in name:
                    expanded[f"{prefix}{i}.{name[len(root_prefix):]}"] = entry
    untied_deltas = [name for name in entries if DELTA in name and _position(name, prefix) in set(tie_map)]

    stored = sum(_numel(shape) for _, shape in entries.values())
    total = sum(_numel(shape) for _, shape in expanded.values())
    stock = {name: entry for name, entry in expanded.items() if DELTA not in name}  # what expand writes
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
        "trainable_parameters": stored - sum(_numel(entries[name][1]) for name in untied_deltas),
        "tie_lora_rank": getattr(config, "tie_lora_rank", 0),
        "stored_tensors": len(entries),
        "expanded_tensors": len(stock),
        "file_bytes": sum(os.path.getsize(f) for f in files),
        "expanded_bytes": estimated_file_size(stock),
        "unused_tensors": unused,
    }


def check_tied_positions_hold_root_copies(
    folder: Path, files: list[Path], layers_path: str, tie_map: list[int], entries: dict[str, tuple[str, list[int]]]
) -> None:
    """A ``ValueError`` (what ``from_pretrained`` refuses too) where the files hold weights of their own for a
    position config.json's map ties, and they differ from the root's: loading would silently drop them. Equal
    copies (an expanded checkpoint) pass. Reads only the tensors of tied positions present in the files."""
    from safetensors import safe_open

    prefix = layers_path + "."
    tied = {i: r for i, r in enumerate(tie_map) if r != i}
    present = [n for n in entries if n.startswith(prefix) and DELTA not in n and _position(n, prefix) in tied]
    if not present:
        return
    where = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                where[name] = file
    for name in present:
        i = _position(name, prefix)
        root_name = f"{prefix}{tied[i]}.{name[len(prefix):].split('.', 1)[1]}"
        if root_name not in where or name not in where:
            continue
        with safe_open(str(where[name]), "pt") as a, safe_open(str(where[root_name]), "pt") as b:
            import torch

            if not torch.equal(a.get_tensor(name), b.get_tensor(root_name)):
                raise ValueError(
                    f"{folder}: config.json's tie_map {tie_map} ties position {i} to layer {tied[i]}, but the weights "
                    f"hold different tensors of its own ({name!r}); from_pretrained refuses it too"
                )


DELTA = ".tie_delta."  # the key segment of a relaxed tie's own delta (tying.TieDelta)


def _position(name: str, prefix: str) -> int:
    """The stack position a ``<prefix><i>.…`` key belongs to."""
    return int(name[len(prefix):].split(".", 1)[0])


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_tensors_fit_config(
    folder: Path, config, model_class: type, tie_map: list[int], entries: dict[str, tuple[str, list[int]]]
) -> tuple[dict[str, tuple[str, list[int]]], list[str]]:
    """The tensors of ``entries`` the model that ``config.json`` describes loads, named as it names them, and
    the names of the others (which ``from_pretrained`` would skip: a pooler or pretraining head the model
    lacks, old buffers). A ``ValueError`` where the files do not fit the config: a tensor the model needs (a
    root layer's, or one outside the stack) is missing or has another shape, or the files hold layers beyond
    the config's depth. Tensors a checkpoint may lack (tied positions, the output embedding tied to the input
    one) may be absent. The model is built on the meta device: no memory, no weights read."""
    import torch

    from .convert import DYNTIE_CONFIG_TO_STOCK, to_dyntie_config

    dyntie_config = config if type(config) in DYNTIE_CONFIG_TO_STOCK else to_dyntie_config(config)
    dyntie_config = type(dyntie_config).from_dict({**dyntie_config.to_dict(), "tie_map": list(tie_map)})
    try:
        with torch.device("meta"):
            model = model_class(dyntie_config)
    except Exception as err:  # a config the model class cannot be built from
        raise ValueError(f"{folder}/config.json does not describe a buildable {model_class.__name__}: {_first_line(err)}") from None
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    prefix = getattr(model, "base_model_prefix", "")
    stack = model._dyntie_layers_path + "."
    named: dict[str, tuple[str, list[int]]] = {}
    unused: list[str] = []
    for name, entry in entries.items():
        if name not in expected and prefix and f"{prefix}.{name}" in expected:
            name = f"{prefix}.{name}"  # saved by the base model class, without the head's prefix
        if name not in expected and (any(p.search(name) for p in ignored) or not name.startswith(stack)):
            unused.append(name)  # e.g. GPT-2's old attn.bias buffers, BERT's pooler: from_pretrained skips them
            continue
        named[name] = entry
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


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError("unreachable")


def format_inspection(info: dict[str, Any]) -> str:
    from .tie_map import format_tie_map

    mode = f", tie_mode {info['tie_mode']}" if info["tie_mode"] else " (plain checkpoint, untied)"
    if info.get("tie_lora_rank"):
        mode += f", relaxed ties of rank {info['tie_lora_rank']}"
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
    if info.get("unused_tensors"):
        names = info["unused_tensors"]
        lines.append(f"not loaded:            {len(names)} tensors the model has no place for (e.g. {names[0]}), not counted")
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    info = inspect_checkpoint(args.path)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def looks_local(name: str) -> bool:
    """Whether ``name`` means a folder on this machine rather than a Hub id: it starts with ``/``, ``.`` or
    ``~``, or the folder it would sit in exists (``runs/quickstrat`` when ``runs/`` exists)."""
    if name.startswith(("/", ".", "~")):
        return True
    parent = Path(name).parent
    return str(parent) not in ("", ".") and parent.is_dir()


def _expand(args: argparse.Namespace) -> int:
    from .convert import expand

    src, dst = args.src, Path(args.dst).expanduser()
    source = Path(src).expanduser()
    if source.exists():
        inspect_checkpoint(source)  # a truncated file or a config that does not fit: one line, before any work
    elif looks_local(src):
        raise ValueError(f"{src} does not exist")
    if source.exists() and (dst.resolve() == source.resolve() or source.resolve() in dst.resolve().parents):
        raise ValueError(f"the output folder {args.dst} is the source checkpoint or inside it; pick another folder")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"the output {args.dst} is a file, not a folder")
    if dst.is_dir() and any(dst.iterdir()):
        raise ValueError(f"the output folder {args.dst} exists and is not empty; remove it or pick another folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        expand(src, scratch)
        if dst.is_dir():
            dst.rmdir()  # empty, checked above
        os.replace(scratch, dst)  # all at once: dst is either absent or complete
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    config = json.loads((dst / "config.json").read_text())
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    print(f"wrote {dst}: {config['architectures'][0]} ({config['model_type']}), {size} bytes of weights")
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
    inspect.add_argument("path", help="checkpoint folder (DynTie, or a plain one of a family in families.py)")
    inspect.add_argument("--json", action="store_true", help="print the numbers as JSON")
    inspect.set_defaults(run=_inspect)

    expand = commands.add_parser(
        "expand", help="write a plain GPT-2/BERT/Llama/... folder that loads with stock transformers",
        description="Expand a DynTie checkpoint into a plain transformers folder (every layer materialised, "
        "stock model_type, no custom code). Tokenizer files are copied along.",
    )
    expand.add_argument("src", help="DynTie checkpoint folder (or Hub id)")
    expand.add_argument("dst", help="output folder: new or empty, not inside src")
    expand.set_defaults(run=_expand)
    return parser


def main(argv: list[str] | None = None) -> int:
    from safetensors import SafetensorError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError, SafetensorError) as err:
        print(f"error: {_first_line(err)}", file=sys.stderr)
        return 2

