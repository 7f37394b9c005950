"""Every family of ``hf_dyntie.families.FAMILIES`` (GPT-2, BERT, Llama, Qwen2, Mistral): the tests run per
table entry and per head, so a new entry is covered by adding it.

What each family must show: the identity map is the stock model (keys and outputs); tied outputs and
gradients equal a stock model holding copies; cached generation equals uncached (sdpa and eager, grouped-
query attention included); compact save / reload without warnings, for the heads and for the base model
inside a head; ``trust_remote_code`` where hf_dyntie is not importable; expand / from_stock; a live retie
keeps the parameter set. Plus the generic leaf routing for leaf classes nobody declared.
"""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
import transformers
from safetensors import safe_open
from torch import nn

import hf_dyntie
from hf_dyntie.convert import expand, from_stock
from hf_dyntie.families import CAUSAL_LM, FAMILIES, family_named, family_of_class, model_types
from hf_dyntie.modeling_dyntie import DynTieMixin
from hf_dyntie.tying import TieableLeaf, make_tieable, parameter_leaves, route_layers, share_storage

from conftest import (
    STOCK_CLASS,
    TIED_MAP,
    VOCAB,
    captured_warnings,
    input_ids,
    max_diff,
    randomize_layers,
    retie_tour,
    run_python,
    stock_config,
    stock_copy,
    subprocess_results,
)
from test_scripts import corpus  # noqa: F401  (a session fixture: the tiny text corpus and its tokenizers)

ATOL = 1e-5
CASES = [pytest.param(family, head, id=f"{family.name}-{head.dyntie}") for family in FAMILIES for head in family.heads]
FAMILY_CASES = [pytest.param(family, id=family.name) for family in FAMILIES]
CAUSAL_FAMILIES = [pytest.param(family, id=family.name) for family in FAMILIES if family.head(CAUSAL_LM)]

# Small enough to run every family in seconds; fields a family's config does not have are left out.
# 4 query heads over 2 key/value heads: grouped-query attention wherever the family has it.
TINY = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    attention_dropout=0.0,
)


def tiny_config(family, head=None, tie_map=TIED_MAP, **overrides):
    known = family.stock_config()
    fields = {k: v for k, v in TINY.items() if hasattr(known, k)}
    if head is not None and head.auto_class == CAUSAL_LM and hasattr(known, "is_decoder") and family.head("AutoModelForMaskedLM"):
        fields["is_decoder"] = True  # an encoder family as a causal LM
    if head is not None and "Classification" in head.auto_class:
        fields["num_labels"] = 3
    return family.config_class()(**fields, tie_map=tie_map, **overrides)


def make(family, head, tie_map=TIED_MAP, seed=0, **overrides):
    torch.manual_seed(seed)
    model = family.dyntie_class(head)(tiny_config(family, head, tie_map, **overrides)).eval()
    randomize_layers(model, seed=seed + 1)  # distinct values everywhere, norms included
    return model


def output(model, ids):
    result = model(ids)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def stored_keys(folder) -> set[str]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return set(f.keys())


# ---- the table ------------------------------------------------------------------------------------


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


# ---- equal to the stock model ---------------------------------------------------------------------


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


# ---- checkpoints ----------------------------------------------------------------------------------


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


# ---- retie ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_retie_keeps_the_parameter_set(family):
    model = make(family, family.head(CAUSAL_LM), tie_map=None).train()
    for ids in retie_tour(model):
        with torch.no_grad():
            assert max_diff(model.eval()(ids).logits, stock_copy(model)(ids).logits) <= ATOL
        model.train()


# ---- leaves of any kind ---------------------------------------------------------------------------


class ScaledTanh(nn.Module):
    """A leaf class no table or mapping knows: it owns a parameter and reads it in its own forward."""

    def __init__(self, width: int):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(width))

    def forward(self, x):
        return torch.tanh(x) * self.gain


def small_stack() -> nn.ModuleList:
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), ScaledTanh(4)) for _ in range(3))
    for layer in layers:
        make_tieable(layer)
    return layers


def run_stack(layers, x):
    for layer in layers:
        x = layer(x)
    return x


@pytest.mark.parametrize("tie_mode", ["share", "follow"])
def test_an_unseen_leaf_class_routes_to_its_root(tie_mode):
    layers = small_stack()
    leaf = layers[2][1]
    assert isinstance(leaf, ScaledTanh) and isinstance(leaf, TieableLeaf) and type(leaf).__name__ == "TieableScaledTanh"
    reference = copy.deepcopy(layers)  # untied copy with layer 2 holding layer 0's weights
    reference[2].load_state_dict(layers[0].state_dict())
    route_layers(reference, [0, 1, 2], tie_mode)

    tie_map = [0, 1, 0]
    share_storage(layers, tie_map)
    route_layers(layers, tie_map, tie_mode)
    own = leaf.gain
    x = torch.randn(2, 4)
    out = run_stack(layers, x)
    assert max_diff(out, run_stack(reference, x)) <= 1e-6
    assert leaf.gain is own and leaf._parameters["gain"] is own  # outside forward a leaf is its stock self
    out.sum().backward()
    assert layers[2][1].gain.grad is None  # tied: the position's own parameter gets nothing
    run_stack(reference, x).sum().backward()
    expected = reference[0][1].gain.grad + (reference[2][1].gain.grad if tie_mode == "share" else 0)
    assert max_diff(layers[0][1].gain.grad, expected) <= 1e-6


