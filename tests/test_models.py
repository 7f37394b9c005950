"""DynTie models compute what the stock model with copied weights computes, train the way tie_mode says,
generate the same with and without a KV cache, and re-tie without disturbing an optimizer."""

from __future__ import annotations

import pytest
import torch

from hf_dyntie import (
    DynTieBertConfig,
    DynTieBertForMaskedLM,
    DynTieBertLMHeadModel,
    DynTieGPT2Config,
    DynTieGPT2LMHeadModel,
)

from hf_dyntie.tie_map import num_unique_layers, trainable_parameters

from helpers import (
    MODEL_CASES,
    TIED_MAP,
    bert_config,
    build,
    gpt2_config,
    input_ids,
    make_case,
    max_diff,
    retie_tour,
    stock_copy,
)

ATOL = 1e-5

LM_CASES = ["gpt2-lm", "bert-mlm", "bert-causal"]


def make(case: str, tie_map: list[int] | None, **fields):
    return make_case(case, tie_map, **fields)


def main_output(outputs) -> torch.Tensor:
    return outputs.logits if hasattr(outputs, "logits") else outputs.last_hidden_state


def lm_labels(case: str, ids: torch.Tensor) -> torch.Tensor:
    """Causal models shift labels themselves; for MLM score a few positions and ignore the rest."""
    if case != "bert-mlm":
        return ids
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    return labels


# ---- equivalence with the stock model -------------------------------------------------------------


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_identity_map_equals_stock(case):
    model = make(case, None)
    assert model.tie_map == list(range(6))
    stock = stock_copy(model)
    ids = input_ids()
    with torch.no_grad():
        assert max_diff(main_output(model(ids)), main_output(stock(ids))) <= ATOL


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_tied_map_equals_stock_copy(case):
    model = make(case, TIED_MAP)
    stock = stock_copy(model)
    ids = input_ids()
    with torch.no_grad():
        assert max_diff(main_output(model(ids)), main_output(stock(ids))) <= ATOL
    untied_model_output = main_output(make(case, None)(ids))  # the tie map does change what is computed
    assert max_diff(main_output(model(ids)), untied_model_output) > 1e-3


@pytest.mark.parametrize("case", LM_CASES)
def test_tied_loss_equals_stock_copy(case):
    model = make(case, TIED_MAP)
    stock = stock_copy(model)
    ids = input_ids()
    labels = lm_labels(case, ids)
    with torch.no_grad():
        ours, theirs = model(ids, labels=labels), stock(ids, labels=labels)
    assert max_diff(ours.loss, theirs.loss) <= ATOL
    assert max_diff(ours.logits, theirs.logits) <= ATOL


@pytest.mark.parametrize("case", ["gpt2-lm", "bert-mlm"])
def test_hidden_states_follow_positions(case):
    model = make(case, TIED_MAP)
    stock = stock_copy(model)
    ids = input_ids()
    with torch.no_grad():
        ours = model(ids, output_hidden_states=True).hidden_states
        theirs = stock(ids, output_hidden_states=True).hidden_states
    assert len(ours) == model.config.num_hidden_layers + 1 == 7
    for a, b in zip(ours, theirs):
        assert max_diff(a, b) <= ATOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_scale_attn_by_inverse_layer_idx_uses_the_position(attn):
    model = make("gpt2-lm", TIED_MAP, scale_attn_by_inverse_layer_idx=True, attn_implementation=attn)
    stock = stock_copy(model)
    assert stock.config.scale_attn_by_inverse_layer_idx
    ids = input_ids()
    with torch.no_grad():
        assert max_diff(model(ids).logits, stock(ids).logits) <= ATOL
        # the scaling matters: the same weights without it compute something else
        plain = make("gpt2-lm", TIED_MAP, attn_implementation=attn)
        assert max_diff(model(ids).logits, plain(ids).logits) > 1e-4


# ---- gradients under tie_mode ---------------------------------------------------------------------


def layer_grads(model, position: int) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in model.dyntie_layers[position].named_parameters()}


