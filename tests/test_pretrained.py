"""Turning a trained (untied) model into a tied one: the shared layer from the group's root or its average,
and relaxed deltas started at the truncated SVD of each position's residual (docs/design.md, "Pretrained")."""

from __future__ import annotations

import pytest
import torch

from helpers import input_ids, make, max_diff, stock_copy
from hf_dyntie.convert import from_stock, source_layers
from hf_dyntie.families import CAUSAL_LM, FAMILIES, MASKED_LM

MAP = [0, 0, 2, 0, 2, 5]  # groups [0, 1, 3] and [2, 4]; 5 alone



def trained(family):
    """A stock model of ``family`` whose layers differ (as a pretrained model's do)."""
    head = family.head(CAUSAL_LM) or family.head(MASKED_LM)
    return stock_copy(make(family, head, tie_map=None)), head


def linear_error(model, stock, position: int) -> float:
    """Largest difference between a tied position's effective linear maps (root + delta) and its own."""
    from hf_dyntie.deltas import relaxed_targets, tie_deltas

    layers = model.dyntie_layers
    stock_layers = stock.get_submodule(model._dyntie_layers_path)
    root = relaxed_targets(layers[model.tie_map[position]])
    own = dict(stock_layers[position].named_modules())
    worst = 0.0
    for name, _, delta in tie_deltas(layers[position]):
        mine = own[name].weight.detach().float()
        mine = mine.t() if delta.transposed else mine
        effective = root[name] + (delta.up @ delta.down).detach().float()
        worst = max(worst, float((effective - mine).abs().max()))
    return worst


@pytest.mark.parametrize("family", [pytest.param(f, id=f.name) for f in FAMILIES])
def test_svd_deltas_at_full_rank_give_back_each_positions_own_linear_maps(family):
    stock, _ = trained(family)
    model = from_stock(stock, MAP, init="average", tie_lora_rank=64, delta_init="svd")
    assert model.tie_map == MAP
    for i in (1, 3, 4):
        assert linear_error(model, stock, i) < 1e-4, i


def test_svd_error_falls_as_the_rank_grows():
    """The residual the deltas leave (Frobenius, over every tied position's linear maps) falls with the rank,
    to 0 at full rank; the logits move towards the pretrained model's (norms and biases stay shared, so they
    need not reach it)."""
    from hf_dyntie.deltas import relaxed_targets, tie_deltas

    family = next(f for f in FAMILIES if f.name == "llama")
    stock, _ = trained(family)
    own = {i: relaxed_targets(from_stock(stock, tie_lora_rank=1).dyntie_layers[i]) for i in (1, 3, 4)}
    residuals, logits = [], []
    x = input_ids()
    for rank in (0, 1, 4, 16, 64):
        model = from_stock(stock, MAP, init="average", tie_lora_rank=rank, delta_init="svd" if rank else "zero")
        root = {r: relaxed_targets(model.dyntie_layers[r]) if rank else None for r in (0, 2)}
        if rank:
            residuals.append(sum(float((root[MAP[i]][n] + (d.up @ d.down).detach() - own[i][n]).norm() ** 2)
                                 for i in (1, 3, 4) for n, _, d in tie_deltas(model.dyntie_layers[i])) ** 0.5)
        with torch.no_grad():
            logits.append(max_diff(model(input_ids=x).logits, stock(input_ids=x).logits))
    assert residuals == sorted(residuals, reverse=True) and residuals[-1] < 1e-3 * residuals[0], residuals
    assert logits[-1] < logits[0], logits  # full-rank deltas: closer to the pretrained model than plain ties


def test_average_makes_each_shared_layer_the_mean_of_its_group_and_root_keeps_the_lowest():
    family = next(f for f in FAMILIES if f.name == "gpt2")
    stock, _ = trained(family)
    layers = stock.transformer.h
    averaged, rooted = from_stock(stock, MAP, init="average"), from_stock(stock, MAP, init="root")
    for name, p in averaged.transformer.h[0].named_parameters():
        members = [dict(layers[i].named_parameters())[name] for i in (0, 1, 3)]  # norms too
        assert torch.allclose(p, sum(members) / 3, atol=1e-6), name
        assert torch.equal(dict(rooted.transformer.h[0].named_parameters())[name], members[0]), name
    assert torch.equal(averaged.transformer.h[5].mlp.c_fc.weight, layers[5].mlp.c_fc.weight)  # alone: unchanged


def test_stepwise_and_lower_pick_their_source_layers_as_relaxed_recursive_transformers_do():
    assert source_layers("stepwise", 8, 4) == [0, 2, 5, 7] and source_layers("stepwise", 8, 2) == [0, 7]
    assert source_layers("stepwise", 6, 3) == [0, 2, 5] and source_layers("stepwise", 18, 9)[4] == 8  # half: even
    assert source_layers("lower", 8, 4) == [0, 1, 2, 3] and source_layers("stepwise", 8, 1) == [0]


