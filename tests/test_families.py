"""Every family of ``hf_dyntie.families.FAMILIES`` (GPT-2, BERT, Llama, Qwen2, Mistral): the tests run per
table entry and per head, so a new entry is covered by adding it.

What each family must show: the identity map is the stock model (keys and outputs); tied outputs and
gradients equal a stock model holding copies; cached generation equals uncached (sdpa and eager, grouped-
query attention included); compact save / reload without warnings, for the heads and for the base model
inside a head; ``trust_remote_code`` where hf_dyntie is not importable; expand / from_stock; a live retie
keeps the parameter set. Training every family (the scripts, DynTieTrainer, two processes):
test_families_training.py; leaves nobody declared: test_leaves.py.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from torch import nn

import hf_dyntie
from helpers import (
    CAUSAL_FAMILIES,
    STOCK_CLASS,
    TIED_MAP,
    captured_warnings,
    input_ids,
    make,
    max_diff,
    retie_tour,
    run_python,
    stock_config,
    stock_copy,
    subprocess_results,
    tiny_config,
)
from hf_dyntie.convert import expand, from_stock
from hf_dyntie.families import CAUSAL_LM, FAMILIES, family_named, family_of_class, model_types
from hf_dyntie.modeling_dyntie import DynTieMixin


ATOL = 1e-5


CASES = [pytest.param(family, head, id=f"{family.name}-{head.dyntie}") for family in FAMILIES for head in family.heads]


FAMILY_CASES = [pytest.param(family, id=family.name) for family in FAMILIES]


def output(model, ids):
    result = model(ids)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def stored_keys(folder) -> set[str]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return set(f.keys())


# ---- the table -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_table_agrees_with_the_classes(family):
    config_class = family.config_class()
    assert config_class.model_type == family.model_type == f"dyntie_{family.name}"
    assert issubclass(config_class, family.stock_config)
    assert getattr(hf_dyntie, family.config) is config_class
    assert type(transformers.AutoConfig.for_model(family.model_type)) is config_class
    assert family_named(family.name) is family_named(family.model_type) is family
    assert family.head("AutoModel") is family.base
    config = tiny_config(family)
    for head in family.heads:
        cls = family.dyntie_class(head)
        assert getattr(hf_dyntie, head.dyntie) is cls
        assert issubclass(cls, DynTieMixin) and issubclass(cls, head.stock) and cls.config_class is config_class
        assert family_of_class(cls) == (family, head)
        assert cls._dyntie_auto_map == family.auto_map() and cls._dyntie_auto_map[head.auto_class].endswith(head.dyntie)
        auto_class = getattr(transformers, head.auto_class)
        assert auto_class._model_mapping[config_class] is cls  # registered from the table
    model = family.dyntie_class(family.base)(config)
    assert isinstance(model.dyntie_layers, nn.ModuleList) and len(model.dyntie_layers) == 6
    assert family.model_type in model_types()


# ---- equal to the stock model --------------------------------------------------------------------


@pytest.mark.parametrize(("family", "head"), CASES)
def test_identity_map_is_the_stock_model(family, head):
    model = make(family, head, tie_map=None)
    assert model.tie_map == list(range(6))
    stock_class = STOCK_CLASS[type(model)]
    assert stock_class is head.stock
    torch.manual_seed(0)
    fresh_stock = stock_class(stock_config(model.config))  # built by transformers, not copied from ours
    assert list(model.state_dict()) == list(fresh_stock.state_dict())  # same keys, same order
    ids = input_ids()
    with torch.no_grad():
        assert max_diff(output(model, ids), output(stock_copy(model), ids)) <= ATOL


@pytest.mark.parametrize("tie_mode", ["share", "follow"])
@pytest.mark.parametrize(("family", "head"), CASES)
def test_tied_outputs_and_gradients_equal_a_stock_copy(family, head, tie_mode):
    model = make(family, head, tie_mode=tie_mode).train()
    stock = stock_copy(model)
    ids = input_ids()
    ours, theirs = output(model, ids), output(stock, ids)
    assert max_diff(ours, theirs) <= ATOL
    with torch.no_grad():
        assert max_diff(ours, output(make(family, head, tie_map=None), ids)) > 1e-4  # the map matters
    ours.float().pow(2).mean().backward()
    theirs.float().pow(2).mean().backward()

    stock_layers = stock.get_submodule(model._dyntie_layers_path)
    for i, r in enumerate(TIED_MAP):
        grads = {n: p.grad for n, p in model.dyntie_layers[i].named_parameters()}
        if r != i:
            assert all(g is None for g in grads.values()), f"tied position {i} got a gradient"
            continue
        users = [p for p, root in enumerate(TIED_MAP) if root == r] if tie_mode == "share" else [r]
        for name, grad in grads.items():
            expected = sum(dict(stock_layers[p].named_parameters())[name].grad for p in users)
            assert max_diff(grad, expected) <= ATOL, f"layer {r} {name}"
    stack = {id(p) for p in model.dyntie_layers.parameters()}
    stock_params = dict(stock.named_parameters())
    for name, p in model.named_parameters():
        if id(p) not in stack and p.grad is not None:
            assert max_diff(p.grad, stock_params[name].grad) <= ATOL, name


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_cached_generation_equals_uncached(family, attn):
    head = family.head(CAUSAL_LM)
    model = make(family, head, attn_implementation=attn)
    assert model.config._attn_implementation == attn
    prompt = input_ids(batch=2, length=5)
    settings = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
        assert cache.get_seq_length() == 5 and len(cache.layers) == 6  # one slot per position
        cached = model.generate(prompt, use_cache=True, **settings)
        uncached = model.generate(prompt, use_cache=False, **settings)
        stock = stock_copy(model).generate(prompt, use_cache=True, **settings)
    assert cached.shape == (2, 21)
    assert torch.equal(cached, uncached) and torch.equal(cached, stock)


@pytest.mark.parametrize(
    ("name", "window"),
    [("mistral", {"sliding_window": 3}), ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 2})],
)
def test_sliding_window_follows_the_position(name, window):
    """Positions with windowed and full attention may share weights; each keeps its own attention type."""
    family = family_named(name)
    model = make(family, family.head(CAUSAL_LM), **window)
    if name == "qwen2":  # layers from max_window_layers on use the window
        assert model.config.layer_types[:2] == ["full_attention"] * 2 and model.config.layer_types[2] == "sliding_attention"
    prompt = input_ids(batch=2, length=6)
    settings = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **settings)
        uncached = model.generate(prompt, use_cache=False, **settings)
        stock = stock_copy(model).generate(prompt, use_cache=True, **settings)
        ids = input_ids(length=12)
        assert max_diff(output(model, ids), output(stock_copy(model), ids)) <= ATOL
    assert torch.equal(cached, uncached) and torch.equal(cached, stock)


# ---- checkpoints ---------------------------------------------------------------------------------


def roots_only(model) -> set[str]:
    """The keys a compact checkpoint holds: everything but tied positions and heads tied to the embedding."""
    prefix = model._dyntie_layers_path + "."
    tied = {str(i) for i, r in enumerate(model.tie_map) if r != i}
    head_ties = set(model._tied_weights_keys or {}) if getattr(model.config, "tie_word_embeddings", False) else set()
    return {k for k in model.state_dict() if k not in head_ties
            and not (k.startswith(prefix) and k[len(prefix):].split(".")[0] in tied)}


@pytest.mark.parametrize(("family", "head"), CASES)
def test_compact_save_and_reload(family, head, tmp_path):
    model = make(family, head)
    ids = input_ids()
    with torch.no_grad():
        expected = output(model, ids)
    with captured_warnings() as messages:
        model.save_pretrained(tmp_path)
    assert messages == []
    assert stored_keys(tmp_path) == roots_only(model)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == family.model_type and config["tie_map"] == TIED_MAP

    with captured_warnings() as messages:
        loaded = getattr(transformers, head.auto_class).from_pretrained(tmp_path).eval()
    assert messages == []
    assert type(loaded) is type(model) and loaded.tie_map == TIED_MAP
    with torch.no_grad():
        assert max_diff(output(loaded, ids), expected) == 0.0
    for i, r in enumerate(TIED_MAP):
        for p, q in zip(loaded.dyntie_layers[i].parameters(), loaded.dyntie_layers[r].parameters()):
            assert p.data_ptr() == q.data_ptr()


HEADS_WITH_A_BASE = [
    pytest.param(family, head, id=f"{family.name}-{head.dyntie}") for family in FAMILIES for head in family.heads[1:]
]


@pytest.mark.parametrize(("family", "head"), HEADS_WITH_A_BASE)
def test_base_model_inside_a_head_saves_compactly(family, head, tmp_path):
    model = make(family, head)
    base = model.base_model
    assert base is not model and type(base) is family.dyntie_class(family.base)
    assert base.tie_map == TIED_MAP and list(model.state_dict())  # one model, two views of the same map
    model.retie([0, 0, 0, 3, 3, 5])
    assert base.tie_map == [0, 0, 0, 3, 3, 5]
    base.retie(TIED_MAP)  # either side may retie: it is one map
    assert model.tie_map == TIED_MAP == model.config.tie_map
    ids = input_ids()
    with torch.no_grad():
        expected = base(ids).last_hidden_state
    with captured_warnings() as messages:
        base.save_pretrained(tmp_path)
    assert messages == []
    assert stored_keys(tmp_path) == roots_only(base)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [family.base.dyntie]
    with captured_warnings() as messages:
        loaded, info = transformers.AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    # what stock transformers reports for the stock base model saved the same way (BERT's masked LM has no
    # pooler in its inner BertModel, so BertModel reloads without one: the same two keys missing for both)
    stock_copy(model).base_model.save_pretrained(tmp_path / "stock")
    _, stock_info = transformers.AutoModel.from_pretrained(tmp_path / "stock", output_loading_info=True)
    assert set(info["missing_keys"]) == set(stock_info["missing_keys"])
    assert not [k for k in info["missing_keys"] if k.startswith(base._dyntie_layers_path + ".")]
    if not stock_info["missing_keys"]:
        assert messages == []
    loaded.eval()
    assert type(loaded) is type(base) and loaded.tie_map == TIED_MAP
    with torch.no_grad():
        assert max_diff(loaded(ids).last_hidden_state, expected) == 0.0


@pytest.mark.parametrize(("family", "head"), CASES)
def test_expand_and_from_stock(family, head, tmp_path):
    model = make(family, head)
    ids = input_ids()
    with torch.no_grad():
        expected = output(model, ids)
    with captured_warnings() as messages:
        expand(model, tmp_path / "plain")
        plain = head.stock.from_pretrained(tmp_path / "plain").eval()
    assert messages == []
    assert type(plain) is head.stock
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["model_type"] == family.name
    with torch.no_grad():
        assert max_diff(output(plain, ids), expected) <= 1e-6

    untied = from_stock(plain)
    assert type(untied) is type(model) and untied.tie_map == list(range(6))
    retied = from_stock(tmp_path / "plain", tie_map=TIED_MAP)
    assert type(retied) is type(model) and retied.tie_map == TIED_MAP
    with torch.no_grad():
        assert max_diff(output(untied.eval(), ids), expected) <= 1e-6
        assert max_diff(output(retied.eval(), ids), expected) <= 1e-6


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_cli_expands_to_the_stock_class(family, tmp_path, capsys):
    from hf_dyntie.cli import main

    head = family.head(CAUSAL_LM)
    make(family, head).save_pretrained(tmp_path / "tied")
    assert main(["inspect", str(tmp_path / "tied"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == head.dyntie and info["unique_layers"] == 3
    assert main(["expand", str(tmp_path / "tied"), str(tmp_path / "plain")]) == 0
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["architectures"] == [head.stock.__name__] and "tie_map" not in config


REMOTE_CODE_CHECK = """
import json, torch
import transformers
for folder, auto_name in CASES:
    auto_class = getattr(transformers, auto_name)
    model = auto_class.from_pretrained(folder, trust_remote_code=True).eval()
    expected = torch.load(folder + "/expected.pt")
    with torch.no_grad():
        diff = (model(expected["ids"]).logits - expected["logits"]).abs().max().item()
    layers = model.dyntie_layers
    shared = all(p.data_ptr() == q.data_ptr() for i, r in enumerate(model.tie_map)
                 for p, q in zip(layers[i].parameters(), layers[r].parameters()))
    print("\\nRESULT " + json.dumps(dict(folder=folder, module=type(model).__module__, tie_map=model.tie_map,
                                         diff=diff, shared=shared, base=type(model.base_model).__name__)))
