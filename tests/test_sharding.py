"""FSDP2 with tie maps that change while training (docs/design.md, "Sharded training").

The wrap is accelerate's own (``fsdp2_prepare_model``) in two gloo processes (tests/fsdp_worker.py): on a CPU,
``Trainer(fsdp=...)`` and ``Accelerator(fsdp_plugin=...)`` fall back to DDP, so a test through them would prove
nothing. Every comparison is against a single-process twin trained on the same global batches.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import run_torchrun
from hf_dyntie import DynTieGPT2LMHeadModel
from hf_dyntie.checkpoint_files import is_delta_key

pytest.importorskip("torch.distributed.fsdp")
LOSS_TOL = 2e-5


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    run_torchrun("fsdp_worker.py", str(out))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    run_torchrun("fsdp_worker.py", "--world1", str(out), processes=1, timeout=300)
    world1 = json.loads((out / "world1.json").read_text())
    return {"out": out, "rank0": ranks[0], "rank1": ranks[1], "world1": world1}


def test_every_family_and_mode_matches_its_single_process_twin(sharded_run):
    """GPT-2, BERT, Llama, Qwen2, Mistral at map [0,0,2,0,2,5], share / follow / relaxed (with and without vector
    offsets, and with relaxed roots): loss and every
    gradient (gathered) equal the twin's, and every parameter the twin trains gets a gradient."""
    families = sharded_run["rank0"]["families"]
    assert {k.split("/")[0] for k in families} == {"gpt2", "bert", "llama", "qwen2", "mistral"}
    for case, r in families.items():
        assert abs(r["loss"] - r["twin"]) < LOSS_TOL, case
        assert r["grad_error"] < 1e-6, case
        assert r["missing_grads"] == [], case


def test_ties_change_under_fsdp_as_on_one_device(sharded_run):
    """A tie, a grow-style untie (weights and AdamW moments copied shard by shard) and an averaging merge,
    with relaxed deltas and vector offsets: the sharded run's loss equals the twin's at every step."""
    run = sharded_run["rank0"]["dynamic"]
    assert len(run["losses"]) == len(run["twin"]) == 8
    for step, (a, b) in enumerate(zip(run["losses"], run["twin"])):
        assert abs(a - b) < LOSS_TOL, (step, a, b)
    assert sharded_run["rank1"]["dynamic"]["losses"] == run["losses"]  # every rank saw the same mean loss


def test_each_rank_holds_about_half_of_the_unique_bytes(sharded_run):
    """Tied positions' shards are views of their root's shard: each rank holds at most 0.6x the twin's unique
    parameter bytes (0.5 plus padding), and no optimizer state exists for idle parameters after a resume."""
    run = sharded_run["rank0"]["dynamic"]
    assert run["local_bytes"] <= 0.6 * run["twin_unique_bytes"]
    assert run["idle_with_state"] == 0


def test_resume_from_a_sharded_checkpoint_equals_the_uninterrupted_run(sharded_run):
    run = sharded_run["rank0"]["dynamic"]
    assert run["resumed"] == run["losses"][4:]


def test_a_sharded_checkpoint_resumes_on_another_world_size(sharded_run):
    """Saved by two ranks, resumed by one process on the whole batch: the same losses (to float rounding)."""
    expected = sharded_run["rank0"]["dynamic"]["losses"][4:]
    assert sharded_run["world1"]["losses"] == pytest.approx(expected, abs=LOSS_TOL)


def test_accelerates_ram_efficient_loading_keeps_the_tied_model(sharded_run):
    r = sharded_run["rank0"]["ram_efficient"]
    assert abs(r["loss"] - r["twin"]) < LOSS_TOL


def test_the_gathered_model_saves_compact_and_reloads(sharded_run):
    """save_pretrained of the gathered full state dict: the roots only, the map in config.json, and the
    reloaded model's logits equal the twin's."""
    out, run = sharded_run["out"], sharded_run["rank0"]["dynamic"]
    with safe_open(str(out / "saved" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith(f"transformer.h.{i}.") and not is_delta_key(k) for i in (2, 3, 4, 5) for k in keys)
    assert "transformer.h.3.ln_1.tie_offset.weight" in keys  # a tied position's own offsets are saved
    assert any(k.startswith("transformer.h.1.") for k in keys)
    model = DynTieGPT2LMHeadModel.from_pretrained(out / "saved").eval()
    assert model.tie_map == run["map"]
    expected = load_file(out / "twin_logits.safetensors")["logits"]
    from fsdp_worker import batch

    with torch.no_grad():
        logits = model(input_ids=batch(99)).logits
    assert torch.allclose(logits, expected, atol=1e-5), float((logits - expected).abs().max())


def test_a_wrap_tying_cannot_run_under_is_refused_in_one_line(sharded_run):
    message = sharded_run["rank0"]["refusals"]["blocks_only_relaxed"]
    assert message is not None and "TieDelta" in message and "\n" not in message


def test_greedy_scores_sharded_models_like_the_twin(sharded_run):
    """Candidate maps scored on the sharded model (forward-only loss changes, and first-order untie gains from
    each position's gradient) equal the twin's, and scoring leaves the map as it was."""
    r = sharded_run["rank0"]["scoring"]
    for got, want in zip(r["sharded"], r["expected"]):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert r["map_after"] == [0, 0, 2, 0, 2, 5]
