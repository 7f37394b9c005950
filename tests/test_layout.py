"""The layout keeps its promise: the model side (what a saved model needs to load, what remote code carries)
never imports the training wing, the library never imports the example scripts' helpers."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hf_dyntie"
MODEL_SIDE = ["configuration.py", "families.py", "placement.py", "sharding.py", "tie_map.py", "tying.py",
              "modeling_dyntie.py", "modeling_bert.py", "modeling_gpt2.py", "modeling_llama.py",
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