"""


def test_trust_remote_code_without_hf_dyntie(tmp_path, outside_repo):
    """Every family's LM head, saved with its code, loads on a machine without hf_dyntie."""
    folders = {}
    for family in FAMILIES:
        head = family.default_head(tiny_config(family))
        cls = family.dyntie_class(head)
        before = (cls.__dict__.get("_auto_class"), cls.config_class.__dict__.get("_auto_class"))
        cls.register_for_auto_class(head.auto_class)
        try:
            model = make(family, head)
            folder = tmp_path / family.name
            model.save_pretrained(folder)
        finally:
            cls._auto_class, cls.config_class._auto_class = before
        ids = input_ids()
        with torch.no_grad():
            torch.save({"ids": ids, "logits": model(ids).logits}, folder / "expected.pt")
        assert (folder / f"{family.module}.py").is_file() and (folder / "families.py").is_file()
        assert json.loads((folder / "config.json").read_text())["auto_map"] == family.auto_map()
        folders[str(folder)] = (head.auto_class, family.base.dyntie)

    code = REMOTE_CODE_CHECK.replace("CASES", repr([(f, auto) for f, (auto, _) in folders.items()]))
    result = run_python(code, cwd=outside_repo)
    assert result.returncode == 0, result.stderr[-3000:]
    results = subprocess_results(result.stdout)
    assert set(results) == set(folders), result.stdout + result.stderr
    for folder, checked in results.items():
        assert checked["module"].startswith("transformers_modules"), checked
        assert checked["tie_map"] == TIED_MAP and checked["shared"] and checked["diff"] <= 1e-6, checked
        assert checked["base"] == folders[folder][1]  # the inner base model is the DynTie one there too


# ---- retie ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_retie_keeps_the_parameter_set(family):
    model = make(family, family.head(CAUSAL_LM), tie_map=None).train()
    for ids in retie_tour(model):
        with torch.no_grad():
            assert max_diff(model.eval()(ids).logits, stock_copy(model)(ids).logits) <= ATOL
        model.train()
