"""Pushes that load anywhere: ``DynTieTrainer.push_to_hub`` against a local stand-in of the Hub's upload API
(the ``hub`` fixture records what would be uploaded), the uploaded folder loaded with
``trust_remote_code=True`` in an interpreter where hf_dyntie cannot be imported, and the one-line refusal of
transformers 4.x. The scripts' ``--push_to_hub`` is tested in test_scripts.py with the same stand-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import HubStandIn, check_loads_without_hf_dyntie, run_python, subprocess_results

from hf_dyntie import DynTieGPT2Config, DynTieGPT2LMHeadModel, DynTieTrainer, DynTieTrainingArguments
from hf_dyntie.configuration import require_transformers_5

LAYERS, BLOCK = 4, 16
MODELING_FILES = {"configuration.py", "modeling_gpt2.py", "modeling_dyntie.py", "tying.py", "tie_map.py"}

OLD_TRANSFORMERS = """
import json, transformers
transformers.__version__ = "4.46.3"  # what a 4.x install reports; its strict-dataclass failure comes later
from transformers import AutoModelForCausalLM
for folder in FOLDERS:
    try:
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        error = None
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
    print("RESULT " + json.dumps(dict(folder=folder, error=error)))
"""

WITHOUT_TRUST = """
import json
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(FOLDER)
    error = None
except Exception as err:
    error = str(err)
print()  # ends transformers' "[y/N]" prompt line
print("RESULT " + json.dumps(dict(folder=FOLDER, error=error)))
"""


def tiny_trainer(out: Path, **overrides) -> DynTieTrainer:
    torch.manual_seed(0)
    config = DynTieGPT2Config(vocab_size=64, n_positions=BLOCK, n_embd=16, n_layer=LAYERS, n_head=2)
    data = [{"input_ids": torch.randint(0, 64, (BLOCK,)), "labels": torch.randint(0, 64, (BLOCK,))} for _ in range(8)]
    args = dict(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=4, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, tie_policy="sequence", tie_unique_layers=2, dataloader_num_workers=0,
    )
    args.update(overrides)
    return DynTieTrainer(model=DynTieGPT2LMHeadModel(config), args=DynTieTrainingArguments(**args), train_dataset=data)


def test_trainer_push_carries_remote_code_and_the_dyntie_card(hub: HubStandIn, tmp_path: Path, outside_repo: Path):
    trainer = tiny_trainer(tmp_path / "out")
    trainer.train()
    trainer.save_model()  # a local save carries the code too: the folder loads where hf_dyntie is not installed
    local = tmp_path / "out"
    assert MODELING_FILES <= {p.name for p in local.iterdir()} and "auto_map" in json.loads(
        (local / "config.json").read_text())
    check_loads_without_hf_dyntie([local], outside_repo)
    # without trust_remote_code, transformers names the flag instead of calling the architecture unknown
    result = run_python(WITHOUT_TRUST.replace("FOLDER", repr(str(local))), cwd=outside_repo)
    error = subprocess_results(result.stdout)[str(local)]["error"]
    assert "trust_remote_code=True" in error and "does not recognize this architecture" not in error

    trainer.push_to_hub()  # a push saves with remote code by default, and uploads once
    assert len(hub.uploads) == 1
    folder = hub.uploads[0]
    assert MODELING_FILES <= {p.name for p in folder.iterdir()}
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_gpt2.DynTieGPT2LMHeadModel"
    assert DynTieGPT2LMHeadModel._auto_class is None  # the class was not registered along the way
    card = (folder / "README.md").read_text()
    assert "- dyntie\n" in card and "- gpt2\n" in card and "pip install" in card
    assert "trust_remote_code=True" in card and "import hf_dyntie" not in card
    # a static policy's map is fixed from step 0: the card says that map, not the dynamic policies' start
    assert "fixed the map `[0 0 2 2]` from step 0" in card and "initial map" not in card
    check_loads_without_hf_dyntie([folder], outside_repo)

    result = run_python(OLD_TRANSFORMERS.replace("FOLDERS", repr([str(folder)])), cwd=outside_repo)
    error = subprocess_results(result.stdout)[str(folder)]["error"]
    assert error is not None and "requires transformers>=5; use `python -m hf_dyntie expand` for older" in error


def test_checkpoint_pushes_carry_the_modeling_code(hub: HubStandIn, tmp_path: Path):
    """hub_strategy every_save pushes output_dir at each checkpoint: each of those revisions loads too."""
    trainer = tiny_trainer(tmp_path / "out", push_to_hub=True, hub_model_id="me/tiny", save_strategy="steps",
                           save_steps=1, hub_strategy="every_save")
    trainer.train()
    assert len(hub.uploads) >= 2
    for folder in hub.uploads:
        assert MODELING_FILES <= {p.name for p in folder.iterdir()}, folder
        assert "auto_map" in json.loads((folder / "config.json").read_text())


def test_push_without_remote_code_when_asked(hub: HubStandIn, tmp_path: Path):
    trainer = tiny_trainer(tmp_path / "out", save_remote_code=False)
    trainer.train()
    trainer.push_to_hub()
    folder = hub.uploads[0]
    assert "auto_map" not in json.loads((folder / "config.json").read_text())
    assert not list(folder.glob("*.py"))
    card = (folder / "README.md").read_text()
    assert "import hf_dyntie" in card and "trust_remote_code" not in card


def test_save_remote_code_flags():
    """On by default (local saves and pushes); --no_save_remote_code turns it off."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(DynTieTrainingArguments)
    for argv, expected in (([], True), (["--save_remote_code"], True), (["--no_save_remote_code"], False),
                           (["--save_remote_code", "false"], False)):
        (args,) = parser.parse_args_into_dataclasses(args=["--output_dir", "unused", "--report_to", "none", *argv])
        assert args.save_remote_code is expected, argv


@pytest.mark.parametrize("version", ["4.57.1", "4.0.0"])
def test_transformers_4_is_refused_in_one_line(version: str):
    with pytest.raises(ImportError, match=r"requires transformers>=5; use `python -m hf_dyntie expand`"):
        require_transformers_5(version)
    require_transformers_5("5.0.0")


def test_model_push_to_hub_carries_remote_code_without_registering(hub: HubStandIn, tmp_path: Path,
                                                                   outside_repo: Path):
    torch.manual_seed(0)
    config = DynTieGPT2Config(vocab_size=64, n_positions=BLOCK, n_embd=16, n_layer=LAYERS, n_head=2,
                              tie_map=[0, 0, 2, 2])
    model = DynTieGPT2LMHeadModel(config)
    model.push_to_hub("me/tied-gpt2")  # no register_for_auto_class first: the push must still load anywhere
    assert len(hub.uploads) == 1
    folder = hub.uploads[0]
    assert MODELING_FILES <= {p.name for p in folder.iterdir()}
    assert "placement.py" in {p.name for p in folder.iterdir()}  # modeling_dyntie's own imports travel too
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_gpt2.DynTieGPT2LMHeadModel"
    assert DynTieGPT2LMHeadModel._auto_class is None  # registered for that push only
    check_loads_without_hf_dyntie([folder], outside_repo)
