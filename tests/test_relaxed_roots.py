"""Relaxed roots (``tie_lora_roots``): a root that has followers runs its own delta and offsets too, so every
member of a group is the shared layer plus its own correction (Relaxed Recursive Transformers' per-loop LoRA).
What a user relies on: ``init="average"`` with full-rank SVD deltas and offsets computes exactly what the
pretrained model did, also when tied one merge at a time (tests/test_vector_offsets.py); a root left alone
folds its delta and keeps its function; checkpoints, expand, gradients, compile, scoring, resume and the
trainer carry it."""

from __future__ import annotations

import pytest
import torch

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
from hf_dyntie import DynTieGPT2Config, DynTieGPT2LMHeadModel, DynTieTrainer
from hf_dyntie.checkpoint_files import inspect_checkpoint
from hf_dyntie.convert import expand, from_stock
from hf_dyntie.families import CAUSAL_LM, FAMILIES
from hf_dyntie.training.optimizer_state import carry_optimizer_state

RANK = 2
ATOL = 1e-5
ROOTS = dict(tie_lora_rank=RANK, tie_lora_vectors=True, tie_lora_roots=True)


def gpt2_with_roots():
    return make_case("gpt2-lm", **ROOTS)


def test_a_relaxed_root_runs_its_own_delta_and_offsets():
    model = gpt2_with_roots()
    randomize_relaxed(model)  # roots 0 and 2 have followers: their deltas are on; 5 has none
    ids = input_ids()
    with torch.no_grad():
        assert max_diff(model(input_ids=ids).logits, relaxed_reference(model).eval()(input_ids=ids).logits) < ATOL
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for i in range(len(TIED_MAP)):
        on = i != 5  # tied (1, 3, 4) or a root with followers (0, 2)
        for module in relaxed_modules(model, i).values():
            assert all((p.grad is not None) == on for p in module.parameters()), f"position {i}"
    idle = {id(p) for p in model.idle_parameters()}
    assert all(id(p) not in idle for m in relaxed_modules(model, 0).values() for p in m.parameters())
    assert all(id(p) in idle for m in relaxed_modules(model, 5).values() for p in m.parameters())


def test_a_root_left_without_followers_folds_its_delta_and_keeps_its_function():
    model = gpt2_with_roots().train()
    ids = input_ids()
    optimizer = trained_a_little(model, ids)
    root_2 = [p for m in relaxed_modules(model, 2).values() for p in m.parameters()]
    assert all(p.abs().sum() > 0 for p in root_2)  # trained away from zero while 4 followed it
    model.eval()
    before = model(input_ids=ids).logits
    carry_optimizer_state(optimizer, model.retie([0, 0, 2, 0, 4, 5]).moves)  # 4 unties: root 2 is alone
    assert max_diff(model(input_ids=ids).logits, before) < ATOL
    for p in root_2:
        if p.dim() == 2 and p.shape[1] == 2:  # a delta's up factor (out, rank): zeroed by the fold
            assert torch.count_nonzero(p) == 0
        assert p not in optimizer.state
    assert max_diff(model(input_ids=ids).logits, relaxed_reference(model).eval()(input_ids=ids).logits) < ATOL


def test_compact_checkpoint_and_expand_keep_the_roots_corrections(tmp_path):
    model = gpt2_with_roots().eval()
    randomize_relaxed(model)
    model.save_pretrained(tmp_path / "compact")
    loaded = DynTieGPT2LMHeadModel.from_pretrained(tmp_path / "compact").eval()
    ids = input_ids()
    assert loaded.config.tie_lora_roots and loaded.tie_map == TIED_MAP
    assert max_diff(loaded(input_ids=ids).logits, model(input_ids=ids).logits) == 0
    info, summary = inspect_checkpoint(tmp_path / "compact"), model.tie_summary()
    for key in ("total_parameters", "stored_parameters", "trainable_parameters"):
        assert info[key] == summary[key], key
    assert info["tie_lora_roots"] is True
    expand(tmp_path / "compact", tmp_path / "plain")
    from transformers import GPT2LMHeadModel

    stock = GPT2LMHeadModel.from_pretrained(tmp_path / "plain").eval()
    assert "tie_lora_roots" not in stock.config.to_dict()
    assert max_diff(stock(input_ids=ids).logits, model(input_ids=ids).logits) < ATOL


def test_compiled_layers_run_the_roots_corrections():
    model = gpt2_with_roots().eval()
    randomize_relaxed(model)
    ids = input_ids()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        model.compile_layers(backend="eager")
        assert max_diff(model(input_ids=ids).logits, want) < ATOL


def test_roots_are_checked_at_the_boundary(tmp_path):
    with pytest.raises(ValueError, match="tie_lora_roots needs relaxed ties"):
        DynTieGPT2Config(tie_lora_roots=True)
    with pytest.raises(ValueError, match="tie_lora_roots needs relaxed ties"):
        make_args(tmp_path, tie_lora_rank=0, tie_lora_roots=True)
    with pytest.raises(ValueError, match="tie_lora_roots needs relaxed ties"):
        from_stock(tmp_path / "no-such-checkpoint", [0, 0, 2, 2], tie_lora_roots=True)
    with pytest.raises(ValueError, match="cannot change"):
        make_case("gpt2-lm", tie_lora_rank=RANK, tie_lora_roots=True).relax_ties(RANK)  # roots never off
    model = make_case("gpt2-lm", tie_lora_rank=RANK)
    randomize_relaxed(model)
    ids = input_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.relax_ties(RANK, roots=True)  # on later (from_stock(..., tie_lora_rank) then --tie_lora_roots)
        assert model.config.tie_lora_roots and torch.equal(model(input_ids=ids).logits, before)