@pytest.mark.parametrize("tie_mode", ["share", "follow"])
@pytest.mark.parametrize("case", ["gpt2-lm", "bert-mlm"])
def test_gradients_follow_tie_mode(case, tie_mode):
    model = make(case, TIED_MAP, tie_mode=tie_mode).train()
    stock = stock_copy(model)
    ids = input_ids()
    labels = lm_labels(case, ids)
    model(ids, labels=labels).loss.backward()
    stock(ids, labels=labels).loss.backward()
    stock_layers = stock.get_submodule(model._dyntie_layers_path)

    for i, r in enumerate(TIED_MAP):
        if r != i:
            assert all(g is None for g in layer_grads(model, i).values()), f"tied position {i} got a gradient"
            continue
        positions = [p for p, root in enumerate(TIED_MAP) if root == r] if tie_mode == "share" else [r]
        for name, grad in layer_grads(model, r).items():
            expected = sum(dict(stock_layers[p].named_parameters())[name].grad for p in positions)
            assert max_diff(grad, expected) <= ATOL, f"layer {r} {name}"

    # parameters outside the stack see every position's contribution in both modes
    stack = {id(p) for p in model.dyntie_layers.parameters()}
    stock_params = dict(stock.named_parameters())
    for name, p in model.named_parameters():
        if id(p) not in stack:
            assert max_diff(p.grad, stock_params[name].grad) <= ATOL, name


@pytest.mark.parametrize("tie_mode", ["share", "follow"])
def test_trainable_parameters_are_the_ones_that_get_gradients(tie_mode):
    """tie_summary's accounting is what actually trains: roots plus everything outside the stack."""
    model = make("bert-mlm", TIED_MAP, tie_mode=tie_mode).train()
    ids = input_ids()
    model(ids, labels=lm_labels("bert-mlm", ids)).loss.backward()
    with_grad = sum(p.numel() for p in model.parameters() if p.grad is not None)
    per_layer = sum(p.numel() for p in model.dyntie_layers[0].parameters())
    outside = sum(p.numel() for p in model.parameters()) - 6 * per_layer
    summary = model.tie_summary()
    assert summary["unique_layers"] == num_unique_layers(TIED_MAP) == 3
    assert with_grad == summary["trainable_parameters"] == trainable_parameters(TIED_MAP, per_layer, outside)
    assert summary["total_parameters"] == outside + 6 * per_layer


def test_share_and_follow_differ_only_in_root_gradients():
    """Sanity check of the test above: with ties, the two modes do give different root gradients."""
    grads = {}
    for mode in ("share", "follow"):
        model = make("gpt2-lm", TIED_MAP, tie_mode=mode).train()
        ids = input_ids()
        model(ids, labels=ids).loss.backward()
        grads[mode] = model.dyntie_layers[0].mlp.c_fc.weight.grad
    assert max_diff(grads["share"], grads["follow"]) > 1e-6


def test_tie_mode_property_reroutes_the_live_model():
    """Setting ``model.tie_mode`` gives the gradients of a model built in that mode; a bad mode changes nothing."""
    grads = {}
    for built, switched in (("follow", None), ("share", "follow")):
        model = make("gpt2-lm", TIED_MAP, tie_mode=built).train()
        if switched is not None:
            model.tie_mode = switched
        assert model.tie_mode == model.config.tie_mode == "follow"
        ids = input_ids()
        model(ids, labels=ids).loss.backward()
        grads[built] = model.dyntie_layers[0].mlp.c_fc.weight.grad
    assert max_diff(grads["share"], grads["follow"]) <= ATOL
    with pytest.raises(ValueError, match="tie_mode"):
        model.tie_mode = "mirror"
    assert model.tie_mode == "follow"


@pytest.mark.parametrize("tie_mode", ["share", "follow"])
@pytest.mark.parametrize("case", ["gpt2-lm", "bert-causal"])
def test_gradient_checkpointing_with_ties(case, tie_mode):
    model = make(case, TIED_MAP, tie_mode=tie_mode).train()
    ids = input_ids()

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss_plain, grads_plain = loss_and_grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_activation_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads()

    assert max_diff(loss_plain, loss_ckpt) <= ATOL
    assert grads_plain.keys() == grads_ckpt.keys()
    for name in grads_plain:
        if grads_plain[name] is None:
            assert grads_ckpt[name] is None, name
        else:
            assert max_diff(grads_plain[name], grads_ckpt[name]) <= ATOL, name


