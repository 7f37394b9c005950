"""DynTieTrainer end to end on a tiny GPT-2: decisions, logs, files, optimizer hygiene, exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import BLOCK, NUM_LAYERS, OptimizerHygiene, byte_blocks, make_args, run_torchrun, tiny_model
from hf_dyntie import DynTieGPT2Config, DynTieGPT2LMHeadModel
from hf_dyntie.training.history import HISTORY_NAME, POLICY_TENSORS_NAME
from hf_dyntie.training.trainer import DynTieTrainer


def test_qlearning_run_changes_ties_logs_and_writes_files(tmp_path):
    hygiene = OptimizerHygiene()
    trainer = DynTieTrainer(
        model=tiny_model(), args=make_args(tmp_path, tie_init="untied"), train_dataset=byte_blocks(),
        callbacks=[hygiene],
    )
    hygiene.trainer = trainer
    trainer.train()

    start, *records = [json.loads(line) for line in (tmp_path / HISTORY_NAME).read_text().splitlines()]
    assert start["step"] == 0 and start["action"] is None and start["tie_map"] == list(range(NUM_LAYERS))  # the start map
    assert records == trainer.history.records and len(records) == 24 // 2  # one decision per interval
    assert {"step", "layer", "action", "tie_map", "reward"} <= set(records[0])
    maps = [tuple(r["tie_map"]) for r in records]
    assert len(set(maps)) > 1, "the tie map never changed"
    assert min(r["unique_layers"] for r in records) < NUM_LAYERS
    assert all(r["reward"] is not None for r in records[:-1])  # the last one trains past the end
    assert records[1]["reward"] == pytest.approx(-records[1]["loss"])  # neg_loss reward

    logs = [h for h in trainer.state.log_history if "loss" in h]
    for key in ("tie/unique_layers", "tie/tied_fraction", "tie/trainable_parameters", "tie/epsilon",
                "tie/reward", "tie/q_loss", "tie/training_state_bytes"):
        assert key in logs[-1], key
    assert hygiene.checked > 0 and len(hygiene.group_sizes) == 1  # the optimizer's groups never changed

    for name in ("tie_map.png", "unique_layers.png"):
        head = (tmp_path / name).read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n", name

    summary = trainer.dyntie_summary()
    assert summary["final_tie_map"] == list(records[-1]["tie_map"])
    assert 1 <= summary["mean_unique_layers"] <= NUM_LAYERS


def test_final_model_is_saved_compact(tmp_path):
    trainer = DynTieTrainer(model=tiny_model(), args=make_args(tmp_path, tie_policy="all_shared", max_steps=4),
                            train_dataset=byte_blocks())
    trainer.train()
    trainer.save_model()
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert not any(k.startswith("transformer.h.1.") for k in keys)
    assert any(k.startswith("transformer.h.0.") for k in keys)
    reloaded = DynTieGPT2LMHeadModel.from_pretrained(tmp_path)
    assert reloaded.tie_map == [0] * NUM_LAYERS


def _run(tmp_path: Path, resume: str | None = None, **overrides) -> DynTieTrainer:
    args = make_args(tmp_path, max_steps=12, save_strategy="steps", save_steps=6, logging_steps=1, **overrides)
    trainer = DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("extra", [{}, {"tie_replay_size": 8, "tie_target_update": 2, "tie_bootstrap": "next_layer"},
                                   {"tie_lora_rank": 2}])  # relaxed ties: the agent ties and unties, deltas fold
def test_resume_is_exact(tmp_path, extra):
    full = _run(tmp_path / "full", **extra)
    resumed = _run(tmp_path / "full", resume=str(tmp_path / "full" / "checkpoint-6"), **extra)
    # the uninterrupted run's final state, read back before the resumed run overwrote nothing of it
    a, b = full.dyntie_model.state_dict(), resumed.dyntie_model.state_dict()
    assert full.dyntie_model.tie_map == resumed.dyntie_model.tie_map
    for key in a:
        assert torch.equal(a[key], b[key]), key
    pa, pb = full.policy.state_dict(), resumed.policy.state_dict()
    assert pa[1] == pb[1]
    for key in pa[0]:
        assert torch.equal(pa[0][key], pb[0][key]), key
    assert full.history.records == resumed.history.records


def test_resume_refuses_other_policy_or_depth(tmp_path):
    _run(tmp_path)
    ckpt = str(tmp_path / "checkpoint-6")
    trainer = DynTieTrainer(model=tiny_model(), args=make_args(tmp_path / "b", tie_policy="random"),
                            train_dataset=byte_blocks())
    with pytest.raises(ValueError, match="tie_policy"):
        trainer.train(resume_from_checkpoint=ckpt)
    torch.manual_seed(0)
    shallow = DynTieGPT2LMHeadModel(DynTieGPT2Config(vocab_size=256, n_positions=BLOCK, n_embd=32, n_layer=4, n_head=4,
                                                     bos_token_id=0, eos_token_id=0))
    trainer = DynTieTrainer(model=shallow, args=make_args(tmp_path / "c"), train_dataset=byte_blocks())
    with pytest.raises(ValueError, match="layers"):
        trainer.train(resume_from_checkpoint=ckpt)


def test_checkpoint_holds_policy_state_without_pickles(tmp_path):
    _run(tmp_path)
    ckpt = tmp_path / "checkpoint-6"
    assert (ckpt / POLICY_TENSORS_NAME).exists() and (ckpt / "dyntie_state.json").exists()
    state = json.loads((ckpt / "dyntie_state.json").read_text())
    assert state["policy"] == "qlearning" and len(state["tie_map"]) == NUM_LAYERS
    assert json.loads((ckpt / "config.json").read_text())["tie_map"] == state["tie_map"]


def test_static_policy_keeps_its_map(tmp_path):
    trainer = DynTieTrainer(model=tiny_model(), args=make_args(tmp_path, tie_policy="cycle_rev", tie_unique_layers=3,
                                                                max_steps=6), train_dataset=byte_blocks())
    trainer.train()
    assert trainer.dyntie_model.tie_map == [0, 1, 2, 2, 1, 0]
    records = [json.loads(line) for line in (tmp_path / HISTORY_NAME).read_text().splitlines()]
    assert [r["tie_map"] for r in records] == [[0, 1, 2, 2, 1, 0]]


def test_eval_batch_reward_source(tmp_path):
    data = byte_blocks()
    args = make_args(tmp_path, tie_reward_source="eval_batch", max_steps=8, per_device_eval_batch_size=4)
    trainer = DynTieTrainer(model=tiny_model(), args=args, train_dataset=data, eval_dataset=data.select(range(8)))
    trainer.train()
    rewards = [r["reward"] for r in trainer.history.records[:-1]]
    assert all(r is not None and math.isfinite(r) for r in rewards)
    with pytest.raises(ValueError, match="eval_dataset"):
        DynTieTrainer(model=tiny_model(), args=args, train_dataset=data)


def test_nonfinite_loss_does_not_poison_the_agent(tmp_path, monkeypatch):
    trainer = DynTieTrainer(model=tiny_model(), args=make_args(tmp_path, max_steps=8), train_dataset=byte_blocks())
    monkeypatch.setattr(trainer, "_reward_loss", lambda: float("nan"))
    before = {k: v.clone() for k, v in trainer.policy.state_dict()[0].items() if k.startswith("q_net")}
    trainer.train()
    after = trainer.policy.state_dict()[0]
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"{key} changed on a NaN reward"
    assert all(r["reward"] is None for r in trainer.history.records)
    logs = [h for h in trainer.state.log_history if "tie/skipped_nonfinite_loss" in h]
    assert logs, "a skipped decision must be logged"


def test_bad_arguments_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="tie_policy"):
        make_args(tmp_path, tie_policy="genetic")
    with pytest.raises(ValueError, match="tie_interval"):
        make_args(tmp_path, tie_interval=0)
    with pytest.raises(ValueError, match="epsilon"):
        make_args(tmp_path, tie_epsilon_start=1.5)
    with pytest.raises(ValueError, match="length"):
        DynTieTrainer(model=tiny_model(), args=make_args(tmp_path, tie_init="0,0,1"), train_dataset=byte_blocks())
    with pytest.raises(TypeError, match="DynTie"):
        from transformers import GPT2Config, GPT2LMHeadModel

        DynTieTrainer(model=GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2)), args=make_args(tmp_path))
    with pytest.raises(ValueError, match="FSDP"):
        DynTieTrainer(model=tiny_model(), args=make_args(tmp_path, fsdp="full_shard"), train_dataset=byte_blocks())


def test_sharding_that_cannot_happen_stops_in_one_line(tmp_path, monkeypatch):
    """No silent fall-back: FSDP asked for on a CPU (accelerate would train with DDP instead), from the arguments
    or from accelerate launch's environment, is refused before training, for static maps too."""
    for args in (make_args(tmp_path, fsdp="full_shard", fsdp_config={"fsdp_version": 2}),
                 make_args(tmp_path, tie_policy="sequence", tie_unique_layers=3)):
        if "fsdp_version" not in (args.fsdp_config or {}):
            monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        with pytest.raises(ValueError, match="silently trains with DDP") as error:
            DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks())
        assert "\n" not in str(error.value)


