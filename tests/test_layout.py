"""The layout keeps its promise: the model side (what a saved model needs to load, what remote code carries)
never imports the training wing, the library never imports the example scripts' helpers."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hf_dyntie"
MODEL_SIDE = ["configuration.py", "families.py", "placement.py", "sharding.py", "tie_map.py", "tying.py",
              "leaves.py", "deltas.py", "retie.py", "compiled.py", "modeling_dyntie.py", "tied_parameters.py",
              "loading.py", "adapters.py", "hub.py", "modeling_bert.py", "modeling_gpt2.py", "modeling_llama.py",
              "modeling_mistral.py", "modeling_qwen2.py"]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, resolved to ``hf_dyntie.…`` for relative imports (anywhere in the file)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_the_model_side_never_imports_the_training_wing_or_the_tools():
    for name in MODEL_SIDE:
        bad = {m for m in imported_modules(PACKAGE / name)
               if m.startswith(("hf_dyntie.training", "hf_dyntie.scripts", "hf_dyntie.convert", "hf_dyntie.cli"))}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_the_library_never_imports_the_scripts_helpers():
    for path in PACKAGE.rglob("*.py"):
        if "scripts" in path.relative_to(PACKAGE).parts:
            continue
        bad = {m for m in imported_modules(path) if m.startswith("hf_dyntie.scripts")}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_the_check_sees_relative_imports():
    """The resolver is not vacuous: the trainer's relative imports resolve into the wing and the model side."""
    found = imported_modules(PACKAGE / "training" / "trainer.py")
    assert "hf_dyntie.training.history" in found and "hf_dyntie.modeling_dyntie" in found


TOOLS = ["convert.py", "checkpoint_files.py", "cli.py", "__main__.py"]


def test_the_tools_never_import_the_training_wing():
    """``python -m hf_dyntie`` and the checkpoint reader it shares with the resume check stand on the model side
    alone: the training wing imports them, never the other way."""
    for name in TOOLS:
        bad = {m for m in imported_modules(PACKAGE / name) if m.startswith(("hf_dyntie.training", "hf_dyntie.scripts"))}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_the_model_side_imports_where_the_training_wing_and_the_tools_cannot():
    """Not only the import statements: every model-side module imports, and a model builds and runs, in a
    process where ``hf_dyntie.training``, ``hf_dyntie.scripts``, ``convert`` and ``cli`` cannot be imported."""
    import subprocess
    import sys

    modules = [f"hf_dyntie.{name[:-3]}" for name in MODEL_SIDE]
    code = "\n".join([
        "import importlib, sys",
        "for blocked in ('hf_dyntie.training', 'hf_dyntie.scripts', 'hf_dyntie.convert', 'hf_dyntie.cli'):",
        "    sys.modules[blocked] = None  # any import of it raises ImportError",
        f"for name in {modules!r}:",
        "    importlib.import_module(name)",
        "import torch",
        "from hf_dyntie.modeling_llama import DynTieLlamaConfig, DynTieLlamaForCausalLM",
        "config = DynTieLlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4,",
        "                           num_attention_heads=2, num_key_value_heads=2, tie_map=[0, 0, 2, 2])",
        "model = DynTieLlamaForCausalLM(config)",
        "model.retie([0, 1, 1, 3])",
        "print('OK', model(torch.arange(6)[None]).logits.shape[-1], sorted(m for m, v in sys.modules.items() if v and m.startswith('hf_dyntie.training')))",
    ])  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "OK 32 []"
