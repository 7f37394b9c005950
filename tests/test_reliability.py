"""Nothing lost, nothing silent: diverged runs stop, loaded models keep their layers, bad input fails early.

Each test asserts what a user sees: exceptions and their one-line messages, exit codes, which files exist
afterwards (hashed before and after where a command must not touch them), and which weights are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import paper_config
from datasets import Dataset
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

from hf_dyntie import DynTieGPT2Config, DynTieGPT2LMHeadModel
from hf_dyntie.convert import from_stock
from hf_dyntie.training.policies import QLearningPolicy, RewardFunction
from hf_dyntie.training.checkpoints import CheckpointError
from hf_dyntie.training.start import build_policy
from hf_dyntie.training.nonfinite import NonFiniteLossError
from hf_dyntie.training.saving import DiskFullError
from hf_dyntie.training.trainer import DynTieTrainer
from hf_dyntie.training.training_args import DynTieTrainingArguments

NUM_LAYERS = 6
BLOCK = 16
LOADED_MAP = [0, 1, 1, 3, 0, 1]  # roots 0, 1 and 3


# ---- helpers ----------------------------------------------------------------------------------------------


def byte_blocks(num_blocks: int = 32) -> Dataset:
    from pydoc_data.topics import topics

    data = "\n".join(topics[k] for k in sorted(topics)).encode("utf-8")[: num_blocks * BLOCK]
    blocks = [list(data[i : i + BLOCK]) for i in range(0, len(data) - BLOCK + 1, BLOCK)]
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def tiny_config(**overrides) -> DynTieGPT2Config:
    return DynTieGPT2Config(
        vocab_size=256, n_positions=BLOCK, n_embd=32, n_layer=NUM_LAYERS, n_head=4, bos_token_id=0, eos_token_id=0,
        **overrides,
    )  # fmt: skip


def tiny_model(seed: int = 0, **overrides) -> DynTieGPT2LMHeadModel:
    torch.manual_seed(seed)
    return DynTieGPT2LMHeadModel(tiny_config(**overrides))


def make_args(out: Path, **overrides) -> DynTieTrainingArguments:
    defaults = dict(
        output_dir=str(out), max_steps=8, per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, tie_policy="qlearning",
        tie_interval=2, tie_reward="neg_loss", dataloader_num_workers=0,
    )  # fmt: skip
    defaults.update(overrides)
    return DynTieTrainingArguments(**defaults)


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }  # fmt: skip


def all_finite(tensors) -> bool:
    return all(torch.isfinite(t).all() for t in tensors)


class NaNLossTrainer(DynTieTrainer):
    """A trainer whose training loss is NaN at the optimizer steps in ``nan_steps`` (0-based global step):
    a bad batch, as an overflow in the forward pass gives one."""

    nan_steps: set[int] = set()

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if self.state.global_step in self.nan_steps and model.training:
            loss = loss * float("nan")
        return loss


class Snapshots(TrainerCallback):
    """The model's weights after every optimizer step."""

    def __init__(self):
        self.trainer = None
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, **kwargs):
        model = self.trainer.dyntie_model
        self.after[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- 1. a diverged run stops --------------------------------------------------------------------------------


def test_first_nonfinite_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = make_args(out, save_strategy="steps", save_steps=2)
    trainer = NaNLossTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks())
    trainer.nan_steps = {4}
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    message = str(info.value)
    assert "\n" not in message
    assert "training loss is nan at optimizer step 5" in message
    assert f"the last checkpoint is {out / 'checkpoint-4'}" in message
    assert "learning_rate (now 0.003)" in message and "max_grad_norm" in message
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert all_finite(load_file(out / "checkpoint-4" / "model.safetensors").values())
    assert not (out / "model.safetensors").exists()  # nothing saved as the result
    assert trainer.state.global_step == 4  # the bad step made no update
    assert all_finite(trainer.dyntie_model.parameters())