def test_follow_mode_override_and_gradient_accumulation(tmp_path):
    args = make_args(tmp_path, tie_mode="follow", gradient_accumulation_steps=2, max_steps=6,
                     activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False})
    trainer = DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks())
    trainer.train()
    assert trainer.dyntie_model.config.tie_mode == "follow"
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


@pytest.mark.slow
def test_two_processes_agree(tmp_path):
    """torchrun --nproc_per_node 2 (gloo): identical tie maps at every decision and identical weights."""
    run_torchrun("ddp_worker.py", str(tmp_path))
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert len(r0["maps"]) >= 5 and r0["maps"] == r1["maps"]
    assert len({tuple(m) for m in r0["maps"]}) > 1
    assert r0["greedy_maps"] == r1["greedy_maps"] and r0["scores"] == r1["scores"]
    assert len({tuple(m) for m in r0["greedy_maps"]}) > 1
    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    d0, d1 = load_file(tmp_path / "rank0_deltas.safetensors"), load_file(tmp_path / "rank1_deltas.safetensors")
    assert any(torch.count_nonzero(v) for k, v in d0.items() if k.endswith(".up"))  # the relaxed deltas trained
    for key in d0:
        assert torch.equal(d0[key], d1[key]), key
    assert r0["shrink_maps"] == r1["shrink_maps"]  # shrink: the same merges, one at a time, down to the budget
    assert len({tuple(m) for m in r0["shrink_maps"]}) >= 3 and len(set(r0["shrink_maps"][-1])) == 2
    s0, s1 = load_file(tmp_path / "rank0_shrink.safetensors"), load_file(tmp_path / "rank1_shrink.safetensors")
    assert any(torch.count_nonzero(v) for k, v in s0.items() if "tie_offset" in k)  # refitted offsets are in it
    for key in s0:  # weights, SVD-refitted deltas and offsets: identical on both ranks
        assert torch.equal(s0[key], s1[key]), key