def test_tieable_leaves_copy_and_pickle():
    layers = small_stack()
    route_layers(layers, [0, 0, 2], "share")
    for clone in (copy.deepcopy(layers), pickle.loads(pickle.dumps(layers))):
        assert [type(m).__name__ for _, m in parameter_leaves(clone[1])] == ["TieableLinear", "TieableScaledTanh"]
        x = torch.randn(2, 4)
        assert max_diff(run_stack(clone, x), run_stack(layers, x)) == 0.0


# ---- the training scripts -------------------------------------------------------------------------


def tiny_overrides(family) -> str:
    """``--config_overrides`` for a 4-layer tiny model of ``family``, in the field names it knows."""
    known = family.stock_config()
    fields = dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=64)
    return ",".join(f"{k}={v}" for k, v in fields.items() if hasattr(known, k))


def clm_from_scratch(corpus, out, family, *extra):
    from test_scripts import clm_args

    argv = clm_args(corpus, out, *extra)
    argv[argv.index("--model_type") + 1] = family.model_type
    argv[argv.index("--config_overrides") + 1] = tiny_overrides(family)
    return argv


def check_run(out, family, num_layers=4):
    from test_scripts import check_compact_checkpoint, read_results

    results = read_results(out)
    assert json.loads((out / "config.json").read_text())["model_type"] == family.model_type
    assert len(results["final_tie_map"]) == num_layers
    check_compact_checkpoint(out, transformers.AutoModelForCausalLM, results)
    return results


def test_clm_script_trains_a_llama_from_scratch(corpus, tmp_path):
    from test_scripts import CLM, run_in_process

    family = family_named("llama")
    out = tmp_path / "llama"
    assert run_in_process(CLM, clm_from_scratch(corpus, out, family)) == 0  # the Q-learning agent, the default
    check_run(out, family)
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out)).__name__ == "DynTieLlamaForCausalLM"


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["qlearning", "grow", "greedy"])
@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_clm_script_trains_every_family(family, policy, corpus, tmp_path):
    from test_scripts import CLM, run_in_process

    out = tmp_path / f"{family.name}-{policy}"
    extra = {"qlearning": (), "grow": ("--tie_budget", "3"), "greedy": ("--tie_score_tokens", "64")}[policy]
    assert run_in_process(CLM, clm_from_scratch(corpus, out, family, "--tie_policy", policy, *extra)) == 0
    results = check_run(out, family)
    if policy == "grow":
        assert results["final_unique_layers"] > 1


def test_clm_script_brings_a_stock_llama_in_untied(corpus, tmp_path):
    """--model_name_or_path of a stock LlamaForCausalLM folder, --tie_init model: it starts untied, computing
    exactly what the stock model computes."""
    from test_scripts import CLM, clm_args, run_in_process

    tokenizer = transformers.AutoTokenizer.from_pretrained(corpus / "tok_clm")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path / "stock-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    from hf_dyntie.scripts.arguments import CAUSAL_LM as CLM_TASK, ModelArguments
    from hf_dyntie.scripts.models import build_model

    model = build_model(ModelArguments(model_name_or_path=str(folder)), tokenizer, CLM_TASK).eval()
    assert type(model).__name__ == "DynTieLlamaForCausalLM" and model.tie_map == [0, 1, 2]
    stock = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, stock(ids).logits)

    out = tmp_path / "from-stock"
    argv = clm_args(corpus, out, "--max_steps", "4", "--tie_init", "model", "--tie_policy", "greedy",
                    "--tie_score_tokens", "64")
    for flag in ("--model_type", "--config_overrides", "--tokenizer_name"):  # the checkpoint brings all three
        i = argv.index(flag)
        del argv[i : i + 2]
    assert run_in_process(CLM, ["--model_name_or_path", str(folder), *argv]) == 0
    results = check_run(out, family_named("llama"), num_layers=3)
    # the history starts with the start map (the checkpoint's own, untied); greedy's first decision (step 0)
    # scored the single ties of that map
    start, first = (json.loads(line) for line in (out / "tie_history.jsonl").read_text().splitlines()[:2])
    assert start["step"] == 0 and start["tie_map"] == [0, 1, 2] and start["action"] is None
    assert first["step"] == 0 and {tuple(c["tie_map"]) for c in first["scores"]} >= {(0, 0, 2), (0, 1, 0), (0, 1, 1)}
    assert results["final_unique_layers"] >= 2


