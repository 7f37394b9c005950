"""Relaxed ties with vector offsets (``tie_lora_vectors``): a tied position's own offset of each norm weight and
bias, on top of its root's (docs/design.md, "Relaxed ties"). What a user relies on: a pretrained model tied with
``init="root"`` and full-rank SVD deltas computes exactly what it did, for every family; offsets fold on untie,
restart at zero on a new tie, train only while tied, save compactly, reload and expand."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from transformers import GPT2LMHeadModel

from helpers import (
    TIED_MAP,
    byte_blocks,
    input_ids,
    make,
    make_args,
    make_case,
    max_diff,
    randomize_relaxed,
    relaxed_modules,
    relaxed_reference,
    stock_copy,
    tiny_model,
    trained_a_little,
)
from hf_dyntie import DynTieGPT2LMHeadModel, DynTieTrainer
from hf_dyntie.checkpoint_files import inspect_checkpoint
from hf_dyntie.convert import expand, from_stock
from hf_dyntie.deltas import TieOffset, relaxed_parameters
from hf_dyntie.families import CAUSAL_LM, FAMILIES, MASKED_LM
from hf_dyntie.training.optimizer_state import carry_optimizer_state

RANK = 2
ATOL = 1e-5
PRETRAINED_MAP = [0, 0, 2, 0, 2, 5]  # groups [0, 1, 3] and [2, 4]; 5 alone
LOOPED_MAP = [0, 1, 2, 0, 1, 2]  # a looped block of 3 (cycle): stepwise starts it at layers 0, 2, 5


@pytest.mark.parametrize("family", [pytest.param(f, id=f.name) for f in FAMILIES])
def test_tied_position_computes_its_roots_vectors_plus_its_own_offsets(family):
    model = make(family, family.head(CAUSAL_LM) or family.head(MASKED_LM), tie_lora_rank=RANK, tie_lora_vectors=True)
    randomize_relaxed(model)
    ids = input_ids()
    with torch.no_grad():
        assert max_diff(model(input_ids=ids).logits, relaxed_reference(model).eval()(input_ids=ids).logits) < ATOL
    offsets = [m for m in relaxed_modules(model, 1).values() if isinstance(m, TieOffset)]
    assert len([o for o in offsets if "weight" in o._parameters]) == 2  # every family here: two norms per block
    if family.name == "gpt2":  # and GPT-2's biases: every linear map's, both LayerNorms'
        assert sum(p.numel() for o in offsets for p in o.parameters()) == 13 * 32


def test_offsets_take_gradients_only_while_their_position_is_tied():
    model = make_case("gpt2-lm", tie_lora_rank=RANK, tie_lora_vectors=True).train()
    randomize_relaxed(model)
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    for i, r in enumerate(TIED_MAP):
        for module in relaxed_modules(model, i).values():
            if isinstance(module, TieOffset):
                assert all((p.grad is not None) == (r != i) for p in module.parameters()), f"position {i}"


def test_untie_folds_the_offsets_and_a_new_tie_starts_at_the_root():
    model = make_case("gpt2-lm", tie_lora_rank=RANK, tie_lora_vectors=True).train()
    ids = input_ids()
    optimizer = trained_a_little(model, ids)
    offsets_1 = [m for m in relaxed_modules(model, 1).values() if isinstance(m, TieOffset)]
    assert all(p.abs().sum() > 0 for o in offsets_1 for p in o.parameters())  # trained away from zero
    model.eval()
    before = model(input_ids=ids).logits
    carry_optimizer_state(optimizer, model.retie([0, 1, 2, 0, 2, 5]).moves)  # position 1 unties
    assert max_diff(model(input_ids=ids).logits, before) < ATOL
    for o in offsets_1:
        for p in o.parameters():
            assert torch.count_nonzero(p) == 0 and p not in optimizer.state
    carry_optimizer_state(optimizer, model.retie([0, 1, 2, 0, 2, 2]).moves)  # root 5 ties to layer 2
    assert all(torch.count_nonzero(p) == 0 for m in relaxed_modules(model, 5).values() for p in m.parameters()
               if isinstance(m, TieOffset))
    assert max_diff(model(input_ids=ids).logits, relaxed_reference(model).eval()(input_ids=ids).logits) < ATOL


def test_compact_checkpoint_stores_a_tied_positions_offsets_and_expand_folds_them(tmp_path):
    model = make_case("gpt2-lm", tie_lora_rank=RANK, tie_lora_vectors=True).eval()
    randomize_relaxed(model)
    model.save_pretrained(tmp_path / "compact")
    with safe_open(str(tmp_path / "compact" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.h.1.ln_1.tie_offset.weight" in keys and "transformer.h.1.attn.c_attn.tie_offset.bias" in keys
    assert "transformer.h.1.ln_1.weight" not in keys  # the tied position's own vectors are not stored
    loaded = DynTieGPT2LMHeadModel.from_pretrained(tmp_path / "compact").eval()
    ids = input_ids()
    assert loaded.config.tie_lora_vectors and loaded.tie_map == TIED_MAP
    assert max_diff(loaded(input_ids=ids).logits, model(input_ids=ids).logits) == 0
    info, summary = inspect_checkpoint(tmp_path / "compact"), model.tie_summary()
    for key in ("total_parameters", "stored_parameters", "trainable_parameters"):
        assert info[key] == summary[key], key
    assert info["tie_lora_vectors"] is True
    expand(tmp_path / "compact", tmp_path / "plain")
    stock = GPT2LMHeadModel.from_pretrained(tmp_path / "plain").eval()
    assert "tie_lora_vectors" not in stock.config.to_dict()
    assert not any("tie_offset" in name for name, _ in stock.named_parameters())
    assert max_diff(stock(input_ids=ids).logits, model(input_ids=ids).logits) < ATOL
    assert info["expanded_bytes"] == (tmp_path / "plain" / "model.safetensors").stat().st_size


@pytest.mark.parametrize("init, roots, tie_map", [("root", False, PRETRAINED_MAP), ("average", True, PRETRAINED_MAP),
                                                   ("stepwise", True, LOOPED_MAP), ("lower", True, PRETRAINED_MAP)],
                         ids=["root", "average+roots", "stepwise+roots", "lower+roots"])
@pytest.mark.parametrize("family", [pytest.param(f, id=f.name) for f in FAMILIES])
def test_full_rank_svd_deltas_and_offsets_compute_the_pretrained_model(family, init, roots, tie_map):
    """Issue 23's identity: ``init="root"`` (or ``"average"``, ``"stepwise"``, ``"lower"`` with relaxed roots,
    ``tie_lora_roots``: each group's root position gets its own delta too) + full-rank SVD deltas + offsets
    started at the exact residual give the pretrained model's logits; without offsets the shared norms and
    biases move them, and without relaxed roots the roots' positions run what the init put there (a mean, or
    another layer: each map here gives some root another layer's weights)."""
    head = family.head(CAUSAL_LM) or family.head(MASKED_LM)
    stock = stock_copy(make(family, head, tie_map=None)).eval()
    ids = input_ids()
    kwargs = dict(init=init, tie_lora_rank=64, delta_init="svd")
    exact = from_stock(stock, tie_map, tie_lora_vectors=True, tie_lora_roots=roots, **kwargs).eval()
    shared = from_stock(stock, tie_map, **kwargs).eval()
    with torch.no_grad():
        want = stock(input_ids=ids).logits
        error, error_shared = max_diff(exact(input_ids=ids).logits, want), max_diff(shared(input_ids=ids).logits, want)
    assert error < 1e-4 and error_shared > max(100 * error, 1e-3), (error, error_shared)
    if roots:  # the same folder without relaxed roots: the roots' positions run the init's weights
        plain_roots = from_stock(stock, tie_map, tie_lora_vectors=True, **kwargs).eval()
        with torch.no_grad():
            assert max_diff(plain_roots(input_ids=ids).logits, want) > max(100 * error, 1e-3)
    assert exact.tie_map == tie_map