def test_bf16_autocast_trains(tmp_path):
    args = make_args(tmp_path, bf16=True, max_steps=4)
    trainer = DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks())
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_load_best_model_at_end_restores_its_tie_map(tmp_path):
    data = byte_blocks()
    args = make_args(
        tmp_path, max_steps=12, eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", per_device_eval_batch_size=8,
        greater_is_better=True,  # "best" = the earliest, worst checkpoint: restoring it is not a no-op
        tie_epsilon_start=1.0, tie_epsilon_decay=1.0,  # keep exploring: the map moves between checkpoints
    )
    trainer = DynTieTrainer(model=tiny_model(), args=args, train_dataset=data, eval_dataset=data.select(range(8)))
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-4"
    best_map = json.loads((best / "config.json").read_text())["tie_map"]
    assert trainer.dyntie_model.tie_map == best_map
    stored = load_file(best / "model.safetensors")
    live = trainer.dyntie_model.state_dict()
    for key, value in stored.items():
        assert torch.equal(live[key], value), key


def test_default_epsilon_schedule_is_scaled_to_the_run(tmp_path):
    """Without --tie_epsilon_decay, epsilon reaches its floor ~65% into max_steps, whatever the run length."""
    from hf_dyntie.training.policies.base import scaled_epsilon_decay

    decay = scaled_epsilon_decay(1.0, 0.01, max_steps=1000, interval=4, num_layers=6)
    sweeps_to_floor = math.log(0.01) / math.log(decay)
    assert sweeps_to_floor == pytest.approx(0.65 * 1000 / (4 * 5))
    args = make_args(tmp_path, tie_epsilon_decay=None, max_steps=40, tie_interval=2)
    trainer = DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks())
    trainer.train()
    epsilons = [h["tie/epsilon"] for h in trainer.state.log_history if "tie/epsilon" in h]
    assert epsilons[0] > 0.1 and epsilons[-1] == pytest.approx(0.01)
    assert trainer.policy.epsilon_decay == pytest.approx(scaled_epsilon_decay(1.0, 0.01, 40, 2, NUM_LAYERS))
    assert trainer.policy.config.epsilon_decay is None  # the policy owns its schedule; nobody writes the config


