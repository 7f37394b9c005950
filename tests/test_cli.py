"""``python -m hf_dyntie inspect|expand``: the numbers it prints and the folder it writes; at its edges the source
is never touched and every error is one line."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from helpers import (
    BLOCK,
    REPO_ROOT,
    TIED_MAP,
    build,
    captured_warnings,
    digest,
    gpt2_config,
    input_ids,
    make_case,
    max_diff,
    randomize_layers,
    stock_config,
    tiny_model,
)
from hf_dyntie import DynTieGPT2LMHeadModel
from hf_dyntie.cli import main
from hf_dyntie.cli import main as cli_main  # the name the edge tests below were written with


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


# ---- edges: the source is never touched, errors are one line --------------------------------------------------


def cli_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("where", ["itself", "inside"])
def test_expand_refuses_to_write_into_its_source(checkpoint, where, capsys):
    before = digest(checkpoint)
    dst = checkpoint if where == "itself" else checkpoint / "plain"
    assert cli_main(["expand", str(checkpoint), str(dst)]) == 2
    assert "is the source checkpoint or inside it" in cli_error(capsys)
    assert digest(checkpoint) == before and not (checkpoint / "plain").exists()
    assert json.loads((checkpoint / "config.json").read_text())["tie_map"] == [0, 0, 2, 0, 2, 5]


def test_expand_never_leaves_half_a_folder(checkpoint, tmp_path, capsys, monkeypatch):
    import hf_dyntie.convert

    def fail_halfway(src, out):
        (Path(out) / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(hf_dyntie.convert, "expand", fail_halfway)
    assert cli_main(["expand", str(checkpoint), str(tmp_path / "plain")]) == 2
    assert cli_error(capsys) == "error: disk full"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no plain/, no partial folder

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert cli_main(["expand", str(checkpoint), str(occupied)]) == 2
    assert "exists and is not empty" in cli_error(capsys)
    assert digest(occupied) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


@pytest.mark.parametrize("damage", ["truncated", "short", "garbage"])
def test_damaged_weights_are_one_line_errors(checkpoint, tmp_path, damage, capsys):
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "short": data[:5], "garbage": b"\xff" * 64}[damage])
    before = digest(checkpoint)
    expected = {"truncated": "is truncated", "short": "is not a safetensors file", "garbage": "not a safetensors file"}
    for command in (["inspect", str(checkpoint)], ["expand", str(checkpoint), str(tmp_path / "plain")]):
        assert cli_main(command) == 2, command
        line = cli_error(capsys)
        assert str(weights) in line and expected[damage] in line, line
    assert digest(checkpoint) == before and not (tmp_path / "plain").exists()


@pytest.mark.parametrize("edit", ["vocab_size", "more layers", "fewer layers"])
def test_inspect_refuses_a_config_that_does_not_fit_the_weights(tmp_path, edit, capsys):
    folder = tmp_path / "untied"
    tiny_model().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    change, expected = {
        "vocab_size": ({"vocab_size": 300}, "'transformer.wte.weight' has shape [256, 32] in the weights but [300, 32]"),
        "more layers": ({"n_layer": 8}, "the weights lack 'transformer.h.6."),
        "fewer layers": ({"n_layer": 4}, "the weights hold 'transformer.h.4."),
    }[edit]  # fmt: skip
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    capsys.readouterr()
    assert cli_main(["inspect", str(folder)]) == 2
    line = cli_error(capsys)
    assert "config.json does not fit the weights" in line and expected in line, line


@pytest.mark.parametrize("name", ["./no-such-run", "{tmp}/runs/quickstrat"])
def test_expand_of_a_mistyped_local_path_fails_at_once(tmp_path, name, capsys):
    (tmp_path / "runs").mkdir()
    name = name.replace("{tmp}", str(tmp_path))
    started = time.monotonic()
    assert cli_main(["expand", name, str(tmp_path / "plain")]) == 2
    assert time.monotonic() - started < 5  # no Hub lookup
    assert cli_error(capsys) == f"error: {name} does not exist"


def test_inspect_skips_tensors_the_model_does_not_load_like_from_pretrained(tmp_path, capsys):
    """Old GPT-2 checkpoints carry attention-mask buffers, pretrained BERTs a pooler the MLM head lacks: they
    are not refused (from_pretrained skips them) and not counted as parameters."""
    from safetensors.torch import save_file

    folder = tmp_path / "stock"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=4)).save_pretrained(folder)
    assert cli_main(["inspect", str(folder), "--json"]) == 0
    clean = json.loads(capsys.readouterr().out)
    weights = load_file(folder / "model.safetensors")
    extra = {"transformer.h.0.attn.bias": torch.ones(1, 1, BLOCK, BLOCK), "transformer.pooler.weight": torch.ones(3)}
    save_file({**weights, **extra}, folder / "model.safetensors", metadata={"format": "pt"})
    assert cli_main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["unused_tensors"] == sorted(extra)
    assert info["stored_parameters"] == clean["stored_parameters"] == clean["total_parameters"]
    assert cli_main(["inspect", str(folder)]) == 0
    assert "not loaded:            2 tensors" in capsys.readouterr().out
