"""``shrink``: a trained model tied progressively down to the budget (policies/shrink.py)."""

from __future__ import annotations

import pytest
import torch

from helpers import byte_blocks, input_ids, make, max_diff, paper_config
from hf_dyntie import DynTieTrainer, DynTieTrainingArguments
from hf_dyntie.convert import from_stock
from hf_dyntie.training.policies import make_policy
from hf_dyntie.training.policies.shrink import merge_roots
from hf_dyntie.tie_map import num_unique_layers


def test_sequence_order_ties_towards_the_sequence_pattern_one_root_at_a_time():
    policy = make_policy("shrink", 8, paper_config(start_map=list(range(8)), budget=4, shrink_until=0.5))
    policy.begin_run(80)
    tie_map, seen = list(range(8)), []
    for step in range(80):
        decision = policy.decide(tie_map, step)
        if decision is not None:
            assert num_unique_layers(decision.tie_map) == num_unique_layers(tie_map) - 1  # one merge at a time
            tie_map = decision.tie_map
            seen.append(step)
    assert tie_map == [0, 0, 2, 2, 4, 4, 6, 6]
    assert seen == [10, 20, 30, 40]  # evenly spaced, the last at shrink_until


def test_scored_order_takes_the_cheapest_merge():
    class Scorer:
        def loss_deltas(self, candidates):
            return [0.5 if c != merge_roots(list(range(4)), 2, 1) else 0.1 for c in candidates]

    policy = make_policy("shrink", 4, paper_config(start_map=list(range(4)), budget=3, shrink_order="scored", shrink_until=0.5))
    policy.begin_run(8)
    decision = policy.decide(list(range(4)), 4, Scorer())
    assert decision.tie_map == [0, 1, 1, 3] and len(decision.scores) == 3


def test_shrink_needs_a_budget_and_a_reachable_schedule(tmp_path):
    with pytest.raises(ValueError, match="needs tie_budget"):
        make_policy("shrink", 4, paper_config(start_map=list(range(4))))
    model = from_stock(_stock())
    args = DynTieTrainingArguments(output_dir=str(tmp_path), max_steps=4, tie_policy="shrink", tie_budget=1,
                                   tie_interval=2, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="shrink cannot tie down to tie_budget 1"):
        DynTieTrainer(model=model, args=args, train_dataset=byte_blocks())


def _stock():
    from hf_dyntie.families import CAUSAL_LM, FAMILIES
    from helpers import stock_copy

    family = next(f for f in FAMILIES if f.name == "gpt2")
    stock = stock_copy(make(family, family.head(CAUSAL_LM), tie_map=None))
    stock.resize_token_embeddings(256)
    return stock


def shrink_run(tmp_path, stock, delta_init: str) -> DynTieTrainer:
    args = DynTieTrainingArguments(
        output_dir=str(tmp_path / delta_init), max_steps=8, learning_rate=0.0, report_to=[], use_cpu=True,
        save_strategy="no", tie_policy="shrink", tie_budget=3, tie_shrink_until=0.5, tie_interval=1,
        tie_merge="average", tie_lora_rank=64, tie_lora_init=delta_init, per_device_train_batch_size=2, seed=0,
    )
    trainer = DynTieTrainer(model=from_stock(stock), args=args, train_dataset=byte_blocks())
    trainer.train()
    return trainer


def test_a_pretrained_model_shrinks_in_training_and_svd_deltas_keep_it_closer(tmp_path):
    """DynTieTrainer + shrink on a model with trained weights: it starts from the model's own (untied) map and
    ties one group at a time down to the budget by half the run, in the history. At learning rate 0 every
    change is the ties' own: with SVD-started deltas the shrunk model stays closer to the pretrained one than
    with zero-started deltas (the linear maps are kept; norms and biases are shared either way)."""
    stock = _stock()
    svd, zero = shrink_run(tmp_path, stock, "svd"), shrink_run(tmp_path, stock, "zero")
    for trainer in (svd, zero):
        assert num_unique_layers(trainer.dyntie_model.tie_map) == 3
        assert trainer.history.start_record["tie_map"] == list(range(6))
        steps = [r["step"] for r in trainer.history.records]
        assert len(steps) == 3 and steps[-1] <= 4
    assert svd.dyntie_model.tie_map == zero.dyntie_model.tie_map
    x = input_ids()
    with torch.no_grad():
        original = stock.eval()(input_ids=x).logits
        err_svd = max_diff(svd.dyntie_model.eval()(input_ids=x).logits, original)
        err_zero = max_diff(zero.dyntie_model.eval()(input_ids=x).logits, original)
    assert err_svd < err_zero, (err_svd, err_zero)


def resumable_shrink(out, stock, order: str, resume: str | None = None) -> DynTieTrainer:
    """shrink to 2 of 6 (groups of three: later merges reroute and average tied positions) with SVD-started
    deltas and offsets, a checkpoint every 3 steps."""
    args = DynTieTrainingArguments(
        output_dir=str(out), max_steps=9, learning_rate=1e-3, report_to=[], use_cpu=True, logging_steps=1,
        save_strategy="steps", save_steps=3, tie_policy="shrink", tie_budget=2, tie_shrink_until=0.75,
        tie_shrink_order=order, tie_interval=1, tie_merge="average", tie_lora_rank=4, tie_lora_vectors=True,
        tie_lora_init="svd", per_device_train_batch_size=2, per_device_eval_batch_size=2, tie_score_tokens=64,
        seed=0,
    )
    data = byte_blocks()
    trainer = DynTieTrainer(model=from_stock(stock), args=args, train_dataset=data, eval_dataset=data)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("order", ["sequence", "scored"])
def test_shrink_resumes_exactly(tmp_path, order):
    """Interrupted after the first merges and resumed from its checkpoint, a shrink run ends with the same
    map, weights, deltas, offsets and tie history as the run that was never interrupted (issue 23.3)."""
    stock = _stock()
    full = resumable_shrink(tmp_path, stock, order)
    resumed = resumable_shrink(tmp_path, stock, order, resume=str(tmp_path / "checkpoint-3"))
    assert num_unique_layers(full.dyntie_model.tie_map) == 2
    assert full.dyntie_model.tie_map == resumed.dyntie_model.tie_map
    assert full.history.records == resumed.history.records and len(full.history.records) == 4
    a, b = full.dyntie_model.state_dict(), resumed.dyntie_model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