def test_the_trainer_relaxes_the_roots_and_shrinks_a_pretrained_model_keeping_its_function(tmp_path):
    """``--tie_lora_roots`` with ``shrink``, ``average`` merges and full-rank SVD deltas and offsets, at learning
    rate 0: every merge keeps the pretrained model's function."""
    family = next(f for f in FAMILIES if f.name == "gpt2")
    stock = stock_copy(make(family, family.head(CAUSAL_LM), tie_map=None)).eval()
    stock.resize_token_embeddings(256)
    args = make_args(tmp_path, tie_policy="shrink", tie_budget=2, tie_shrink_until=0.5, tie_interval=1,
                     tie_merge="average", tie_lora_rank=64, tie_lora_vectors=True, tie_lora_roots=True,
                     tie_lora_init="svd", learning_rate=0.0, max_steps=8)
    trainer = DynTieTrainer(model=from_stock(stock), args=args, train_dataset=byte_blocks())
    trainer.train()
    model = trainer.dyntie_model.eval()
    assert model.config.tie_lora_roots and len(set(model.tie_map)) == 2
    ids = input_ids()
    with torch.no_grad():
        assert max_diff(model(input_ids=ids).logits, stock(input_ids=ids).logits) < 1e-4


@pytest.mark.parametrize("roots", [False, True])
def test_a_scored_candidate_computes_what_the_retie_then_computes(roots):
    """Scorers route a candidate map (``routed_as``) instead of retying: an untie (and, with relaxed roots, a
    root left alone) keeps its delta as the retie folds it, a position tied anew (a relaxed root tied away
    included) runs without one, as the retie zeroes it. ``discard`` merges: routing moves no weight."""
    fields = dict(tie_lora_rank=RANK, tie_lora_vectors=True, tie_lora_roots=roots)
    ids = input_ids()
    for candidate in ([0, 0, 2, 0, 0, 5], [0, 0, 0, 0, 0, 5], [0, 1, 2, 0, 4, 5], [0, 0, 2, 3, 2, 2]):
        model = make_case("gpt2-lm", **fields).train()
        trained_a_little(model, ids)
        model.eval()
        with torch.no_grad(), model.routed_as(candidate):
            scored = model(input_ids=ids).logits
        model.retie(candidate)
        with torch.no_grad():
            assert max_diff(scored, model(input_ids=ids).logits) < ATOL, candidate


def test_the_run_summary_counts_the_roots_deltas(tmp_path):
    """A static map with relaxed roots: the step-weighted mean of trainable parameters is the final count,
    which includes the roots' own deltas and offsets."""
    model = tiny_model()  # 6 layers over bytes
    args = make_args(tmp_path, tie_policy="sequence", tie_unique_layers=3, tie_lora_rank=RANK, tie_lora_vectors=True,
                     tie_lora_roots=True, max_steps=2)
    trainer = DynTieTrainer(model=model, args=args, train_dataset=byte_blocks())
    trainer.train()
    summary = trainer.dyntie_summary()
    assert summary["mean_trainable_parameters"] == summary["final_trainable_parameters"]
    plain = model.tie_summary()["trainable_parameters"] - model.tie_summary()["delta_parameters"]
    per_position = model.tie_summary()["delta_parameters_per_layer"]
    assert summary["final_trainable_parameters"] == plain + 6 * per_position  # 3 groups of 2: every position


def test_resume_refuses_other_relaxed_settings(tmp_path):
    """Every position's deltas are stored whatever ``tie_lora_roots`` says, so a checkpoint of a run with relaxed
    roots would load into one without and silently switch the roots' trained deltas off: refused in one line,
    and the same settings resume."""
    from hf_dyntie.training.checkpoints import CheckpointError

    fields = dict(tie_policy="sequence", tie_unique_layers=3, tie_lora_rank=RANK, tie_lora_roots=True,
                  save_strategy="steps", save_steps=2)
    DynTieTrainer(model=tiny_model(), args=make_args(tmp_path, max_steps=2, **fields), train_dataset=byte_blocks()).train()
    checkpoint = str(tmp_path / "checkpoint-2")
    other = make_args(tmp_path, max_steps=4, **{**fields, "tie_lora_roots": False})
    with pytest.raises(CheckpointError, match=r"relaxed ties .* = \(2, False, True\), this run uses \(2, False, False\)"):
        DynTieTrainer(model=tiny_model(), args=other, train_dataset=byte_blocks()).train(resume_from_checkpoint=checkpoint)
    same = DynTieTrainer(model=tiny_model(), args=make_args(tmp_path, max_steps=4, **fields), train_dataset=byte_blocks())
    same.train(resume_from_checkpoint=checkpoint)
    assert same.state.global_step == 4
