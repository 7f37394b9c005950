"""hf_dyntie.convert: expand a DynTie model into a plain transformers folder that loads with no custom code,
and bring a plain GPT-2 / BERT model in as a DynTie model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import OPTConfig, PreTrainedTokenizerFast

from hf_dyntie.convert import expand, from_stock

from helpers import (
    MODEL_CASES,
    STOCK_CLASS,
    TIED_MAP,
    VOCAB,
    captured_warnings,
    input_ids,
    make_case,
    max_diff,
    run_python,
    stock_copy,
    subprocess_results,
)

CASES = MODEL_CASES


def make(case: str, tie_map: list[int] | None = TIED_MAP, **fields):
    return make_case(case, tie_map, **fields)


def output(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        result = model(ids)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def save_tokenizer(folder: Path) -> None:
    """A tiny word-level fast tokenizer (built locally, nothing downloaded)."""
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)


# ---- expand ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_expand_live_model(case, tmp_path):
    model = make(case)
    with captured_warnings() as messages:
        expand(model, tmp_path)
    assert messages == []
    stock_class = STOCK_CLASS[type(model)]

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == ("gpt2" if "gpt2" in case else "bert")
    assert config["architectures"] == [stock_class.__name__]
    assert not {"tie_map", "tie_mode", "auto_map"} & set(config)
    assert not list(tmp_path.glob("*.py"))

    # every layer materialised, tied ones as copies of their roots
    stored = load_file(tmp_path / "model.safetensors")
    prefix = model._dyntie_layers_path + "."
    for i, r in enumerate(TIED_MAP):
        for name, p in model.dyntie_layers[r].named_parameters():
            assert torch.equal(stored[f"{prefix}{i}.{name}"], p), f"{i}.{name}"
    assert set(stored) == set(stock_class.from_pretrained(tmp_path).state_dict()) - set(
        stock_class._tied_weights_keys or {}
    )

    with captured_warnings() as messages:
        loaded = stock_class.from_pretrained(tmp_path).eval()
    assert messages == []
    assert type(loaded) is stock_class
    ids = input_ids()
    assert max_diff(output(loaded, ids), output(model, ids)) <= 1e-6
    assert model.tie_map == TIED_MAP  # the source model is left as it was


STOCK_CHECK = """
import json, torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
for folder, auto_name in CASES:
    auto_class = {"AutoModelForCausalLM": AutoModelForCausalLM, "AutoModelForMaskedLM": AutoModelForMaskedLM}[auto_name]
    model = auto_class.from_pretrained(folder).eval()  # no trust_remote_code: plain transformers only
    expected = torch.load(folder + "/expected.pt")
    with torch.no_grad():
        diff = (model(expected["ids"]).logits - expected["logits"]).abs().max().item()
    tokens = AutoTokenizer.from_pretrained(folder)("w5 w7 w9")["input_ids"]
    result = dict(folder=folder, cls=type(model).__name__, module=type(model).__module__, diff=diff, tokens=tokens)
    print("\\nRESULT " + json.dumps(result))
"""


def test_expanded_folders_load_without_hf_dyntie(tmp_path, outside_repo):
    cases = {
        "gpt2-lm": "AutoModelForCausalLM",
        "bert-mlm": "AutoModelForMaskedLM",
        "bert-causal": "AutoModelForCausalLM",
    }
    folders = {}
    for case, auto_name in cases.items():
        model = make(case)
        compact, expanded = tmp_path / f"{case}-compact", tmp_path / f"{case}-plain"
        model.save_pretrained(compact)
        save_tokenizer(compact)
        assert expand(compact, expanded) == expanded  # from a folder this time
        assert (expanded / "tokenizer.json").is_file() and (expanded / "tokenizer_config.json").is_file()
        ids = input_ids()
        torch.save({"ids": ids, "logits": output(model, ids)}, expanded / "expected.pt")
        folders[str(expanded)] = (auto_name, STOCK_CLASS[type(model)].__name__)

    code = STOCK_CHECK.replace("CASES", repr([(folder, auto) for folder, (auto, _) in folders.items()]))
    result = run_python(code, cwd=outside_repo)
    assert result.returncode == 0, result.stderr
    results = subprocess_results(result.stdout)
    assert set(results) == set(folders), result.stdout + result.stderr
    for r in results.values():
        assert r["cls"] == folders[r["folder"]][1]
        assert r["module"].startswith("transformers.models.")
        assert r["diff"] <= 1e-6
        assert r["tokens"] == [5, 7, 9]


# ---- from_stock -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_from_stock_live_model(case):
    stock = stock_copy(make(case, None))
    ids = input_ids()
    before = {n: p.detach().clone() for n, p in stock.named_parameters()}

    model = from_stock(stock)
    assert type(model) is CASES[case][0]
    assert model.tie_map == list(range(6))
    assert max_diff(output(model, ids), output(stock, ids)) == 0.0
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.parameters(), stock.parameters()))

    tied = from_stock(stock, tie_map=TIED_MAP, tie_mode="follow")
    assert tied.tie_map == TIED_MAP and tied.config.tie_mode == "follow"
    assert max_diff(output(tied, ids), output(stock_copy(tied), ids)) <= 1e-5
    assert all(torch.equal(p, before[n]) for n, p in stock.named_parameters())  # the source is untouched


@pytest.mark.parametrize("case", ["gpt2-lm", "bert-mlm"])
def test_from_stock_folder_and_back(case, tmp_path):
    original = make(case)
    expand(original, tmp_path / "plain")
    with captured_warnings() as messages:
        untied = from_stock(tmp_path / "plain")
    assert messages == []
    assert type(untied) is type(original) and untied.tie_map == list(range(6))
    ids = input_ids()
    assert max_diff(output(untied, ids), output(original, ids)) == 0.0

    # the plain folder of a tied model re-ties to its map without losing anything
    retied = from_stock(str(tmp_path / "plain"), tie_map=TIED_MAP)
    assert retied.tie_map == TIED_MAP
    assert all(torch.equal(p, q) for p, q in zip(retied.state_dict().values(), original.state_dict().values()))
    assert retied.tie_summary() == original.tie_summary()


# ---- errors ---------------------------------------------------------------------------------------


def test_unsupported_inputs_are_refused_with_the_supported_list(tmp_path):
    dyntie = make("gpt2-lm")
    stock = stock_copy(dyntie)
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as info:
        expand(stock, tmp_path / "x")
    assert "DynTieBertForMaskedLM" in str(info.value)
    with pytest.raises(ValueError, match="BertForMaskedLM"):
        from_stock(dyntie)
    with pytest.raises(ValueError, match="Supported"):
        from_stock(torch.nn.Linear(2, 2))

    OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              ffn_dim=64).save_pretrained(tmp_path / "opt")  # a family families.py does not list
    with pytest.raises(ValueError, match="BertConfig") as info:
        from_stock(tmp_path / "opt")
    assert "LlamaConfig" in str(info.value)
    with pytest.raises(ValueError, match="dyntie_gpt2") as info:
        expand(tmp_path / "opt", tmp_path / "y")
    assert "dyntie_llama" in str(info.value)

    stock.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a DynTie"):
        expand(tmp_path / "plain", tmp_path / "z")

