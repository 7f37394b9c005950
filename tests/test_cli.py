"""``python -m hf_dyntie inspect|expand``: the numbers it prints and the folder it writes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from hf_dyntie import DynTieGPT2LMHeadModel
from hf_dyntie.cli import main

from conftest import (
    REPO_ROOT,
    TIED_MAP,
    build,
    captured_warnings,
    gpt2_config,
    input_ids,
    make_case,
    max_diff,
    randomize_layers,
    stock_config,
)


def cli(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **extra_env}
    return subprocess.run(
        [sys.executable, "-m", "hf_dyntie", *args], env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=180,
    )


def number(output: str, label: str) -> int:
    match = re.search(rf"^{label}:\s+(\d+)", output, flags=re.MULTILINE)
    assert match, f"no '{label}' line in:\n{output}"
    return int(match.group(1))


@pytest.fixture
def compact(tmp_path):
    model = build(DynTieGPT2LMHeadModel, gpt2_config(TIED_MAP))
    randomize_layers(model)
    model.save_pretrained(tmp_path / "compact")
    return model, tmp_path / "compact"


def test_inspect_and_expand(compact, tmp_path):
    model, folder = compact
    summary = model.tie_summary()

    inspected = cli("inspect", str(folder))
    assert inspected.returncode == 0, inspected.stderr
    out = inspected.stdout
    assert "[0 0 2 0 2 5]  (3 unique of 6)" in out
    assert re.search(r"^unique layers:\s+3 of 6$", out, flags=re.MULTILINE)
    assert number(out, "parameters total") == summary["total_parameters"]
    assert number(out, "parameters stored") == summary["stored_parameters"]
    assert number(out, "parameters trainable") == summary["trainable_parameters"]
    assert summary["stored_parameters"] < summary["total_parameters"]
    compact_bytes = number(out, "file size compact")
    assert compact_bytes == os.path.getsize(folder / "model.safetensors")

    expanded = cli("expand", str(folder), str(tmp_path / "plain"))
    assert expanded.returncode == 0, expanded.stderr
    assert "GPT2LMHeadModel" in expanded.stdout
    plain_bytes = os.path.getsize(tmp_path / "plain" / "model.safetensors")
    assert abs(number(out, "file size expanded") - plain_bytes) <= 0.001 * plain_bytes
    assert plain_bytes > 1.8 * compact_bytes  # 6 layers stored instead of 3

    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and "tie_map" not in config and "auto_map" not in config
    with captured_warnings() as messages:
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert messages == []
    assert type(plain) is GPT2LMHeadModel  # stock class, no custom code
    ids = input_ids()
    with torch.no_grad():
        assert max_diff(plain(ids).logits, model(ids).logits) <= 1e-6


def test_inspect_json_and_plain_checkpoints(compact, tmp_path, capsys):
    model, folder = compact
    assert main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    summary = model.tie_summary()
    for key in ("tie_map", "unique_layers", "total_parameters", "stored_parameters", "trainable_parameters"):
        assert info[key] == summary[key], key
    assert info["tie_mode"] == "share"
    assert info["file_bytes"] == os.path.getsize(folder / "model.safetensors")

    # a plain GPT-2 folder inspects as untied, with nothing to expand
    GPT2LMHeadModel(stock_config(gpt2_config())).save_pretrained(tmp_path / "p")
    assert main(["inspect", str(tmp_path / "p"), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["tie_map"] == list(range(6)) and plain["tie_mode"] is None
    assert plain["stored_parameters"] == plain["total_parameters"] == summary["total_parameters"]
    assert plain["expanded_bytes"] == plain["file_bytes"]


def test_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    assert "inspect" in help_text and "expand" in help_text

    with pytest.raises(SystemExit):
        main(["inspect"])  # missing PATH: argparse usage error
    capsys.readouterr()

    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "no config.json" in capsys.readouterr().err



@pytest.mark.parametrize("args, status, said", [
    (["--help"], 0, ""),
    (["inspect", "ckpt", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["inspect", "/nonexistent"], 2, "error: /nonexistent is not a checkpoint folder (no config.json)"),
    (["expand", "/nonexistent", "out"], 2, "error: /nonexistent does not exist"),
])  # fmt: skip
def test_help_and_bad_input_answer_without_torch(args, status, said):
    """``python -m hf_dyntie`` imports neither torch nor transformers (seconds on a cold start) before a command
    reads a checkpoint: the package registers the Auto classes on demand in that one process."""
    run = cli(*args, PYTHONPROFILEIMPORTTIME="1")
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "hf_dyntie.cli" in imported and not imported & {"torch", "transformers"}, sorted(imported)
    errors = [line for line in run.stderr.splitlines() if not line.startswith("import time:")]
    assert run.returncode == status and said in "\n".join(errors), run.stderr[-2000:]

def test_inspect_and_from_pretrained_agree_on_a_map_that_does_not_fit_the_weights(tmp_path):
    """A folder whose config.json ties positions the weights hold different tensors for: from_pretrained refuses
    it, and so does inspect (it used to print counts as if the map were right). A folder lacking the token
    embedding is refused by from_pretrained in one line, not loaded with a random one."""
    from safetensors.torch import load_file, save_file

    from hf_dyntie.checkpoint_files import inspect_checkpoint

    model = make_case("gpt2-lm", tie_map=None)  # untied: every position its own (randomised) weights
    model.save_pretrained(tmp_path / "untied")
    config = json.loads((tmp_path / "untied" / "config.json").read_text())
    (tmp_path / "untied" / "config.json").write_text(json.dumps({**config, "tie_map": [0, 0, 2, 0, 2, 5]}))
    with pytest.raises(ValueError, match="weights differ"):
        DynTieGPT2LMHeadModel.from_pretrained(tmp_path / "untied")
    with pytest.raises(ValueError, match="ties position 1 to layer 0, but the weights hold different tensors"):
        inspect_checkpoint(tmp_path / "untied")

    tied = make_case("gpt2-lm")
    tied.save_pretrained(tmp_path / "no_wte")
    weights = load_file(tmp_path / "no_wte" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "wte" not in k}, tmp_path / "no_wte" / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks the token embedding \\(transformer.wte.weight\\)") as error:
        DynTieGPT2LMHeadModel.from_pretrained(tmp_path / "no_wte")
    assert "\n" not in str(error.value)