# ---- generation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", ["gpt2-lm", "bert-causal"])
def test_generate_with_cache_equals_without(case, attn):
    model = make(case, TIED_MAP, attn_implementation=attn)
    assert model.config._attn_implementation == attn
    prompt = input_ids(batch=2, length=5)
    settings = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values  # the cache really is used: one slot per position
        assert cache is not None and cache.get_seq_length() == 5 and len(cache.layers) == 6
        cached = model.generate(prompt, use_cache=True, **settings)
        uncached = model.generate(prompt, use_cache=False, **settings)
        stock = stock_copy(model).generate(prompt, use_cache=True, **settings)
    assert cached.shape == (2, 25)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, stock)


# ---- re-tying a live model ------------------------------------------------------------------------


def test_tie_then_untie_starts_from_the_former_root():
    model = make("gpt2-lm", None)
    layers = model.dyntie_layers
    model.retie([0, 1, 2, 1, 4, 5])  # position 3 now runs layer 1
    with torch.no_grad():  # the root trains on while 3 is tied
        for p in layers[1].parameters():
            p.add_(0.5)
    root_now = {n: p.detach().clone() for n, p in layers[1].named_parameters()}

    report = model.retie(list(range(6)))
    assert report.changes.untied == (3,)
    for name, p in layers[3].named_parameters():
        assert torch.equal(p, root_now[name]), name
        assert p.data_ptr() != dict(layers[1].named_parameters())[name].data_ptr()  # a copy, not an alias
    with torch.no_grad():  # and it trains on its own from here
        layers[1].mlp.c_fc.weight.add_(1.0)
    assert torch.equal(layers[3].mlp.c_fc.weight, root_now["mlp.c_fc.weight"])


def test_retie_reports_what_changed():
    model = make("bert-mlm", [0, 1, 1, 3, 3, 5])
    layers = model.dyntie_layers
    report = model.retie([0, 0, 0, 3, 4, 5])
    assert report.old_tie_map == [0, 1, 1, 3, 3, 5]
    assert report.new_tie_map == [0, 0, 0, 3, 4, 5] == model.tie_map == model.config.tie_map
    assert (report.changes.tied, report.changes.untied, report.changes.rerouted) == ((1,), (4,), (2,))
    assert {id(p) for p in report.moves.released} == {id(p) for p in layers[1].parameters()}
    assert [(id(p), id(q)) for p, q in report.moves.copied] == [
        (id(p), id(q)) for p, q in zip(layers[4].parameters(), layers[3].parameters())
    ]
    assert not model.retie(model.tie_map).changes.any


def test_retie_matches_a_model_built_with_that_map():
    model = make("gpt2-lm", None)
    model.retie(TIED_MAP)
    stock = stock_copy(model)
    ids = input_ids()
    with torch.no_grad():
        assert max_diff(model(ids).logits, stock(ids).logits) <= ATOL
    assert model.tie_summary()["unique_layers"] == 3


@pytest.mark.parametrize("bad", [[0, 0, 3, 0, 0, 0], [0, 0], [1, 0, 0, 0, 0, 0], [0, -1, 0, 0, 0, 0]])
def test_retie_rejects_invalid_maps_and_keeps_the_model(bad):
    model = make("gpt2-lm", TIED_MAP)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="tie_map"):
        model.retie(bad)
    assert model.tie_map == TIED_MAP == model.config.tie_map
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_optimizer_never_touches_tied_parameters():
    """One AdamW(weight_decay=0.1) step over *all* parameters must leave every tensor exactly where a step
    over the untied parameters alone leaves it: tied positions get no gradient, no state and no decay
    (decay applied through the alias would shrink their root)."""
    model, reference = make("gpt2-lm", TIED_MAP).train(), make("gpt2-lm", TIED_MAP).train()
    stack = model.dyntie_layers
    tied = [p for i, r in enumerate(TIED_MAP) if r != i for p in stack[i].parameters()]
    tied_ids = {id(p) for p in tied}
    ref_tied = {id(p) for i, r in enumerate(TIED_MAP) if r != i for p in reference.dyntie_layers[i].parameters()}

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_optimizer = torch.optim.AdamW(
        [p for p in reference.parameters() if id(p) not in ref_tied], lr=1e-2, weight_decay=0.1
    )
    ids = input_ids()
    for m, opt in ((model, optimizer), (reference, ref_optimizer)):
        m(ids, labels=ids).loss.backward()
        opt.step()

    assert all(p.grad is None for p in tied)
    assert all(len(optimizer.state.get(p, {})) == 0 for p in tied)
    after, expected = snapshot(model), snapshot(reference)
    for name in after:
        assert torch.equal(after[name], expected[name]), f"{name} moved differently"
    for i, r in enumerate(TIED_MAP):  # still aliases after the step
        for p, q in zip(stack[i].parameters(), stack[r].parameters()):
            assert p.data_ptr() == q.data_ptr()
    assert len(tied_ids) == 3 * 12