def test_tie_init_model_keeps_the_loaded_map(tmp_path):
    loaded = [0, 0, 2, 2, 4, 4]
    args = make_args(tmp_path, tie_init="model", max_steps=2)
    trainer = DynTieTrainer(model=tiny_model(tie_map=loaded), args=args, train_dataset=byte_blocks())
    trainer._start_tying()  # what train() does first on a fresh run
    assert trainer.dyntie_model.tie_map == loaded
    trainer = DynTieTrainer(model=tiny_model(tie_map=loaded), args=make_args(tmp_path), train_dataset=byte_blocks())
    trainer._start_tying()
    assert trainer.dyntie_model.tie_map == [0] * NUM_LAYERS  # the paper code's start, for contrast


def test_replay_follows_the_recorded_steps(tmp_path):
    """A recording with a map at step 3: replayed with the default interval it is applied at step 3; with a
    decision every 2 steps it would be applied late, so that run is refused before training; a recorded step
    past the end is said."""
    recorded = [0, 1, 0, 3] + list(range(4, NUM_LAYERS))
    history = tmp_path / "recorded.jsonl"
    history.write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 0, "tie_map": [0] * NUM_LAYERS}, {"step": 3, "tie_map": recorded})))
    args = make_args(tmp_path / "run", tie_policy="replay", tie_replay_file=str(history), max_steps=6, tie_interval=None)
    trainer = DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks())
    trainer.train()
    assert trainer.dyntie_model.tie_map == recorded and [r["step"] for r in trainer.history.records] == [3]
    with pytest.raises(ValueError, match="late or drop them: use --tie_interval 1"):
        DynTieTrainer(model=tiny_model(), args=make_args(tmp_path / "b", tie_policy="replay", tie_replay_file=str(history),
                                                         max_steps=6, tie_interval=2), train_dataset=byte_blocks())


def test_ddp_looks_for_unused_parameters_only_when_a_map_can_leave_some_idle(tmp_path):
    """A fixed untied map gives every parameter a gradient: DDP's search (and its 'found no unused parameters'
    warning on every rank) is off; any policy that ties, or relaxed ties (untied deltas are idle), turns it on."""
    def flag(**overrides):
        args = make_args(tmp_path, **overrides)
        DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks())
        return args.ddp_find_unused_parameters

    assert flag(tie_policy="untied") is False
    assert flag(tie_policy="untied", tie_lora_rank=2) is True
    assert flag(tie_policy="grow", tie_interval=1) is True
