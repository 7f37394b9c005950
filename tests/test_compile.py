"""``torch.compile`` through changing tie maps: compiled layers follow any map without a recompile per map,
never fall back to eager, and compute exactly what the eager model computes.

Compilations are counted with a counting backend (``torch._dynamo.testing.CompileCounter``, which runs the
captured graphs as they are) and with dynamo's own counters; the guards a graph gets are dynamo's, whatever
the backend, so counting with a cheap backend proves the same recompile behaviour as inductor's."""

from __future__ import annotations

import random

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from helpers import all_policies as _all_policies
from hf_dyntie import DynTieGPT2Config, DynTieGPT2LMHeadModel
from hf_dyntie.tie_map import normalize_tie_map
from hf_dyntie.training.compiling import compile_bound
from hf_dyntie.training.trainer import DynTieTrainer
from hf_dyntie.compiled import block_kinds

NUM_LAYERS = 6
VOCAB = 64
SEQ = 16


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test counts its own compilations: no graph cached by an earlier test."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def tiny_pair(tie_mode: str, **fields) -> tuple[DynTieGPT2LMHeadModel, DynTieGPT2LMHeadModel]:
    """Two identical tiny GPT-2s (dropout on, so the graphs hold it): one to compile, one to stay eager."""
    config = DynTieGPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=NUM_LAYERS, n_head=2,
                              bos_token_id=0, eos_token_id=0, tie_mode=tie_mode, **fields)
    torch.manual_seed(0)
    compiled = DynTieGPT2LMHeadModel(config)
    eager = DynTieGPT2LMHeadModel(config)
    eager.load_state_dict(compiled.state_dict())
    return compiled, eager


def distinct_maps(count: int, seed: int = 0) -> list[list[int]]:
    """``count`` different random tie maps (some positions untied, the rest tied to random roots)."""
    rng, maps = random.Random(seed), []
    while len(maps) < count:
        tie_map = normalize_tie_map([i if rng.random() < 0.3 else rng.randint(0, i) for i in range(NUM_LAYERS)],
                                    NUM_LAYERS)
        if tie_map not in maps:
            maps.append(tie_map)
    return maps


def fell_back_to_eager() -> bool:
    """Whether dynamo gave up on a frame because it recompiled too often (it then runs it eagerly)."""
    return any("recompile_limit" in reason or "recompile limit" in reason for reason in counters["unimplemented"])


def train_steps(model, optimizer, batch: torch.Tensor, seed: int, steps: int = 2) -> list[torch.Tensor]:
    """Training steps (same dropout draws for both models via ``seed``); returns every gradient of the
    last step, ``None`` where a parameter got none."""
    for step in range(steps):
        torch.manual_seed(seed * 100 + step)
        model(input_ids=batch, labels=batch).loss.backward()
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return grads


def retie_and_train_alike(compiled, eager, optimizers, tie_map: list[int], batch: torch.Tensor, seed: int) -> None:
    """Both models move to ``tie_map`` and train the same steps; every gradient must be equal to the bit."""
    compiled.retie(tie_map)
    eager.retie(tie_map)
    got = train_steps(compiled, optimizers[0], batch, seed=seed)
    want = train_steps(eager, optimizers[1], batch, seed=seed)
    for g, w in zip(got, want):
        assert (g is None) == (w is None), f"map {tie_map}: a gradient exists in one model only"
        if g is not None:
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("tie_mode", ["share", "follow"])
def test_compiled_layers_follow_every_map_with_a_bounded_number_of_compilations(tie_mode):
    compiled, eager = tiny_pair(tie_mode)
    counter = CompileCounter()
    compiled.compile_layers(backend=counter)
    assert compiled.layers_compiled and not eager.layers_compiled
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (compiled, eager)]
    batches = torch.randint(0, VOCAB, (5, 4, SEQ), generator=torch.Generator().manual_seed(0))
    maps = distinct_maps(24)
    frames_after = []
    for k, tie_map in enumerate(maps):
        batch = batches[k % len(batches)][: 3 if k == 5 else 4]  # one partial batch: a new shape
        retie_and_train_alike(compiled, eager, optimizers, tie_map, batch, seed=k)
        if k % 6 == 3:  # evaluation (no grad, eval mode) and a no-grad forward of another shape
            compiled.eval(), eager.eval()
            with torch.no_grad():
                assert torch.equal(compiled(input_ids=batch, use_cache=False).logits, eager(input_ids=batch).logits)
                assert torch.equal(compiled(input_ids=batch[:1]).logits, eager(input_ids=batch[:1]).logits)
            compiled.train(), eager.train()
        frames_after.append(counter.frame_count)
    for p, q in zip(compiled.parameters(), eager.parameters()):
        assert torch.equal(p, q)
    bound = compile_bound(compiled, tie_mode)
    assert bound == (4 if tie_mode == "share" else 6)
    assert 1 <= counter.frame_count <= bound, f"{counter.frame_count} compilations over {len(maps)} maps"
    assert frames_after[-1] == frames_after[11], "the second half of the run (12 new maps) compiled again"
    assert not fell_back_to_eager()