def warnings_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_tolerated_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, caplog):
    snapshots = Snapshots()
    trainer = NaNLossTrainer(
        model=tiny_model(), args=make_args(tmp_path / "a", tie_max_nonfinite=3), train_dataset=byte_blocks(),
        callbacks=[snapshots],
    )  # fmt: skip
    snapshots.trainer = trainer
    trainer.nan_steps = {2, 5}
    caplog.clear()
    trainer.train()  # two bad steps of three allowed: the run finishes
    messages = warnings_logged(caplog)
    assert trainer.state.global_step == 8
    assert all_finite(trainer.dyntie_model.parameters())
    skipped = [m for m in messages if "skipping its update" in m]
    assert len(skipped) == 2 and "optimizer step 3" in skipped[0] and "1 of tie_max_nonfinite=3" in skipped[0]
    # a skipped step leaves every weight as it was (the tie map may change at a decision, not the weights)
    for step in (3, 6):  # global_step after the skipped steps 2 and 5
        before, after = snapshots.after[step - 1], snapshots.after[step]
        for key in before:
            assert torch.equal(before[key], after[key]), (step, key)

    trainer = NaNLossTrainer(model=tiny_model(), args=make_args(tmp_path / "b", tie_max_nonfinite=3),
                             train_dataset=byte_blocks())
    trainer.nan_steps = {1, 3, 6}
    with pytest.raises(NonFiniteLossError, match=r"step 7 \(non-finite step 3 of tie_max_nonfinite=3\)"):
        trainer.train()


def test_tie_max_nonfinite_zero_keeps_the_stock_behaviour(tmp_path):
    trainer = NaNLossTrainer(model=tiny_model(), args=make_args(tmp_path, tie_max_nonfinite=0, max_steps=4),
                             train_dataset=byte_blocks())
    trainer.nan_steps = {2}
    trainer.train()  # no stop: the NaN update goes through, as with transformers' Trainer
    assert not all_finite(trainer.dyntie_model.parameters())
    with pytest.raises(ValueError, match="tie_max_nonfinite"):
        make_args(tmp_path, tie_max_nonfinite=-1)


def test_absurd_finite_losses_are_clipped_before_the_q_network():
    policy = QLearningPolicy(4, paper_config(epsilon_start=0.0, reward="neg_loss", q_hidden=8))
    for loss in (3.0, 1e8, 2.9):
        policy.decide([0, 1, 2, 3], step=0)
        out = policy.learn(loss)
        assert abs(out["reward"]) <= 20.0 and out["q_loss"] < 1e3, out
    assert RewardFunction("neg_loss")(1e8) == -20.0
    assert RewardFunction("neg_loss")(2.5) == -2.5  # sane values untouched
    assert RewardFunction("paired")(-1e6) == -2000.0
    improvement = RewardFunction("loss_improvement")
    improvement(3.0)
    improvement(1e8)
    assert improvement.baseline <= 20.0  # the running baseline is not poisoned
    assert abs(improvement(3.0)) <= 40.0


# ---- 2. loaded models keep their trained layers -------------------------------------------------------------


class MapAtStart(TrainerCallback):
    def __init__(self):
        self.trainer, self.tie_map = None, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.tie_map = self.trainer.dyntie_model.tie_map


def start_map(model, args, caplog) -> tuple[list[int], list[str]]:
    """The map training starts from, and the warnings logged on the way."""
    probe = MapAtStart()
    trainer = DynTieTrainer(model=model, args=args, train_dataset=byte_blocks(), callbacks=[probe])
    probe.trainer = trainer
    caplog.clear()
    trainer.train()
    return probe.tie_map, warnings_logged(caplog)


@pytest.fixture
def tied_checkpoint(tmp_path) -> Path:
    folder = tmp_path / "tied"
    tiny_model(seed=3, tie_map=LOADED_MAP).save_pretrained(folder)
    return folder


def test_loaded_model_starts_from_its_own_map_and_says_so(tied_checkpoint, tmp_path, caplog):
    model = DynTieGPT2LMHeadModel.from_pretrained(tied_checkpoint)
    tie_map, messages = start_map(model, make_args(tmp_path / "out", max_steps=2), caplog)  # README defaults
    assert tie_map == LOADED_MAP
    said = [m for m in messages if "tying starts from the model's own map" in m]
    assert len(said) == 1 and str(tied_checkpoint) in said[0] and "tie_init='all_tied'" in said[0]


def test_explicit_all_tied_on_loaded_model_names_the_dropped_layers(tied_checkpoint, tmp_path, caplog):
    model = DynTieGPT2LMHeadModel.from_pretrained(tied_checkpoint)
    tie_map, messages = start_map(model, make_args(tmp_path / "out", max_steps=2, tie_init="all_tied"), caplog)
    assert tie_map == [0] * NUM_LAYERS
    said = [m for m in messages if "discarding their trained weights" in m]
    assert len(said) == 1 and "layer(s) [1, 3]" in said[0], messages