PROGRESSIVE = ([0, 1, 2, 3, 4, 4], [0, 1, 2, 3, 3, 3], [0, 1, 2, 2, 2, 2])  # groups grow: later steps reroute


def stock_with_blocks_averaged(stock, groups: dict[int, list[int]]):
    """A copy of a stock GPT-2 whose block ``i`` holds the mean of the blocks ``groups[i]``, every leaf."""
    out = copy.deepcopy(stock).eval()
    blocks = stock.transformer.h
    with torch.no_grad():
        for i, members in groups.items():
            for name, p in out.transformer.h[i].named_parameters():
                p.copy_(sum(blocks[m].get_parameter(name) for m in members) / len(members))
    return out


@pytest.mark.parametrize("roots", [False, True], ids=["", "roots"])
@pytest.mark.parametrize("merge", ["discard", "average"])
def test_tying_one_step_at_a_time_keeps_what_each_tied_position_computed(merge, roots):
    """A progressive schedule (``shrink``) ties a trained model through maps whose groups grow, so positions
    already tied change root (rerouted) or see their root averaged. With full-rank SVD deltas and offsets each
    is refitted to what it computed before the step: with ``discard``, or with relaxed roots (the averaged root
    is refitted too), the end is the pretrained model itself, down to one shared layer; with ``average`` alone
    only a group's root position changes at a step (it runs the mean, having no delta), so position 4 keeps the
    mean of 4-5 it ran after the first step, 3 the mean of 3-5, 2 runs the mean of 2-5. The refitted deltas'
    optimizer state is released."""
    family = next(f for f in FAMILIES if f.name == "gpt2")
    stock = stock_copy(make(family, family.head(CAUSAL_LM), tie_map=None)).eval()
    ids = input_ids()
    model = from_stock(stock, tie_lora_rank=64, tie_lora_vectors=True, tie_lora_roots=roots).eval()
    groups = {2: [2, 3, 4, 5], 3: [3, 4, 5], 4: [4, 5]} if merge == "average" and not roots else {}
    with torch.no_grad():
        want = stock_with_blocks_averaged(stock, groups)(input_ids=ids).logits
        for tie_map in PROGRESSIVE:
            report = model.tie_trained(tie_map, merge=merge, delta_init="svd")
        assert max_diff(model(input_ids=ids).logits, want) < 1e-4
        if roots:  # and on to a single shared layer: every position its own again
            model.tie_trained([0] * 6, merge=merge, delta_init="svd")
            assert max_diff(model(input_ids=ids).logits, want) < 1e-4
    assert report.changes.rerouted == (4, 5)  # [0,1,2,3,3,3] -> [0,1,2,2,2,2]: 4 and 5 follow 3 to 2
    released = {id(p) for p in report.moves.released}
    assert all(id(p) in released for i in (3, 4, 5) for p in relaxed_parameters(model.dyntie_layers[i]))


