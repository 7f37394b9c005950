"""Compact checkpoints: roots stored once, reloaded with sharing and without warnings, loadable with
trust_remote_code on a machine without hf_dyntie, and refused loudly when they do not fit the tie map."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from hf_dyntie import DynTieBertForMaskedLM, DynTieBertLMHeadModel, DynTieGPT2LMHeadModel

from helpers import (
    LOADED_MAP,
    NUM_LAYERS,
    TIED_MAP,
    bert_config,
    build,
    captured_warnings,
    gpt2_config,
    input_ids,
    max_diff,
    randomize_layers,
    run_python,
    stock_copy,
    subprocess_results,
    tiny_model,
)

# (model class, config factory, extra config fields, the Auto class that should load it)
CASES = {
    "gpt2": (DynTieGPT2LMHeadModel, gpt2_config, {}, AutoModelForCausalLM),
    "bert-mlm": (DynTieBertForMaskedLM, bert_config, {}, AutoModelForMaskedLM),
    "bert-causal": (DynTieBertLMHeadModel, bert_config, {"is_decoder": True}, AutoModelForCausalLM),
}


def make(case: str, tie_map: list[int] | None = TIED_MAP, seed: int = 1):
    model_class, config_factory, extra, _ = CASES[case]
    model = build(model_class, config_factory(tie_map, **extra))
    randomize_layers(model, seed=seed)
    return model


def stored_keys(path: Path) -> set[str]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return set(f.keys())


def expected_stored(model) -> dict[str, torch.Tensor]:
    """What a compact checkpoint must hold: every state-dict entry except tied positions and the heads
    tied to the embeddings (``_tied_weights_keys``), worked out from the tie map, not from the mixin."""
    prefix = model._dyntie_layers_path + "."
    tied_positions = {str(i) for i, r in enumerate(model.tie_map) if r != i}
    head_ties = set(model._tied_weights_keys or {})
    return {
        key: tensor
        for key, tensor in model.state_dict().items()
        if key not in head_ties and not (key.startswith(prefix) and key[len(prefix):].split(".")[0] in tied_positions)
    }


def safetensors_header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    return 8 + length


def assert_no_warnings(messages: list[str]) -> None:
    assert messages == [], "unexpected warnings:\n" + "\n".join(messages)


# ---- the compact round trip -----------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_compact_round_trip(case, tmp_path):
    model = make(case)
    ids = input_ids()
    with torch.no_grad():
        expected_logits = model(ids).logits
    with captured_warnings() as save_messages:
        model.save_pretrained(tmp_path)
    assert_no_warnings(save_messages)

    # stored tensors are exactly the roots' (plus everything outside the stack), each once
    expected = expected_stored(model)
    assert stored_keys(tmp_path) == set(expected)
    per_layer = len(list(model.dyntie_layers[0].parameters()))
    assert len(expected) == len(model.state_dict()) - 3 * per_layer - len(model._tied_weights_keys)
    stored = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(stored[k], v) for k, v in expected.items())

    # file size: tensor bytes plus header, nothing for tied layers
    analytic = sum(t.numel() * t.element_size() for t in expected.values())
    analytic += safetensors_header_bytes(tmp_path / "model.safetensors")
    size = os.path.getsize(tmp_path / "model.safetensors")
    assert abs(size - analytic) <= 0.01 * analytic
    untied_bytes = sum(t.numel() * t.element_size() for t in make(case, None).state_dict().values())
    assert size < 0.8 * untied_bytes  # 3 of 6 layers stored

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_map"] == TIED_MAP and config["tie_mode"] == "share"

    auto_class = CASES[case][3]
    with captured_warnings() as load_messages:
        loaded = auto_class.from_pretrained(tmp_path).eval()
    assert_no_warnings(load_messages)
    assert type(loaded) is type(model)
    assert loaded.tie_map == TIED_MAP
    with torch.no_grad():
        assert max_diff(loaded(ids).logits, expected_logits) == 0.0
    layers = loaded.dyntie_layers
    for i, r in enumerate(TIED_MAP):
        for p, q in zip(layers[i].parameters(), layers[r].parameters()):
            assert p.data_ptr() == q.data_ptr()
    for name, p in loaded.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[name]), name


def test_round_trip_keeps_follow_mode_and_untied_layers(tmp_path):
    model = make("gpt2", [0, 1, 1, 3, 3, 3])
    model.config.tie_mode = "follow"
    model.retie([0, 1, 1, 3, 3, 3])  # applies follow mode to the live routing
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.tie_mode == "follow"
    assert loaded.tie_map == [0, 1, 1, 3, 3, 3]
    assert len(stored_keys(tmp_path)) == 4 + 3 * 12


def test_round_trip_after_retie(tmp_path):
    """The saved key set follows the live map: what was tied is dropped, what was untied is stored."""
    model = make("gpt2", [0, 0, 0, 0, 4, 4])
    with torch.no_grad():  # the root trains on while its positions are tied
        for p in model.dyntie_layers[0].parameters():
            p.mul_(1.5)
    model.retie([0, 1, 1, 3, 3, 3])  # 1 and 3 untie (copies of 0); 4 and 5 move to root 3; layer 4 released
    model.save_pretrained(tmp_path)
    assert stored_keys(tmp_path) == set(expected_stored(model))
    assert {key.split(".")[2] for key in stored_keys(tmp_path) if key.startswith("transformer.h.")} == {"0", "1", "3"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.tie_map == [0, 1, 1, 3, 3, 3]
    ids = input_ids()
    with torch.no_grad():
        assert max_diff(loaded(ids).logits, model(ids).logits) == 0.0


# ---- trust_remote_code on a machine without hf_dyntie ---------------------------------------------


@pytest.fixture
def registered():
    """Register the DynTie classes for the Auto classes, and undo it (a class attribute) afterwards."""
    classes = {DynTieGPT2LMHeadModel: "AutoModelForCausalLM", DynTieBertForMaskedLM: "AutoModelForMaskedLM"}
    touched = [*classes, *(cls.config_class for cls in classes)]
    before = {cls: cls.__dict__.get("_auto_class") for cls in touched}
    for cls, auto_class in classes.items():
        cls.register_for_auto_class(auto_class)
    try:
        yield
    finally:
        for cls in touched:
            cls._auto_class = before[cls]


REMOTE_CODE_CHECK = """
import json, torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
for folder, auto_name in CASES:
    auto_class = {"AutoModelForCausalLM": AutoModelForCausalLM, "AutoModelForMaskedLM": AutoModelForMaskedLM}[auto_name]
    try:
        auto_class.from_pretrained(folder)
        refused = None
    except ValueError as err:
        refused = str(err)
    model = auto_class.from_pretrained(folder, trust_remote_code=True).eval()
    expected = torch.load(folder + "/expected.pt")
    with torch.no_grad():
        diff = (model(expected["ids"]).logits - expected["logits"]).abs().max().item()
    shared = all(
        p.data_ptr() == q.data_ptr()
        for i, r in enumerate(model.tie_map)
        for p, q in zip(model.dyntie_layers[i].parameters(), model.dyntie_layers[r].parameters())
    )
    result = dict(folder=folder, refused=refused, module=type(model).__module__, tie_map=model.tie_map,
                  diff=diff, shared=shared)
    print("\\nRESULT " + json.dumps(result))