def tiny_bert():
    """A 6-layer BERT masked LM (encoder blocks: no cache argument in use), dropout off."""
    import hf_dyntie

    torch.manual_seed(0)
    config = hf_dyntie.DynTieBertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=NUM_LAYERS, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return hf_dyntie.DynTieBertForMaskedLM(config)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_compiled_layers_of_other_families_follow_every_map_too(family):
    """Llama's decoder layer (rotary embeddings passed in, GQA, RMSNorm leaves) and BERT's encoder layer:
    same bound, same numbers as eager."""
    from helpers import tiny_llama

    build = tiny_llama if family == "llama" else tiny_bert
    compiled, eager = build(), build()  # both seeded alike
    compiled.config.tie_mode = eager.config.tie_mode = "follow"
    counter = CompileCounter()
    compiled.compile_layers(backend=counter)
    batch = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    for tie_map in distinct_maps(20):
        compiled.retie(tie_map)
        eager.retie(tie_map)
        got, want = compiled(input_ids=batch, labels=batch), eager(input_ids=batch, labels=batch)
        assert torch.equal(got.logits, want.logits)
        got.loss.backward()
        want.loss.backward()
        for p, q in zip(compiled.parameters(), eager.parameters()):
            assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad))
        compiled.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
    assert 1 <= counter.frame_count <= 2  # training graphs of one shape: untied/shared weights, detached weights
    assert compile_bound(compiled, "follow") == 6 and not fell_back_to_eager()


def test_whole_model_compile_recompiles_per_map_which_is_what_compile_layers_avoids():
    """The control: ``torch.compile(model)`` specialises on the map (the guard on the routing), so the count
    above would catch a design that recompiles per map."""
    model, _ = tiny_pair("share")
    counter = CompileCounter()
    run = torch.compile(model, backend=counter)
    batch = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    maps = distinct_maps(3)
    for tie_map in maps:
        model.retie(tie_map)
        run(input_ids=batch, labels=batch).loss.backward()
    assert counter.frame_count >= len(maps)


def test_a_cached_generation_step_runs_eagerly_and_matches():
    """A KV cache is per position: compiled blocks leave cached calls to the eager leaves, so generation
    with compiled layers equals eager generation."""
    compiled, eager = tiny_pair("follow")
    counter = CompileCounter()
    compiled.compile_layers(backend=counter)
    for model in (compiled, eager):
        model.retie([0, 0, 2, 2, 0, 5])
        model.eval()
    prompt = torch.randint(1, VOCAB, (1, 4), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(compiled.generate(prompt, **kwargs), eager.generate(prompt, **kwargs))
    assert counter.frame_count == 0


@pytest.mark.parametrize("vectors, roots", [(False, False), (True, False), (True, True)],
                         ids=["deltas", "deltas+offsets", "deltas+offsets+roots"])
@pytest.mark.parametrize("tie_mode", ["share", "follow"])
def test_compiled_relaxed_ties_train_exactly_as_eager(tie_mode, vectors, roots):
    """Relaxed ties (tie_lora_rank): a tied block adds its own delta inside the compiled graph (and its vector
    offsets, tie_lora_vectors, outside it), and so does a root with followers under tie_lora_roots; training
    through maps that tie, untie (folding deltas) and re-tie matches eager to the bit, within the bound."""
    compiled, eager = tiny_pair(tie_mode, tie_lora_rank=2, tie_lora_vectors=vectors, tie_lora_roots=roots)
    counter = CompileCounter()
    compiled.compile_layers(backend=counter)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (compiled, eager)]
    batch = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(0))
    maps = [[0, 0, 0, 0, 0, 0], [0, 0, 2, 2, 4, 4], [0, 1, 2, 2, 4, 5], [0, 0, 2, 3, 3, 5], list(range(6))]
    for k, tie_map in enumerate(maps):
        retie_and_train_alike(compiled, eager, optimizers, tie_map, batch, seed=k)
    for p, q in zip(compiled.parameters(), eager.parameters()):
        assert torch.equal(p, q)
    bound = compile_bound(compiled, tie_mode)
    assert bound == (10 if roots and tie_mode == "follow" else 8)  # relaxed and plain blocks: separate graphs
    assert 1 <= counter.frame_count <= bound, f"{counter.frame_count} compilations"
    assert not fell_back_to_eager()