# ---- DynTieTrainer --------------------------------------------------------------------------------


def tiny_llama(seed: int = 0):
    """A 6-layer Llama over bytes (vocab 256), for the trainer."""
    from test_trainer import BLOCK

    torch.manual_seed(seed)
    config = hf_dyntie.DynTieLlamaConfig(
        vocab_size=256, hidden_size=32, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=BLOCK, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return hf_dyntie.DynTieLlamaForCausalLM(config)


def _all_policies() -> list[str]:
    from hf_dyntie.training.policies import POLICIES

    return [name for name in POLICIES if name != "replay"] + ["replay"]  # replay follows the qlearning run


@pytest.mark.parametrize(
    "policies",
    [pytest.param(["qlearning", "grow", "greedy", "untied", "all_tied", "replay"], id="main"),
     pytest.param(_all_policies(), id="all", marks=pytest.mark.slow)],
)
def test_trainer_runs_every_policy_on_llama(policies, tmp_path):
    from test_trainer import OptimizerHygiene, byte_blocks, make_args

    from hf_dyntie.training.history import HISTORY_NAME
    from hf_dyntie.training.trainer import DynTieTrainer

    data = byte_blocks()
    extra = {"greedy": dict(tie_score_tokens=64), "grow": dict(tie_budget=3), "sequence": dict(tie_unique_layers=2),
             "cycle": dict(tie_unique_layers=2), "cycle_rev": dict(tie_unique_layers=2),
             "shrink": dict(tie_budget=4, tie_interval=1)}
    final_maps = {}
    for policy in policies:
        options = extra.get(policy) or {}
        if policy == "replay":  # replays the Q-learning run's decisions
            options = dict(tie_replay_file=str(tmp_path / "qlearning" / HISTORY_NAME))
        hygiene = OptimizerHygiene()
        args = make_args(tmp_path / policy, max_steps=6, tie_policy=policy, **options)
        trainer = DynTieTrainer(model=tiny_llama(), args=args, train_dataset=data,
                                eval_dataset=data.select(range(8)), callbacks=[hygiene])
        hygiene.trainer = trainer
        trainer.train()
        model = trainer.dyntie_model
        assert type(model).__name__ == "DynTieLlamaForCausalLM", policy
        assert len(hygiene.group_sizes) == 1, policy  # the optimizer's parameter groups never changed
        summary = trainer.dyntie_summary()
        assert summary["final_tie_map"] == model.tie_map and 1 <= summary["final_unique_layers"] <= 6, policy
        final_maps[policy] = model.tie_map
    assert final_maps["replay"] == final_maps["qlearning"]
    assert final_maps["untied"] == list(range(6)) and final_maps["all_tied"] == [0] * 6


def test_trainer_resumes_a_llama_exactly(tmp_path):
    from test_trainer import byte_blocks, make_args

    from hf_dyntie.training.trainer import DynTieTrainer

    def run(resume=None):
        args = make_args(tmp_path / "run", max_steps=8, save_strategy="steps", save_steps=4, logging_steps=1)
        trainer = DynTieTrainer(model=tiny_llama(), args=args, train_dataset=byte_blocks())
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run()
    resumed = run(resume=str(tmp_path / "run" / "checkpoint-4"))
    assert full.dyntie_model.tie_map == resumed.dyntie_model.tie_map
    a, b = full.dyntie_model.state_dict(), resumed.dyntie_model.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert full.history.records == resumed.history.records


@pytest.mark.slow
def test_two_processes_train_a_llama_alike(tmp_path):
    """torchrun --nproc_per_node 2 (gloo) on a Llama: the same tie map at every step and the same weights."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from conftest import REPO_ROOT

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           str(REPO_ROOT / "tests" / "ddp_families_worker.py"), str(tmp_path)]
    subprocess.run(cmd, check=True, env=env, timeout=600, cwd=REPO_ROOT)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0["maps"]) >= 5 and r0["maps"] == r1["maps"] and len({tuple(m) for m in r0["maps"]}) > 1
    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)


@pytest.mark.slow
def test_benchmarks_have_llama_rows(tmp_path):
    """speed.py and memory.py --family llama (quick): the step rows, and training state = roots-only minimum."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    def run(script, *extra):
        cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / script), "--quick", "--family", "llama",
               "--output", str(tmp_path), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((tmp_path / f"{script.removesuffix('.py')}_llama_quick.json").read_text())

    rows = {r["row"]: r for r in run("speed.py", "--skip-trainer")["steps"]}
    assert {"identity / share", "75% tied / share", "75% tied / follow"} <= set(rows)
    memory = {r["map"]: r for r in run("memory.py", "--in-process")["rows"]}
    assert memory["stock"]["measured_bytes"] == memory["untied"]["measured_bytes"]
    assert all(r["within_5pct"] for r in memory.values())
    assert memory["all shared"]["measured_bytes"] < memory["50% tied"]["measured_bytes"] < memory["untied"]["measured_bytes"]