def test_the_error_falls_to_zero_as_the_rank_grows_with_offsets():
    family = next(f for f in FAMILIES if f.name == "qwen2")  # biased q/k/v projections and RMSNorms
    stock = stock_copy(make(family, family.head(CAUSAL_LM), tie_map=None)).eval()
    ids = input_ids()
    gaps = []
    with torch.no_grad():
        want = stock(input_ids=ids).logits
        for rank in (1, 4, 16, 64):
            model = from_stock(stock, PRETRAINED_MAP, tie_lora_rank=rank, delta_init="svd", tie_lora_vectors=True)
            gaps.append(max_diff(model.eval()(input_ids=ids).logits, want))
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-4 < gaps[0], gaps


def test_the_trainer_starts_a_pretrained_model_at_its_own_function(tmp_path):
    """--tie_lora_vectors with --tie_lora_init svd at full rank on the arguments: the first training loss is
    the pretrained model's own."""
    family = next(f for f in FAMILIES if f.name == "gpt2")
    stock = stock_copy(make(family, family.head(CAUSAL_LM), tie_map=None))
    stock.resize_token_embeddings(256, mean_resizing=False)
    batch = torch.tensor(byte_blocks()[0]["input_ids"])[None]
    with torch.no_grad():
        want = float(stock.eval()(input_ids=batch, labels=batch).loss)
    args = make_args(tmp_path, max_steps=1, learning_rate=0.0, tie_policy="random", tie_interval=1,
                     tie_init=",".join(map(str, PRETRAINED_MAP)), tie_lora_rank=64, tie_lora_vectors=True,
                     tie_lora_init="svd")
    trainer = DynTieTrainer(model=from_stock(stock), args=args, train_dataset=byte_blocks())
    trainer._start_tying()
    model = trainer.dyntie_model.eval()
    assert model.tie_map == PRETRAINED_MAP and model.config.tie_lora_vectors
    with torch.no_grad():
        assert abs(float(model(input_ids=batch, labels=batch).loss) - want) < 1e-5


def test_offsets_are_checked_at_the_boundary(tmp_path):
    from hf_dyntie import DynTieGPT2Config

    with pytest.raises(ValueError, match="tie_lora_vectors needs relaxed ties"):
        DynTieGPT2Config(tie_lora_vectors=True)
    with pytest.raises(ValueError, match="tie_lora_vectors needs relaxed ties"):
        make_args(tmp_path, tie_lora_rank=0, tie_lora_vectors=True)
    with pytest.raises(ValueError, match="tie_lora_vectors needs relaxed ties"):
        from_stock(stock_copy(tiny_model()), tie_lora_vectors=True)
    missing = tmp_path / "no-such-checkpoint"  # refused before anything is read: no OSError about the folder
    with pytest.raises(ValueError, match="tie_lora_vectors needs relaxed ties"):
        from_stock(missing, [0, 0, 2, 2], tie_lora_vectors=True)
    with pytest.raises(ValueError, match="delta_init must be one of"):
        from_stock(missing, delta_init="bogus")
    with pytest.raises(ValueError, match="delta_init='svd' needs relaxed ties"):
        from_stock(missing, [0, 0, 2, 2], delta_init="svd")
    with pytest.raises(ValueError, match="tie_lora_vectors must be True or False"):
        tiny_model(tie_lora_rank=RANK).relax_ties(RANK, vectors="yes")
    model = tiny_model(tie_lora_rank=RANK)
    with pytest.raises(ValueError, match="rank 2 without vector offsets; they cannot change to rank 2 with"):
        model.relax_ties(RANK, vectors=True)
    with pytest.raises(ValueError, match="tie_lora_vectors needs relaxed ties"):
        DynTieTrainer(model=tiny_model(), args=make_args(tmp_path, tie_lora_vectors=True),
                      train_dataset=byte_blocks())