def test_optimizer_param_list_survives_retie():
    model = make("gpt2-lm", None).train()
    steps = list(retie_tour(model))  # asserts the parameter set and the optimizer's list after every retie
    assert len(steps) == 4


# ---- storage --------------------------------------------------------------------------------------


def assert_aliases_roots(model) -> None:
    layers = model.dyntie_layers
    for i, r in enumerate(model.tie_map):
        for (name, p), q in zip(layers[i].named_parameters(), layers[r].parameters()):
            assert p.shape == q.shape and p.dtype == q.dtype
            assert p.data_ptr() == q.data_ptr(), f"{i}.{name} does not alias layer {r}"


def test_tied_parameters_alias_root_storage_across_dtype_moves():
    model = make("gpt2-lm", TIED_MAP)
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids).logits
    assert_aliases_roots(model)
    model.to(torch.float64)
    assert model.transformer.h[1].attn.c_attn.weight.dtype == torch.float64
    assert_aliases_roots(model)
    with torch.no_grad():
        assert max_diff(model(ids).logits, expected) <= ATOL
    model.float()
    assert_aliases_roots(model)
    with torch.no_grad():
        assert max_diff(model(ids).logits, expected) <= ATOL
    storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storage) == len({id(p) for p in model.parameters()}) - 3 * 12  # tied positions add none


# ---- configs reject bad tie fields ----------------------------------------------------------------


@pytest.mark.parametrize("config_class", [DynTieGPT2Config, DynTieBertConfig])
@pytest.mark.parametrize(
    ("tie_map", "fragment"),
    [([0, 0, 0], "length 3"), ([0, 2, 0, 0, 0, 0], "tie_map[1] = 2"), ([0, 0, -1, 0, 0, 0], "tie_map[2] = -1"),
     ([0, 0.5, 0, 0, 0, 0], "tie_map[1] = 0.5"), ([3, 0, 0, 0, 0, 0], "tie_map[0] = 3")],
)
def test_config_rejects_invalid_tie_map(config_class, tie_map, fragment):
    layers = {"n_layer": 6} if config_class is DynTieGPT2Config else {"num_hidden_layers": 6}
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        config_class(tie_map=tie_map, **layers)


def test_config_normalises_chains_and_checks_tie_mode():
    assert DynTieGPT2Config(n_layer=3, tie_map=[0, 0, 1]).tie_map == [0, 0, 0]
    assert DynTieBertConfig(num_hidden_layers=3, tie_map=[0, 1, 1]).tie_map == [0, 1, 1]
    with pytest.raises(ValueError, match="tie_mode"):
        DynTieGPT2Config(n_layer=3, tie_mode="mirror")


@pytest.mark.parametrize("family", ["gpt2", "bert_causal", "bert_mlm"])
def test_loss_computes_without_warnings(family):
    """Every head picks its stock loss without transformers' 'unrecognized loss_type' warning."""
    from helpers import captured_warnings

    if family == "gpt2":
        model = build(DynTieGPT2LMHeadModel, gpt2_config([0, 0, 2, 0, 2, 5]))
    elif family == "bert_causal":
        model = build(DynTieBertLMHeadModel, bert_config([0, 0, 2, 0, 2, 5], is_decoder=True))
    else:
        model = build(DynTieBertForMaskedLM, bert_config([0, 0, 2, 0, 2, 5]))
    ids = input_ids()
    with captured_warnings() as messages:
        loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    assert not [m for m in messages if "loss_type" in m], messages
