"""Command line: ``python -m hf_dyntie inspect PATH`` and ``python -m hf_dyntie expand SRC DST``.

``inspect`` reads only ``config.json`` and the safetensors headers (no weights are loaded), so it is
instant even for large checkpoints; it checks them the way ``from_pretrained`` would (a truncated file, or a
``config.json`` that does not fit the tensors, is an error, not a report with wrong numbers): see
:mod:`hf_dyntie.checkpoint_files`, which this module only formats. ``expand`` writes a plain transformers
folder (see :func:`hf_dyntie.convert.expand`) through a temporary folder that is renamed at the end, so a
failure never leaves half a folder, and it never writes into its source.

Errors are one line on stderr, ``error: ...``, with exit status 2. Only the standard library is imported
here: torch and transformers load when a command reads a checkpoint, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .checkpoint_files import first_line, inspect_checkpoint
from .tie_map import format_tie_map


def _human(n: int) -> str:
    """A byte count in the largest unit it reaches, up to GiB (the exact count is printed beside it)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError("unreachable")


def format_inspection(info: dict[str, Any]) -> str:
    """``inspect``'s report: one labelled line per number of :func:`inspect_checkpoint`."""
    mode = f", tie_mode {info['tie_mode']}" if info["tie_mode"] else " (plain checkpoint, untied)"
    if info.get("tie_lora_rank"):
        mode += f", relaxed ties of rank {info['tie_lora_rank']}"
        mode += " with norm and bias offsets" if info.get("tie_lora_vectors") else ""
        mode += ", roots relaxed too" if info.get("tie_lora_roots") else ""
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
    """``inspect``: the report, or ``--json`` for scripts."""
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
    from . import convert, register_auto_classes  # torch and transformers: only now the work starts

    register_auto_classes()  # a Hub id was not inspected above; python -m hf_dyntie registers on demand
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        convert.expand(src, scratch)
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
    """Run one command; a bad input is one ``error:`` line on stderr and exit status 2 (argparse's for usage)."""
    args = build_parser().parse_args(argv)
    from safetensors import SafetensorError  # the safetensors loader's own error for a damaged file

    try:
        return args.run(args)
    except (ValueError, OSError, SafetensorError) as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 2