def test_stepwise_and_lower_start_each_shared_layer_at_its_source():
    """A looped block (``cycle`` map, 6 layers, 3 unique): ``lower`` is ``root`` there; ``stepwise`` starts
    the three shared layers at layers 0, 2 and 5, and the followers run them. A layer left alone keeps its own."""
    family = next(f for f in FAMILIES if f.name == "llama")
    stock, _ = trained(family)
    own = [dict(layer.named_parameters()) for layer in stock.model.layers]
    cycle = [0, 1, 2, 0, 1, 2]
    lower, root = from_stock(stock, cycle, init="lower"), from_stock(stock, cycle, init="root")
    stepwise = from_stock(stock, cycle, init="stepwise")
    for r, source in enumerate([0, 2, 5]):
        for name, p in stepwise.model.layers[r].named_parameters():  # norms too
            assert torch.equal(p, own[source][name]), (r, name)
            assert torch.equal(dict(lower.model.layers[r].named_parameters())[name], own[r][name]), (r, name)
    x = input_ids()
    with torch.no_grad():
        assert torch.equal(lower(input_ids=x).logits, root(input_ids=x).logits)
    alone = from_stock(stock, [0, 0, 2, 3, 3, 3], init="stepwise")  # groups 0, 2, 3 -> sources 0, 2, 5; 2 alone
    assert torch.equal(alone.model.layers[2].mlp.up_proj.weight, own[2]["mlp.up_proj.weight"])
    assert torch.equal(alone.model.layers[3].mlp.up_proj.weight, own[5]["mlp.up_proj.weight"])


@pytest.mark.parametrize("init", ["root", "average", "stepwise", "lower"])
def test_a_checkpoint_folder_converts_as_the_live_model_does(tmp_path, init):
    """``from_stock(folder, ...)`` reads the folder and ties it exactly as it ties the live model (and at full
    rank with offsets and relaxed roots both compute the checkpoint's logits)."""
    family = next(f for f in FAMILIES if f.name == "llama")
    stock, _ = trained(family)
    stock.save_pretrained(tmp_path / "stock")
    kwargs = dict(init=init, tie_lora_rank=64, delta_init="svd", tie_lora_vectors=True, tie_lora_roots=True)
    looped = [0, 1, 2, 0, 1, 2]
    from_folder, live = from_stock(tmp_path / "stock", looped, **kwargs), from_stock(stock, looped, **kwargs)
    x = input_ids()
    with torch.no_grad():
        got, want = from_folder.eval()(input_ids=x).logits, live.eval()(input_ids=x).logits
        assert torch.equal(got, want) and max_diff(got, stock.eval()(input_ids=x).logits) < 1e-4
    assert from_folder.tie_map == [0, 1, 2, 0, 1, 2]


def test_bad_choices_are_refused_in_one_line():
    family = next(f for f in FAMILIES if f.name == "gpt2")
    stock, _ = trained(family)
    with pytest.raises(ValueError, match=r"init must be one of \('root', 'average', 'stepwise', 'lower'\)"):
        from_stock(stock, MAP, init="mean")
    with pytest.raises(ValueError, match="needs relaxed ties"):
        from_stock(stock, MAP, delta_init="svd")
    with pytest.raises(ValueError, match="init='average' and delta_init='zero' say how to tie: pass the tie_map"):
        from_stock(stock, init="average")  # no map: nothing would be averaged, so it is refused, not ignored


def test_the_trainer_starts_a_pretrained_model_the_same_way(tmp_path):
    """DynTieTrainer on a model with trained weights: tie_init (the map), tie_merge='average' and
    tie_lora_init='svd' give the model from_stock(..., init='average', delta_init='svd') gives."""
    from hf_dyntie import DynTieTrainer, DynTieTrainingArguments
    from helpers import byte_blocks

    family = next(f for f in FAMILIES if f.name == "gpt2")
    stock, _ = trained(family)
    stock.resize_token_embeddings(256)
    expected = from_stock(stock, MAP, init="average", tie_lora_rank=8, delta_init="svd")
    args = DynTieTrainingArguments(
        output_dir=str(tmp_path), max_steps=1, learning_rate=0.0, report_to=[], use_cpu=True, save_strategy="no",
        tie_policy="random", tie_init=",".join(map(str, MAP)), tie_merge="average", tie_lora_rank=8,
        tie_lora_init="svd", per_device_train_batch_size=2,
    )
    trainer = DynTieTrainer(model=from_stock(stock), args=args, train_dataset=byte_blocks())
    trainer._start_tying()
    model = trainer.dyntie_model.eval()
    x = input_ids()
    with torch.no_grad():
        assert max_diff(model(input_ids=x).logits, expected.eval()(input_ids=x).logits) < 1e-5
