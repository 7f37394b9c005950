"""Training every family of ``hf_dyntie.families.FAMILIES``: the CLM script from scratch and from a stock
checkpoint, DynTieTrainer with every policy and an exact resume, two processes, and the benchmarks' Llama rows.
(What each family must show as a model: test_families.py.)"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from helpers import CAUSAL_FAMILIES, check_compact_checkpoint, clm_args, read_results, tiny_llama
from helpers import all_policies as _all_policies
from hf_dyntie.families import family_named


# ---- the training scripts ------------------------------------------------------------------------


def tiny_overrides(family) -> str:
    """``--config_overrides`` for a 4-layer tiny model of ``family``, in the field names it knows."""
    known = family.stock_config()
    fields = dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=64)
    return ",".join(f"{k}={v}" for k, v in fields.items() if hasattr(known, k))


def clm_from_scratch(corpus, out, family, *extra):
    argv = clm_args(corpus, out, *extra)
    argv[argv.index("--model_type") + 1] = family.model_type
    argv[argv.index("--config_overrides") + 1] = tiny_overrides(family)
    return argv


def check_run(out, family, num_layers=4):
    results = read_results(out)
    assert json.loads((out / "config.json").read_text())["model_type"] == family.model_type
    assert len(results["final_tie_map"]) == num_layers
    check_compact_checkpoint(out, transformers.AutoModelForCausalLM, results)
    return results


def test_clm_script_trains_a_llama_from_scratch(corpus, tmp_path):
    from helpers import CLM, run_in_process

    family = family_named("llama")
    out = tmp_path / "llama"
    assert run_in_process(CLM, clm_from_scratch(corpus, out, family)) == 0  # the Q-learning agent, the default
    check_run(out, family)
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out)).__name__ == "DynTieLlamaForCausalLM"


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["qlearning", "grow", "greedy"])
@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_clm_script_trains_every_family(family, policy, corpus, tmp_path):
    from helpers import CLM, run_in_process

    out = tmp_path / f"{family.name}-{policy}"
    extra = {"qlearning": (), "grow": ("--tie_budget", "3"), "greedy": ("--tie_score_tokens", "64")}[policy]
    assert run_in_process(CLM, clm_from_scratch(corpus, out, family, "--tie_policy", policy, *extra)) == 0
    results = check_run(out, family)
    if policy == "grow":
        assert results["final_unique_layers"] > 1


def test_clm_script_brings_a_stock_llama_in_untied(corpus, tmp_path):
    """--model_name_or_path of a stock LlamaForCausalLM folder, --tie_init model: it starts untied, computing
    exactly what the stock model computes."""
    from helpers import CLM, checkpoint_clm_args, run_in_process

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
    argv = checkpoint_clm_args(corpus, out, folder, "--max_steps", "4", "--tie_init", "model", "--tie_policy",
                               "greedy", "--tie_score_tokens", "64")
    assert run_in_process(CLM, argv) == 0
    results = check_run(out, family_named("llama"), num_layers=3)
    # the history starts with the start map (the checkpoint's own, untied); greedy's first decision (step 0)
    # scored the single ties of that map
    start, first = (json.loads(line) for line in (out / "tie_history.jsonl").read_text().splitlines()[:2])
    assert start["step"] == 0 and start["tie_map"] == [0, 1, 2] and start["action"] is None
    assert first["step"] == 0 and {tuple(c["tie_map"]) for c in first["scores"]} >= {(0, 0, 2), (0, 1, 0), (0, 1, 1)}
    assert results["final_unique_layers"] >= 2


# ---- DynTieTrainer -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policies",
    [pytest.param(["qlearning", "grow", "greedy", "untied", "all_tied", "replay"], id="main"),
     pytest.param(_all_policies(), id="all", marks=pytest.mark.slow)],
)
def test_trainer_runs_every_policy_on_llama(policies, tmp_path):
    from helpers import OptimizerHygiene, byte_blocks, make_args

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
    from helpers import byte_blocks, make_args

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
    from safetensors.torch import load_file

    from helpers import run_torchrun

    run_torchrun("ddp_families_worker.py", str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0["maps"]) >= 5 and r0["maps"] == r1["maps"] and len({tuple(m) for m in r0["maps"]}) > 1
    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)


@pytest.mark.slow
def test_benchmarks_have_llama_rows(tmp_path):
    """speed.py and memory.py --family llama (quick): the step rows, and training state = roots-only minimum."""
    import subprocess
    import sys

    from helpers import REPO_ROOT

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