def test_fresh_model_starts_all_tied_without_a_word(tmp_path, caplog):
    tie_map, messages = start_map(tiny_model(tie_map=LOADED_MAP), make_args(tmp_path / "out", max_steps=2), caplog)
    assert tie_map == [0] * NUM_LAYERS  # nothing trained to lose: the paper's start
    assert not [m for m in messages if "DynTieTrainer" in m], messages


def test_from_stock_and_retrained_models_keep_their_maps(tmp_path, caplog):
    torch.manual_seed(0)
    stock = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=BLOCK, n_embd=32, n_layer=NUM_LAYERS, n_head=4))
    model = from_stock(stock)
    tie_map, _ = start_map(model, make_args(tmp_path / "a", max_steps=2), caplog)
    assert tie_map == list(range(NUM_LAYERS))
    # the same model, trained once, handed to a second trainer: it continues from where the first left it
    reached = model.tie_map
    tie_map, _ = start_map(model, make_args(tmp_path / "b", max_steps=2), caplog)
    assert tie_map == reached


def test_loaded_model_over_the_budget_is_refused_before_training(tied_checkpoint, tmp_path):
    model = DynTieGPT2LMHeadModel.from_pretrained(tied_checkpoint)
    with pytest.raises(ValueError, match=r"3 unique layers, more than tie_budget=2; pass tie_init='all_tied'"):
        DynTieTrainer(model=model, args=make_args(tmp_path, tie_budget=2), train_dataset=byte_blocks())


# ---- resume refusals ----------------------------------------------------------------------------------------


def test_resume_true_means_the_latest_checkpoint(tmp_path):
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks()).train()
    args = make_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=2)
    trainer = DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks())
    trainer.train(resume_from_checkpoint="True")  # how a command line spells it
    assert trainer.state.global_step == 6 and trainer._last_checkpoint.endswith("checkpoint-6")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        DynTieTrainer(model=tiny_model(), args=make_args(tmp_path / "empty"), train_dataset=byte_blocks()).train(True)


def test_resume_refuses_a_checkpoint_lacking_root_weights(tmp_path):
    args = make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, tie_policy="untied")
    DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks()).train()
    checkpoint = tmp_path / "checkpoint-2"
    state = json.loads((checkpoint / "dyntie_state.json").read_text())
    # the saved map trains layer 2 on its own, but the weights lack it (as from a compact save of another map)
    weights = load_file(checkpoint / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v for k, v in weights.items() if not k.startswith("transformer.h.2.")},
              checkpoint / "model.safetensors", metadata={"format": "pt"})
    assert state["tie_map"][2] == 2
    before = digest(checkpoint)
    trainer = DynTieTrainer(model=tiny_model(), args=make_args(tmp_path, max_steps=4, tie_policy="untied"),
                            train_dataset=byte_blocks())
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=r"lacks the weights of layer\(s\) \[2\]"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert time.monotonic() - started < 30
    assert digest(checkpoint) == before


# ---- the scripts: one line, exit status, before any data work -------------------------------------------------

from test_scripts import CLM, _replace, clm_args, corpus, run_in_process  # noqa: E402,F401  (corpus: a fixture)


def script_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "nothing on stderr"
    return lines[-1]