def test_compiled_layers_keep_tied_parameters_free_and_route_gradients():
    """Share: the root's gradient is the sum over its positions, tied parameters get none and keep
    pointing at the root's storage; the parameter list is the very same objects."""
    compiled, eager = tiny_pair("share")
    before = [id(p) for p in compiled.parameters()]
    compiled.compile_layers(backend="eager")
    compiled.retie([0, 0, 0, 3, 3, 3])
    batch = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    compiled.eval()  # no dropout: one forward to compare
    compiled(input_ids=batch, labels=batch).loss.backward()
    layers = compiled.dyntie_layers
    assert [id(p) for p in compiled.parameters()] == before
    for i in (1, 2, 4, 5):
        for p, q in zip(layers[i].parameters(), layers[i - 1 if i in (1, 4) else i - 2].parameters()):
            assert p.grad is None and p.data_ptr() == q.data_ptr()
    assert all(p.grad is not None for p in layers[0].parameters())
    compiled.uncompile_layers()
    assert not compiled.layers_compiled


@pytest.mark.slow
@pytest.mark.parametrize("tie_mode", ["share", "follow"])
def test_inductor_compiles_a_bounded_number_of_times_over_twenty_maps(tie_mode):
    """The real compiler: inductor's kernels compute what eager does (to float tolerance) on every map, and
    dynamo compiles within the bound, never falling back."""
    compiled, eager = tiny_pair(tie_mode)
    compiled.compile_layers(backend="inductor")
    compiled.eval(), eager.eval()  # no dropout: inductor draws its own random numbers
    batch = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    for tie_map in distinct_maps(20):
        compiled.retie(tie_map)
        eager.retie(tie_map)
        got = compiled(input_ids=batch, labels=batch, use_cache=False)  # a cache would run the blocks eagerly
        want = eager(input_ids=batch, labels=batch)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
        got.loss.backward()
        want.loss.backward()
        for p, q in zip(compiled.parameters(), eager.parameters()):
            assert (p.grad is None) == (q.grad is None)
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5)
        compiled.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
    assert 1 <= counters["frames"]["ok"] <= (1 if tie_mode == "share" else 2)  # training graphs of one shape
    assert not fell_back_to_eager()


# ---- DynTieTrainer(torch_compile=True) ------------------------------------------------------------


def test_trainer_torch_compile_runs_every_policy_within_the_bound(tmp_path):
    """Every policy trains with ``torch_compile=True``: the layers compile, the whole model does not (no
    accelerate ``torch.compile``), and all the runs together (over 20 distinct maps, training, evaluation,
    held-out rewards and greedy's scoring) compile no more than the stated bound."""
    from helpers import BLOCK, byte_blocks, make_args, tiny_model

    from hf_dyntie.training.history import HISTORY_NAME

    data = byte_blocks()
    extra = {"greedy": dict(tie_score_tokens=64), "grow": dict(tie_budget=3), "sequence": dict(tie_unique_layers=2),
             "cycle": dict(tie_unique_layers=2), "cycle_rev": dict(tie_unique_layers=2),
             "qlearning": dict(tie_reward_source="eval_batch"), "shrink": dict(tie_budget=2)}
    maps_seen: set[tuple[int, ...]] = set()
    for policy in _all_policies():
        options = extra.get(policy) or {}
        if policy == "replay":
            options = dict(tie_replay_file=str(tmp_path / "qlearning" / HISTORY_NAME))
        args = make_args(tmp_path / policy, max_steps=24, tie_interval=1, tie_policy=policy, torch_compile=True,
                         torch_compile_backend="eager", eval_strategy="steps", eval_steps=8, **options)
        model = tiny_model(tie_mode="follow")
        trainer = DynTieTrainer(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(6)))
        assert trainer.model is model and model.layers_compiled  # accelerate did not wrap the whole model
        trainer.train()
        assert not isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule), policy
        maps_seen.update(tuple(r["tie_map"]) for r in trainer.history.records)
    assert counters["frames"]["ok"] >= 1
    assert counters["frames"]["ok"] <= compile_bound(model, "follow") == 6
    assert not fell_back_to_eager()
    assert len(maps_seen) >= 20
    assert BLOCK == SEQ  # the trainer's tiny model has the shapes of this file's


