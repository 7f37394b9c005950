"""Relaxed ties (``tie_lora_rank``): a tied position runs its root's weights plus its own low-rank delta.

Every check compares against a reference built here, independently of the code under test: the stock
model whose tied layers hold their root's weights plus ``up @ down`` (transposed for GPT-2's Conv1D)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from hf_dyntie import DynTieGPT2LMHeadModel
from hf_dyntie.checkpoint_files import inspect_checkpoint
from hf_dyntie.convert import expand
from hf_dyntie.training.optimizer_state import carry_optimizer_state
from hf_dyntie.training.trainer import DynTieTrainer
from hf_dyntie.training.training_args import DynTieTrainingArguments
from hf_dyntie.deltas import TieDelta

from helpers import (
    TIED_MAP,
    build,
    byte_blocks,
    gpt2_config,
    input_ids,
    make_args,
    make_case,
    max_diff,
    randomize_relaxed,
    relaxed_reference,
    tiny_model,
    trained_a_little,
)

RANK = 2
ATOL = 1e-5


def deltas_of(model, position: int) -> dict[str, TieDelta]:
    """``{leaf name: delta}`` of one position, found by walking the modules (not through hf_dyntie's helpers)."""
    layer = model.dyntie_layers[position]
    return {name.rsplit(".tie_delta", 1)[0]: m for name, m in layer.named_modules() if isinstance(m, TieDelta)}


@pytest.mark.parametrize("case", ["gpt2-lm", "bert-mlm"])
def test_tied_position_computes_root_plus_its_own_delta(case):
    model = make_case(case, tie_lora_rank=RANK)
    randomize_relaxed(model)
    reference = relaxed_reference(model)
    ids = input_ids()
    assert max_diff(model(input_ids=ids).logits, reference(input_ids=ids).logits) < ATOL
    # every linear leaf of every position has a delta of its own, norms have none
    assert all(len(deltas_of(model, i)) == (4 if case == "gpt2-lm" else 6) for i in range(6))
    ptrs = [d.up.data_ptr() for i in range(6) for d in deltas_of(model, i).values()]
    assert len(set(ptrs)) == len(ptrs)


def test_gradients_reach_roots_and_only_the_active_deltas():
    model = make_case("gpt2-lm", tie_lora_rank=RANK).train()
    randomize_relaxed(model)
    reference = relaxed_reference(model).train()
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    reference(input_ids=ids, labels=ids).loss.backward()
    prefix = model._dyntie_layers_path
    for r in sorted(set(TIED_MAP)):  # share mode: a root's gradient is the sum over the positions it runs
        group = [i for i, root in enumerate(TIED_MAP) if root == r]
        for name, p in model.dyntie_layers[r].named_parameters():
            if "tie_delta" in name:
                continue
            want = sum(reference.get_parameter(f"{prefix}.{i}.{name}").grad for i in group)
            assert max_diff(p.grad, want) < ATOL, name
    for i, r in enumerate(TIED_MAP):
        for delta in deltas_of(model, i).values():
            assert (delta.up.grad is not None) == (r != i), f"position {i}"
    assert all(p.grad is None for name, p in model.dyntie_layers[1].named_parameters() if "tie_delta" not in name)


def test_a_fresh_relaxed_model_starts_exactly_at_plain_ties():
    plain, relaxed = (build(DynTieGPT2LMHeadModel, gpt2_config(TIED_MAP, tie_lora_rank=rank)) for rank in (0, RANK))
    ids = input_ids()
    assert torch.equal(plain(input_ids=ids).logits, relaxed(input_ids=ids).logits)
    summary = relaxed.tie_summary()
    per_position = sum(p.numel() for d in deltas_of(relaxed, 0).values() for p in d.parameters())
    assert per_position == RANK * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    tied = sum(1 for i, r in enumerate(TIED_MAP) if r != i)
    assert summary["delta_parameters"] == tied * per_position
    assert summary["trainable_parameters"] == plain.tie_summary()["trainable_parameters"] + tied * per_position
    assert summary["parameters_per_layer"] == plain.tie_summary()["parameters_per_layer"]


def test_retie_keeps_the_function_when_untying_and_starts_new_ties_at_their_root():
    """Train under a tied map (AdamW, state carried), then untie: the deltas fold into the copied weights
    (same logits), switch off at zero and lose their optimizer state; tie again: the position starts at
    exactly its root's function."""
    model = make_case("gpt2-lm", tie_lora_rank=RANK).train()
    ids = input_ids()
    optimizer = trained_a_little(model, ids)
    assert all(d.up.abs().sum() > 0 for d in deltas_of(model, 1).values())  # trained away from zero
    model.eval()
    before = model(input_ids=ids).logits
    report = model.retie([0, 1, 2, 0, 2, 5])  # position 1 unties
    carry_optimizer_state(optimizer, report.moves)
    assert max_diff(model(input_ids=ids).logits, before) < ATOL
    for delta in deltas_of(model, 1).values():
        assert torch.count_nonzero(delta.up) == 0
        assert delta.up not in optimizer.state and delta.down not in optimizer.state
    assert max_diff(model(input_ids=ids).logits, relaxed_reference(model)(input_ids=ids).logits) < ATOL

    report = model.retie([0, 1, 2, 0, 2, 2])  # position 5 (a root) ties to layer 2: no delta yet
    carry_optimizer_state(optimizer, report.moves)
    assert all(torch.count_nonzero(d.up) == 0 for d in deltas_of(model, 5).values())
    assert max_diff(model(input_ids=ids).logits, relaxed_reference(model)(input_ids=ids).logits) < ATOL


def test_compact_checkpoint_reloads_the_deltas_and_the_sharing(tmp_path):
    model = make_case("gpt2-lm", tie_lora_rank=RANK)
    randomize_relaxed(model)
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.h.1.attn.c_attn.tie_delta.up" in keys  # a tied position's own delta is stored
    assert "transformer.h.1.attn.c_attn.weight" not in keys  # its tied weights are not
    loaded = DynTieGPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = input_ids()
    assert loaded.tie_lora_rank == RANK and loaded.tie_map == TIED_MAP
    assert max_diff(loaded(input_ids=ids).logits, model(input_ids=ids).logits) == 0
    layers = loaded.dyntie_layers
    assert layers[1].attn.c_attn.weight.data_ptr() == layers[0].attn.c_attn.weight.data_ptr()
    assert torch.equal(layers[1].attn.c_attn.tie_delta.up, model.dyntie_layers[1].attn.c_attn.tie_delta.up)
    # `python -m hf_dyntie inspect` counts what the live model counts, and sizes what expand writes
    info, summary = inspect_checkpoint(tmp_path), model.tie_summary()
    for key in ("total_parameters", "stored_parameters", "trainable_parameters"):
        assert info[key] == summary[key], key
    assert info["tie_lora_rank"] == RANK
    expand(tmp_path, tmp_path / "plain")
    assert info["expanded_bytes"] == (tmp_path / "plain" / "model.safetensors").stat().st_size


def test_expand_folds_the_deltas_into_a_plain_stock_folder(tmp_path):
    model = make_case("gpt2-lm", tie_lora_rank=RANK)
    randomize_relaxed(model)
    expand(model, tmp_path)
    stock = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert "tie_lora_rank" not in stock.config.to_dict()
    assert not any("tie_delta" in name for name, _ in stock.named_parameters())
    ids = input_ids()
    assert max_diff(stock(input_ids=ids).logits, model(input_ids=ids).logits) < ATOL


def test_dtype_moves_keep_each_positions_delta():
    model = make_case("gpt2-lm", tie_lora_rank=RANK)
    randomize_relaxed(model)
    ids = input_ids()
    want = model(input_ids=ids).logits.double()
    model.to(torch.float64)
    assert max_diff(model(input_ids=ids).logits, want) < ATOL
    layers = model.dyntie_layers
    assert layers[3].mlp.c_fc.weight.data_ptr() == layers[0].mlp.c_fc.weight.data_ptr()
    assert layers[3].mlp.c_fc.tie_delta.up.dtype == torch.float64
    assert not torch.equal(layers[3].mlp.c_fc.tie_delta.up, layers[1].mlp.c_fc.tie_delta.up)


def test_options_are_checked_at_the_boundary():
    with pytest.raises(ValueError, match="tie_lora_rank must be a non-negative integer"):
        gpt2_config(tie_lora_rank=-1)
    with pytest.raises(ValueError, match="tie_lora_rank must be a non-negative integer"):
        make_args("/tmp/unused", tie_lora_rank=-2)
    model = make_case("gpt2-lm", tie_lora_rank=RANK)
    model.relax_ties(RANK)  # the rank it has: nothing changes
    with pytest.raises(ValueError, match="already has relaxed ties of rank 2"):
        model.relax_ties(4)


def test_trainer_trains_relaxed_ties_and_saves_a_checkpoint_that_reloads(tmp_path):
    """``tie_lora_rank`` on the arguments relaxes a plain model before its optimizer exists; grow unties
    positions as it goes (folding their deltas); the saved model reloads with the same logits."""
    model = tiny_model()
    args: DynTieTrainingArguments = make_args(
        tmp_path, tie_policy="grow", tie_budget=3, tie_grow_until=0.5, tie_interval=4, tie_lora_rank=RANK,
        max_steps=16,
    )
    trainer = DynTieTrainer(model=model, args=args, train_dataset=byte_blocks())
    assert model.tie_lora_rank == RANK and model.config.tie_lora_rank == RANK
    trainer.train()
    tie_map = model.tie_map
    assert len(set(tie_map)) == 3, tie_map
    for i, r in enumerate(tie_map):
        for delta in deltas_of(model, i).values():
            trained = torch.count_nonzero(delta.up) > 0
            assert trained == (r != i), f"position {i} under {tie_map}"
    summary = trainer.dyntie_summary()
    assert summary["final_trainable_parameters"] == model.tie_summary()["trainable_parameters"]
    trainer.save_model(str(tmp_path / "final"))
    loaded = DynTieGPT2LMHeadModel.from_pretrained(tmp_path / "final").eval()
    model.eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert loaded.tie_lora_rank == RANK and loaded.tie_map == tie_map
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_deltas_random_start_follows_the_seed(tmp_path):
    """The trainer relaxes the model itself (``tie_lora_rank`` on the arguments), before transformers' Trainer
    seeds anything: the deltas' random ``down`` factors must still come from ``--seed``, so two runs in one
    process agree (a position tied later keeps its ``down``: it shapes all its training) and seeds differ."""
    downs = []
    for k, seed in enumerate((0, 0, 1)):
        torch.manual_seed(100 + k)  # whatever the user's code drew before: it must not matter
        model = tiny_model()
        DynTieTrainer(model=model, args=make_args(tmp_path, tie_lora_rank=RANK, seed=seed), train_dataset=byte_blocks())
        downs.append(torch.cat([d.down.flatten() for d in deltas_of(model, 1).values()]))
    assert downs[0].equal(downs[1]) and not downs[0].equal(downs[2])


def test_peft_adapters_sit_on_top_of_relaxed_ties():
    """PEFT on a relaxed model: its LoRA wraps the leaf, the relaxed delta stays part of the (frozen) base; `.to()`
    and an untie (which folds the delta) keep the function of the wrapped model."""
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install hf-dyntie[peft])")
    model = make_case("gpt2-lm", tie_lora_rank=RANK)
    randomize_relaxed(model)
    ids = input_ids()
    want = model(input_ids=ids).logits
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    assert max_diff(wrapped(input_ids=ids).logits, want) == 0  # LoRA's B starts at zero
    assert not any(p.requires_grad for name, p in wrapped.named_parameters() if "tie_delta" in name)
    wrapped.to(torch.float64)
    assert max_diff(wrapped(input_ids=ids).logits, want) < ATOL
    model.retie([0, 1, 2, 0, 2, 5])  # position 1 unties: its delta folds into the (wrapped) leaf's weight
    assert max_diff(wrapped(input_ids=ids).logits, want) < ATOL