def test_diverged_script_run_exits_3_with_one_line_and_saves_no_model(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_in_process(CLM, clm_args(corpus, out, "--learning_rate", "1e30"))
    assert code == 3
    line = script_error(capsys)
    assert line.startswith("error: training loss is nan at optimizer step "), line
    assert "learning_rate (now 1e+30)" in line and "max_grad_norm" in line
    for name in ("model.safetensors", "README.md", "all_results.json"):
        assert not (out / name).exists(), name


LATE_ERRORS = {
    "unique layers over the depth": (["--tie_policy", "sequence", "--tie_unique_layers", "9"], "unique_layers must lie in 1..4"),
    "cycle without unique layers": (["--tie_policy", "cycle"], "needs unique_layers (--tie_unique_layers)"),
    "tie_init of another depth": (["--tie_init", "0,0,1"], "tie_map has length 3 but the model has 4 layers"),
    "tie_init that is no map": (["--tie_init", "zero"], "tie_init 'zero' is none of"),
    "missing replay file": (["--tie_policy", "replay", "--tie_replay_file", "{tmp}/nope.jsonl"], "does not exist"),
    "eval_batch reward without eval data": (["--tie_reward_source", "eval_batch", "-no-eval"], "pass --do_eval"),
    "greedy without eval data": (["--tie_policy", "greedy", "-no-eval"], "pass --do_eval"),
    "resume from a missing folder": (["--resume_from_checkpoint", "{tmp}/nope"], "does not exist"),
    "resume True with no checkpoint": (["--resume_from_checkpoint", "True"], "holds no checkpoint-* folder"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LATE_ERRORS))
def test_tying_arguments_fail_in_seconds_before_any_data_work(case, corpus, tmp_path, capsys):
    extra, expected = LATE_ERRORS[case]
    extra = [x.replace("{tmp}", str(tmp_path)) for x in extra]
    argv = _replace(clm_args(corpus, tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"))
    if "-no-eval" in extra:
        extra.remove("-no-eval")
        argv.remove("--do_eval")
    started = time.monotonic()
    assert run_in_process(CLM, argv + extra) == 2
    assert time.monotonic() - started < 20
    line = script_error(capsys)
    assert line.startswith("error: ") and expected in line, line
    assert not (tmp_path / "cache").exists()  # no dataset was loaded or tokenized


def test_unused_tie_unique_layers_is_a_warning(tmp_path, caplog):
    build_policy(tiny_model(), make_args(tmp_path, tie_unique_layers=3, tie_seed=123))  # qlearning ignores it
    assert any("tie_unique_layers=3 is ignored" in m for m in warnings_logged(caplog))


def test_output_dir_of_another_run_is_refused_resumed_or_cleared(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    base = clm_args(corpus, out, "--save_strategy", "steps", "--save_steps", "2", "--max_steps", "4")
    assert run_in_process(CLM, base) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    before = digest(out)

    capsys.readouterr()
    assert run_in_process(CLM, base) == 2  # a second run into the same folder
    line = script_error(capsys)
    assert "holds checkpoints of an earlier run (checkpoint-2, checkpoint-4)" in line, line
    assert "--resume_from_checkpoint last" in line and "--overwrite_output_dir" in line
    assert digest(out) == before

    assert run_in_process(CLM, base + ["--max_steps", "6", "--resume_from_checkpoint", "last"]) == 0
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    after = digest(out)
    assert {k: v for k, v in after.items() if k.startswith("checkpoint-2/")} == \
        {k: v for k, v in before.items() if k.startswith("checkpoint-2/")}  # continued, not started over

    assert run_in_process(CLM, base + ["--max_steps", "2", "--overwrite_output_dir"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2


# ---- the first run: threads and noise -------------------------------------------------------------------------

from hf_dyntie.scripts.arguments import cpu_threads  # noqa: E402


def test_cpu_threads_follow_the_idle_cores():
    assert cpu_threads(cores=2, load=1.9, processes=1, default=2) == 1  # a busy 2-core machine: one thread
    assert cpu_threads(cores=2, load=3.5, processes=1, default=2) == 1  # overloaded: still one
    assert cpu_threads(cores=8, load=0.2, processes=1, default=8) == 8  # idle: torch's default
    assert cpu_threads(cores=8, load=0.0, processes=2, default=8) == 4  # two local ranks share the cores
    assert cpu_threads(cores=16, load=0.0, processes=1, default=8) == 8  # never above torch's default


def test_cpu_script_run_says_its_threads_and_does_not_warn_about_pin_memory(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert run_in_process(CLM, clm_args(corpus, tmp_path / "out", "--max_steps", "2")) == 0
    finally:
        torch.set_num_threads(threads)
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("CPU threads: ")]
    assert len(said) == 1 and "set OMP_NUM_THREADS to choose" in said[0], said
    assert not [w for w in caught if "pin_memory" in str(w.message)]


# ---- 3. command-line edges: the source is never touched, errors are one line --------------------------------

from hf_dyntie.cli import main as cli_main  # noqa: E402


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A compact tied checkpoint (map [0 0 2 0 2 5])."""
    folder = tmp_path / "ckpt"
    tiny_model(tie_map=[0, 0, 2, 0, 2, 5]).save_pretrained(folder)
    return folder


def cli_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("where", ["itself", "inside"])
def test_expand_refuses_to_write_into_its_source(checkpoint, where, capsys):
    before = digest(checkpoint)
    dst = checkpoint if where == "itself" else checkpoint / "plain"
    assert cli_main(["expand", str(checkpoint), str(dst)]) == 2
    assert "is the source checkpoint or inside it" in cli_error(capsys)
    assert digest(checkpoint) == before and not (checkpoint / "plain").exists()
    assert json.loads((checkpoint / "config.json").read_text())["tie_map"] == [0, 0, 2, 0, 2, 5]


def test_expand_never_leaves_half_a_folder(checkpoint, tmp_path, capsys, monkeypatch):
    import hf_dyntie.convert

    def fail_halfway(src, out):
        (Path(out) / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(hf_dyntie.convert, "expand", fail_halfway)
    assert cli_main(["expand", str(checkpoint), str(tmp_path / "plain")]) == 2
    assert cli_error(capsys) == "error: disk full"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no plain/, no partial folder

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert cli_main(["expand", str(checkpoint), str(occupied)]) == 2
    assert "exists and is not empty" in cli_error(capsys)
    assert digest(occupied) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


@pytest.mark.parametrize("damage", ["truncated", "short", "garbage"])
def test_damaged_weights_are_one_line_errors(checkpoint, tmp_path, damage, capsys):
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "short": data[:5], "garbage": b"\xff" * 64}[damage])
    before = digest(checkpoint)
    expected = {"truncated": "is truncated", "short": "is not a safetensors file", "garbage": "not a safetensors file"}
    for command in (["inspect", str(checkpoint)], ["expand", str(checkpoint), str(tmp_path / "plain")]):
        assert cli_main(command) == 2, command
        line = cli_error(capsys)
        assert str(weights) in line and expected[damage] in line, line
    assert digest(checkpoint) == before and not (tmp_path / "plain").exists()


@pytest.mark.parametrize("edit", ["vocab_size", "more layers", "fewer layers"])
def test_inspect_refuses_a_config_that_does_not_fit_the_weights(tmp_path, edit, capsys):
    folder = tmp_path / "untied"
    tiny_model().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    change, expected = {
        "vocab_size": ({"vocab_size": 300}, "'transformer.wte.weight' has shape [256, 32] in the weights but [300, 32]"),
        "more layers": ({"n_layer": 8}, "the weights lack 'transformer.h.6."),
        "fewer layers": ({"n_layer": 4}, "the weights hold 'transformer.h.4."),
    }[edit]  # fmt: skip
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    capsys.readouterr()
    assert cli_main(["inspect", str(folder)]) == 2
    line = cli_error(capsys)
    assert "config.json does not fit the weights" in line and expected in line, line


@pytest.mark.parametrize("name", ["./no-such-run", "{tmp}/runs/quickstrat"])
def test_expand_of_a_mistyped_local_path_fails_at_once(tmp_path, name, capsys):
    (tmp_path / "runs").mkdir()
    name = name.replace("{tmp}", str(tmp_path))
    started = time.monotonic()
    assert cli_main(["expand", name, str(tmp_path / "plain")]) == 2
    assert time.monotonic() - started < 5  # no Hub lookup
    assert cli_error(capsys) == f"error: {name} does not exist"


def test_script_refuses_a_corrupt_checkpoint_in_one_line(corpus, checkpoint, tmp_path, capsys):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    argv = [a for a in clm_args(corpus, tmp_path / "out") if a not in ("--model_type", "dyntie_gpt2")]
    argv = _replace(argv, "--config_overrides", None)
    assert run_in_process(CLM, ["--model_name_or_path", str(checkpoint), *argv]) == 2
    line = script_error(capsys)
    assert line.startswith(f"error: cannot load the model {str(checkpoint)!r}"), line


def test_inspect_skips_tensors_the_model_does_not_load_like_from_pretrained(tmp_path, capsys):
    """Old GPT-2 checkpoints carry attention-mask buffers, pretrained BERTs a pooler the MLM head lacks: they
    are not refused (from_pretrained skips them) and not counted as parameters."""
    from safetensors.torch import save_file

    folder = tmp_path / "stock"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=4)).save_pretrained(folder)
    assert cli_main(["inspect", str(folder), "--json"]) == 0
    clean = json.loads(capsys.readouterr().out)
    weights = load_file(folder / "model.safetensors")
    extra = {"transformer.h.0.attn.bias": torch.ones(1, 1, BLOCK, BLOCK), "transformer.pooler.weight": torch.ones(3)}
    save_file({**weights, **extra}, folder / "model.safetensors", metadata={"format": "pt"})
    assert cli_main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["unused_tensors"] == sorted(extra)
    assert info["stored_parameters"] == clean["stored_parameters"] == clean["total_parameters"]
    assert cli_main(["inspect", str(folder)]) == 0
    assert "not loaded:            2 tensors" in capsys.readouterr().out


# ---- 6. load noise: refuse first ------------------------------------------------------------------------------


def test_a_config_that_does_not_fit_the_weights_is_refused_before_the_load_report(tmp_path):
    from conftest import captured_warnings

    folder = tmp_path / "tied"
    tiny_model(tie_map=[0] * NUM_LAYERS).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_map": LOADED_MAP}))  # roots 1, 3 not stored
    with captured_warnings() as messages, pytest.raises(ValueError, match="lacks weights of layers"):
        DynTieGPT2LMHeadModel.from_pretrained(folder)
    assert not [m for m in messages if "MISSING" in m or "LOAD REPORT" in m or "newly initialized" in m], messages


# ---- 7. the README works as written ---------------------------------------------------------------------------

import re as _re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_blocks(language: str) -> list[str]:
    return _re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=_re.DOTALL)


def test_readme_python_runs_as_written(tmp_path):
    """Every Python block of the README, in order, in one fresh interpreter, offline. Two edits only:
    ``max_steps`` is cut to 4 (enough for the budgets grow is asked to reach), and the block that pushes to the Hub is left out (it needs an account)."""
    blocks = [b for b in readme_blocks("python") if "push_to_hub" not in b]
    assert len(blocks) >= 3 and any("DynTieTrainer(" in b for b in blocks)
    code = "\n".join(_re.sub(r"max_steps=\d+", "max_steps=4", b) for b in blocks)
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "HF_HOME": str(tmp_path / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final_tie_map" in proc.stdout  # the last line of the training block printed the summary
    assert (tmp_path / "runs" / "dlt" / "model.safetensors").is_file()


# ---- nothing lost: used folders, interrupted saves, inexact resumes (round 2) -------------------------------


def checkpointed_run(corpus, out: Path, *extra: str) -> list[str]:
    argv = clm_args(corpus, out, "--save_strategy", "steps", "--save_steps", "2", "--max_steps", "4", *extra)
    assert run_in_process(CLM, argv) == 0
    return argv


def test_a_refused_overwrite_deletes_nothing(corpus, tmp_path, capsys):
    """--overwrite_output_dir with a bad flag: the flag is refused before anything is deleted."""
    out = tmp_path / "out"
    base = checkpointed_run(corpus, out)
    before = digest(out)
    assert run_in_process(CLM, base + ["--overwrite_output_dir", "--tie_init", "0,0,1"]) == 2
    assert "tie_map has length 3" in script_error(capsys)
    assert digest(out) == before


def test_a_finished_run_is_refused_and_a_failed_overwrite_keeps_it(corpus, tmp_path, capsys):
    """A folder holding a finished run is refused without --overwrite_output_dir; with it, a run that diverges
    leaves every file of the earlier run byte-identical (its tie history included)."""
    out = tmp_path / "out"
    base = clm_args(corpus, out, "--max_steps", "4")
    assert run_in_process(CLM, base) == 0
    before = digest(out)
    assert before["tie_history.jsonl"] and before["model.safetensors"]
    capsys.readouterr()
    assert run_in_process(CLM, base) == 2
    line = script_error(capsys)
    assert "holds a finished run" in line and "config.json" in line and "--overwrite_output_dir" in line
    assert run_in_process(CLM, base + ["--overwrite_output_dir", "--learning_rate", "1e30"]) == 3
    after = digest(out)
    assert {k: after.get(k) for k in before} == before


def test_an_interrupted_save_leaves_the_previous_files_whole(tmp_path, monkeypatch):
    """A save that fails half way (here: after config.json, before the weights) changes nothing in the folder:
    the files are written beside it and renamed in only when the whole save succeeded."""
    from transformers import Trainer

    args = make_args(tmp_path / "run", max_steps=2, tie_policy="sequence", tie_unique_layers=2)
    trainer = DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks())
    trainer.save_model()
    before = digest(tmp_path / "run")
    stock_save = Trainer._save

    def dies_half_way(self, output_dir=None, state_dict=None):
        self.model.config.save_pretrained(output_dir)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Trainer, "_save", dies_half_way)
    trainer.dyntie_model.config.tie_map = [0, 1, 2, 3]  # what a half-written config.json would now say
    with pytest.raises(OSError, match="No space left"):
        trainer.save_model()
    monkeypatch.setattr(Trainer, "_save", stock_save)
    assert digest(tmp_path / "run") == before
    assert not list((tmp_path / "run").glob(".saving-*"))


def test_resume_last_skips_an_incomplete_checkpoint_and_says_so(corpus, tmp_path, caplog):
    out = tmp_path / "out"
    base = checkpointed_run(corpus, out)
    (out / "checkpoint-4" / "model.safetensors").write_bytes(b"")  # a save cut short
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert run_in_process(CLM, base + ["--max_steps", "6", "--resume_from_checkpoint", "last"]) == 0
    assert any("resuming from" in r.getMessage() and "checkpoint-2" in r.getMessage() and "incomplete" in r.getMessage()
               for r in caplog.records)
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6


@pytest.mark.parametrize("lost", ["optimizer.pt", "scheduler.pt"])
def test_resume_without_optimizer_or_schedule_stops_unless_allowed(lost, corpus, tmp_path, capsys):
    """A resume that would silently restart AdamW's moments or the schedule is refused in one line naming the
    flag; with --resume_allow_partial it runs."""
    out = tmp_path / "out"
    base = checkpointed_run(corpus, out)
    (out / "checkpoint-4" / lost).unlink()
    resume = base + ["--max_steps", "6", "--resume_from_checkpoint", str(out / "checkpoint-4")]
    capsys.readouterr()
    assert run_in_process(CLM, resume) == 2
    line = script_error(capsys)
    what = "optimizer state" if lost == "optimizer.pt" else "learning-rate schedule"
    assert what in line and "--resume_allow_partial" in line, line
    assert run_in_process(CLM, resume + ["--resume_allow_partial"]) == 0


def test_resume_with_a_lower_budget_is_refused_in_one_line(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    base = checkpointed_run(corpus, out, "--tie_policy", "grow", "--tie_budget", "3", "--tie_interval", "1")
    capsys.readouterr()
    argv = _replace(base, "--tie_budget", "2") + ["--max_steps", "6", "--resume_from_checkpoint", "last"]
    assert run_in_process(CLM, argv) == 2
    assert "more than this run's tie_budget 2" in script_error(capsys)


def test_resume_from_the_final_checkpoint_stops_cleanly_and_keeps_the_model(corpus, tmp_path, capsys):
    """The stock Trainer would train one step past the end and overwrite the final model: refused in one line
    (the files untouched); raising --max_steps trains on from it."""
    out = tmp_path / "out"
    base = checkpointed_run(corpus, out)  # max_steps 4, a checkpoint at 4
    before = digest(out)
    capsys.readouterr()
    assert run_in_process(CLM, base + ["--resume_from_checkpoint", "last"]) == 2
    line = script_error(capsys)
    assert "checkpoint-4 is at step 4, the end of this run (4 steps)" in line and "--max_steps" in line, line
    assert digest(out) == before
    trainer = DynTieTrainer(model=tiny_model(), args=make_args(tmp_path / "t", max_steps=2, save_strategy="steps",
                                                               save_steps=2),
                            train_dataset=byte_blocks())
    trainer.train()
    with pytest.raises(CheckpointError, match="at step 2, the end of this run"):
        trainer.train(resume_from_checkpoint=True)
    assert run_in_process(CLM, base + ["--max_steps", "6", "--resume_from_checkpoint", "last"]) == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6


def test_a_disk_that_fills_during_a_save_is_one_line_and_the_run_resumes(corpus, tmp_path, capsys, monkeypatch):
    """torch's own words for a full disk while checkpoint-4 is written: one line (exit 4) naming the whole
    checkpoint-2, the half-written checkpoint-4 removed, and the resume from checkpoint-2 finishing the run."""
    out = tmp_path / "out"
    real_save = torch.save

    def disk_fills_at_step_4(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                               "PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_at_step_4)
    argv = clm_args(corpus, out, "--save_strategy", "steps", "--save_steps", "2", "--max_steps", "4")
    assert run_in_process(CLM, argv) == 4
    line = script_error(capsys)
    assert "the disk filled while saving checkpoint 4" in line and "(the last: " in line, line
    assert line.rstrip().endswith("resume with --resume_from_checkpoint last") and "checkpoint-2" in line, line
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    monkeypatch.undo()
    assert run_in_process(CLM, argv + ["--resume_from_checkpoint", "last"]) == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


def test_a_disk_that_fills_during_the_final_save_names_what_is_whole(tmp_path, monkeypatch):
    args = make_args(tmp_path / "run", max_steps=2, tie_policy="sequence", tie_unique_layers=2,
                     save_strategy="steps", save_steps=2)
    trainer = DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks())
    trainer.train()
    before = digest(tmp_path / "run")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    with pytest.raises(DiskFullError, match=r"while saving the model .*/checkpoint-2 holds the model of step 2"):
        trainer.save_model()
    assert digest(tmp_path / "run") == before


@pytest.mark.parametrize("content, expected", [(b"", "is empty"), (b"text\x00\x01\x02", "NUL bytes"),
                                               (b"\xff\xfe\xfa caf\xe9 " * 20, "not UTF-8 text")])
def test_an_unusable_training_file_is_refused_before_data_work(content, expected, corpus, tmp_path, capsys):
    bad = tmp_path / "train.txt"
    bad.write_bytes(content)
    argv = _replace(clm_args(corpus, tmp_path / "out"), "--train_file", str(bad))
    assert run_in_process(CLM, argv) == 2
    assert expected in script_error(capsys)


def test_no_room_or_no_write_access_is_refused_before_data_work(corpus, tmp_path, capsys, monkeypatch):
    import os
    import shutil
    from collections import namedtuple

    argv = _replace(clm_args(corpus, tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    assert run_in_process(CLM, argv) == 2
    assert "MiB free on its disk" in script_error(capsys)
    monkeypatch.undo()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(tmp_path) in str(path) else real_access(path, mode))
    assert run_in_process(CLM, argv) == 2
    assert "not writable" in script_error(capsys)
    assert not (tmp_path / "cache").exists()  # no dataset was loaded or tokenized


def test_a_grow_schedule_that_cannot_reach_its_budget_is_refused(corpus, tmp_path, capsys):
    """One untie per decision: with a decision every 2 steps a 6-step run cannot untie 3 times by step 1."""
    argv = clm_args(corpus, tmp_path / "out", "--tie_policy", "grow", "--tie_budget", "4")
    assert run_in_process(CLM, argv) == 2
    line = script_error(capsys)
    assert "grow cannot reach tie_budget 4" in line and "it would end at 3 unique layers" in line, line
    assert run_in_process(CLM, argv + ["--tie_interval", "1"]) == 0


def test_push_to_hub_without_the_hub_stops_before_data_work(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = _replace(clm_args(corpus, tmp_path / "out", "--push_to_hub", "--hub_model_id", "me/model"),
                    "--cache_dir", str(tmp_path / "cache"))
    assert run_in_process(CLM, argv) == 2
    line = script_error(capsys)
    assert line.startswith("error: --push_to_hub: the Hub cannot be reached") and "--hub_token" in line, line
    assert not (tmp_path / "cache").exists()


def test_a_csv_whose_text_column_is_no_text_is_one_line(corpus, tmp_path, capsys):
    bad = tmp_path / "train.csv"
    bad.write_text("count,label\n" + "".join(f"{i},{i % 2}\n" for i in range(50)))
    argv = _replace(_replace(clm_args(corpus, tmp_path / "out"), "--train_file", str(bad)), "--validation_file", str(bad))
    assert run_in_process(CLM, argv) == 2
    assert "the text column 'count' of the data holds int64, not text" in script_error(capsys)


def test_line_by_line_on_a_file_of_empty_lines_batches(corpus, tmp_path):
    """A batch made only of empty lines tokenizes to no sequences (it used to raise IndexError)."""
    from transformers import AutoTokenizer

    from hf_dyntie.scripts.data import tokenize_lines

    tokenizer = AutoTokenizer.from_pretrained(corpus / "tok_mlm")
    out = tokenize_lines({"text": ["", "  ", ""]}, tokenizer, "text", return_special_tokens_mask=True)
    assert set(out) >= {"input_ids", "attention_mask", "special_tokens_mask"} and all(v == [] for v in out.values())