def test_speed_benchmark_compiled_rows_quick(tmp_path):
    """``benchmarks/speed.py --compiled`` (dynamo's eager backend here, seconds): every row is there, and the
    compile-time run through its maps compiles within the bound while ``torch.compile(model)`` compiles per map."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(repo / "benchmarks" / "speed.py"), "--quick", "--compiled", "--skip-steps",
               "--skip-trainer", "--compile-backend", "eager", "--output", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, cwd=repo, timeout=600)
    data = json.loads((tmp_path / "speed_compiled_quick.json").read_text())
    rows = {r["row"]: r for r in data["compiled_steps"]}
    assert {"identity / share", "75% tied / share", "75% tied / follow"} <= set(rows)
    layers, whole = data["compile_time"]
    assert layers["maps"] == 6 and 1 <= layers["compilations"] <= 6 and not layers["fell_back_to_eager"]
    assert whole["compilations"] >= whole["maps"] == 3


def test_trainer_torch_compile_matches_the_eager_run(tmp_path):
    """Same seeds, same maps: the compiled run's weights equal the eager run's (dynamo's eager backend
    replays the same operations)."""
    from helpers import byte_blocks, make_args, tiny_model

    data = byte_blocks()
    weights = []
    for compile_ in (False, True):
        options = dict(torch_compile=True, torch_compile_backend="eager") if compile_ else {}
        args = make_args(tmp_path / str(compile_), max_steps=10, tie_interval=1, tie_policy="random", **options)
        trainer = DynTieTrainer(model=tiny_model(tie_mode="share"), args=args, train_dataset=data)
        trainer.train()
        weights.append([p.detach().clone() for p in trainer.dyntie_model.parameters()])
    assert len({tuple(r["tie_map"]) for r in trainer.history.records}) >= 5
    for a, b in zip(*weights):
        assert torch.equal(a, b)


def test_trainer_warns_when_its_settings_could_exceed_the_recompile_limit(tmp_path, caplog):
    from helpers import byte_blocks, make_args, tiny_model

    args = make_args(tmp_path, max_steps=2, torch_compile=True, torch_compile_backend="eager")
    caplog.set_level("WARNING", logger="hf_dyntie.training.trainer")
    with torch._dynamo.config.patch(recompile_limit=4):
        DynTieTrainer(model=tiny_model(tie_mode="follow"), args=args, train_dataset=byte_blocks())
    said = [r.getMessage() for r in caplog.records if "recompile_limit" in r.getMessage()]
    assert len(said) == 1 and "up to 6 times" in said[0] and "recompile_limit=4" in said[0], said
    caplog.clear()
    DynTieTrainer(model=tiny_model(tie_mode="follow"), args=args, train_dataset=byte_blocks())  # limit 8 holds 6
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]
    # a block configured per position (attention scaled by 1 / (layer_idx + 1)) needs a graph per position
    model = tiny_model(tie_mode="share", scale_attn_by_inverse_layer_idx=True)
    assert block_kinds(model.dyntie_layers) == 6 and block_kinds(tiny_model().dyntie_layers) == 1
    DynTieTrainer(model=model, args=args, train_dataset=byte_blocks())
    said = [r.getMessage() for r in caplog.records if "recompile_limit" in r.getMessage()]
    assert len(said) == 1 and "up to 24 times (6 differently configured block(s)" in said[0], said