"""


def test_trust_remote_code_without_hf_dyntie(registered, tmp_path, outside_repo):
    folders = {}
    for case, auto_name in (("gpt2", "AutoModelForCausalLM"), ("bert-mlm", "AutoModelForMaskedLM")):
        model = make(case)
        folder = tmp_path / case
        model.save_pretrained(folder)
        ids = input_ids()
        with torch.no_grad():
            torch.save({"ids": ids, "logits": model(ids).logits}, folder / "expected.pt")
        folders[str(folder)] = auto_name

        files = {p.name for p in folder.iterdir()}
        assert {"configuration.py", "tie_map.py", "tying.py", "modeling_dyntie.py"} <= files
        assert ("modeling_gpt2.py" if case == "gpt2" else "modeling_bert.py") in files
        auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
        assert {"AutoConfig", "AutoModel", auto_name} <= set(auto_map)
        if case == "gpt2":
            assert auto_map["AutoModelForCausalLM"] == "modeling_gpt2.DynTieGPT2LMHeadModel"

    result = run_python(REMOTE_CODE_CHECK.replace("CASES", repr(list(folders.items()))), cwd=outside_repo)
    assert result.returncode == 0, result.stderr
    results = subprocess_results(result.stdout)
    assert set(results) == set(folders), result.stdout + result.stderr
    for folder, checked in results.items():
        assert checked["refused"] is not None and "trust_remote_code" in checked["refused"]
        assert checked["module"].startswith("transformers_modules")  # the folder's code, not a package
        assert checked["tie_map"] == TIED_MAP
        assert checked["diff"] <= 1e-6
        assert checked["shared"]


def test_no_auto_map_without_registration(tmp_path):
    make("gpt2").save_pretrained(tmp_path)
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())
    assert not list(tmp_path.glob("*.py"))


# ---- checkpoints that do not fit ------------------------------------------------------------------


def test_config_json_with_invalid_tie_map_is_refused(tmp_path):
    make("gpt2").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["tie_map"] = [0, 0, 4, 0, 2, 5]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tie_map\[2\] = 4"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def rewrite_weights(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("case", ["gpt2", "bert-mlm"])
def test_missing_root_tensors_are_named(case, tmp_path):
    model = make(case)
    model.save_pretrained(tmp_path)
    prefix = model._dyntie_layers_path
    missing = [f"{prefix}.2.{name}" for name, _ in list(model.dyntie_layers[2].named_parameters())[:2]]
    rewrite_weights(tmp_path, lambda state: [state.pop(key) for key in missing])
    with pytest.raises(ValueError) as info:
        CASES[case][3].from_pretrained(tmp_path)
    for key in missing:
        assert key in str(info.value)


def test_wrong_shape_is_an_error_naming_the_key(tmp_path):
    make("gpt2").save_pretrained(tmp_path)
    key = "transformer.h.2.mlp.c_fc.weight"
    rewrite_weights(tmp_path, lambda state: state.__setitem__(key, torch.zeros(32, 100)))
    with captured_warnings() as messages, pytest.raises(RuntimeError) as info:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert key in str(info.value) or any(key in message for message in messages)


@pytest.mark.parametrize("case", ["gpt2", "bert-mlm"])
def test_untied_checkpoint_into_tied_config_is_refused(case, tmp_path):
    untied = make(case, None)
    untied.save_pretrained(tmp_path)
    tied_config = make(case).config
    with pytest.raises(ValueError, match="differ"):
        type(untied).from_pretrained(tmp_path, config=tied_config)
    # same with a stock (plain transformers) checkpoint
    stock_copy(untied).save_pretrained(tmp_path / "stock")
    with pytest.raises(ValueError, match="would silently drop"):
        type(untied).from_pretrained(tmp_path / "stock", config=tied_config)


def test_load_state_dict_refuses_own_weights_at_tied_positions():
    """The Trainer path (resume, best model) goes through ``load_state_dict``: an untied state dict must not
    silently overwrite roots through the tied positions' aliased storage."""
    model = make("gpt2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"transformer\.h\.1\."):
        model.load_state_dict(make("gpt2", None, seed=5).state_dict(), strict=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    # what fits loads: its own state dict, the expanded (stock) one, a compact one, with assign too
    assert not model.load_state_dict(stock_copy(model).state_dict()).missing_keys
    compact = {k: v for k, v in model.state_dict().items() if k in expected_stored(model) or "lm_head" in k}
    model.load_state_dict(compact, strict=False)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    for i, r in enumerate(TIED_MAP):
        for p, q in zip(model.dyntie_layers[i].parameters(), model.dyntie_layers[r].parameters()):
            assert p.data_ptr() == q.data_ptr()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("case", ["gpt2", "bert-mlm"])
def test_expanded_checkpoint_loads_into_tied_config(case, tmp_path):
    model = make(case)
    stock_copy(model).save_pretrained(tmp_path)  # every layer stored, tied ones as copies of their roots
    with captured_warnings() as messages:
        loaded = type(model).from_pretrained(tmp_path, config=model.config).eval()
    assert_no_warnings(messages)
    assert loaded.tie_map == TIED_MAP
    ids = input_ids()
    with torch.no_grad():
        assert max_diff(loaded(ids).logits, model(ids).logits) == 0.0
    layers = loaded.dyntie_layers
    for i, r in enumerate(TIED_MAP):
        for p, q in zip(layers[i].parameters(), layers[r].parameters()):
            assert p.data_ptr() == q.data_ptr()


# ---- load noise: refuse first ---------------------------------------------------------------------------------


def test_a_config_that_does_not_fit_the_weights_is_refused_before_the_load_report(tmp_path):
    from helpers import captured_warnings

    folder = tmp_path / "tied"
    tiny_model(tie_map=[0] * NUM_LAYERS).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_map": LOADED_MAP}))  # roots 1, 3 not stored
    with captured_warnings() as messages, pytest.raises(ValueError, match="lacks weights of layers"):
        DynTieGPT2LMHeadModel.from_pretrained(folder)
    assert not [m for m in messages if "MISSING" in m or "LOAD REPORT" in m or "newly initialized" in m], messages
