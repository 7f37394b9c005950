"""End-to-end tests of run_clm_dyntie.py and run_mlm_dyntie.py (and the offline quickstart).

Each run trains a tiny model for a handful of steps on a few hundred tokens of local text, with tokenizers
trained here in a second: nothing is downloaded and nothing from ../shared is needed. Runs that exercise
the command line (exit codes, stdout) start a subprocess; the others call the script's ``main`` in-process,
which saves the ~6 s of imports each subprocess pays.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
)

from helpers import (
    checkpoint_clm_args,
    CLM,
    MLM,
    REPO_ROOT,
    TINY_GPT2,
    check_compact_checkpoint,
    check_loads_without_hf_dyntie,
    clm_args,
    free_port,
    mlm_args,
    read_results,
    run_cli,
    run_in_process,
)
from hf_dyntie import DynTieBertForMaskedLM, DynTieGPT2LMHeadModel
from hf_dyntie.scripts.arguments import CAUSAL_LM, MASKED_LM, CausalLMDataArguments, ModelArguments, parse_arguments
from hf_dyntie.scripts.machine import cpu_threads
from hf_dyntie.scripts.models import build_model

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "README.md")
RUN_FILES = ("all_results.json", "tie_history.jsonl", "tie_map.png", "unique_layers.png")


# ---- end to end -------------------------------------------------------------------------------------------


def run_end_to_end(script: str, args: list[str], out: Path, cwd: Path) -> dict:
    """Run a script to completion; check its files and the results every run must have; return them."""
    proc = run_cli([str(REPO_ROOT / script), *args], cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in MODEL_FILES + RUN_FILES:
        assert (out / name).exists(), name
    results = read_results(out)
    assert results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]), rel=1e-12)
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    return results


def test_clm_end_to_end(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "clm"
    results = run_end_to_end("run_clm_dyntie.py", clm_args(corpus, out), out, tmp_path)
    assert len(results["final_tie_map"]) == results["num_layers"] == 4
    assert results["final_unique_layers"] == len(set(results["final_tie_map"]))
    assert 1.0 <= results["mean_unique_layers"] <= 4.0
    assert results["training_state_bytes"] > 0
    assert results["stored_parameters"] <= results["total_parameters"]
    check_compact_checkpoint(out, AutoModelForCausalLM, results)
    card = (out / "README.md").read_text()
    assert "[" + " ".join(map(str, results["final_tie_map"])) + "]" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "`train.txt`" in card


def test_mlm_end_to_end_and_repeatable_evaluation(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "mlm"
    results = run_end_to_end("run_mlm_dyntie.py", mlm_args(corpus, out), out, tmp_path)
    check_compact_checkpoint(out, AutoModelForMaskedLM, results)

    # Evaluate the saved checkpoint again, twice: the evaluation set is masked the same way every time, so
    # (same batches) the loss is the one the training run reported. The Trainer averages per-batch mean
    # losses, so the evaluation batch size has to match for the numbers to match.
    losses = []
    for i in range(2):
        again = tmp_path / f"eval{i}"
        argv = [
            "--model_name_or_path", str(out), "--validation_file", str(corpus / "valid.txt"), "--max_seq_length", "32",
            "--output_dir", str(again), "--do_eval", "--per_device_eval_batch_size", "4", "--report_to", "none",
            "--cache_dir", str(corpus / "cache"), "--seed", "0",
        ]  # fmt: skip
        assert run_in_process(MLM, argv) == 0
        losses.append(read_results(again)["eval_loss"])
    assert losses[0] == losses[1]
    assert losses[0] == pytest.approx(results["eval_loss"], rel=1e-6)

    # The same evaluation in two processes (each evaluates its half): the same loss, not the world size times it.
    ddp = tmp_path / "eval_ddp"
    proc = run_cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                    str(REPO_ROOT / "run_mlm_dyntie.py"), *argv[:argv.index("--output_dir")], "--output_dir", str(ddp),
                    *argv[argv.index("--output_dir") + 2:], "--use_cpu"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert read_results(ddp)["eval_loss"] == pytest.approx(losses[0], rel=0.1)


def test_mlm_line_by_line(corpus: Path, tmp_path: Path) -> None:
    for i, extra in enumerate([["--line_by_line"], ["--line_by_line", "--pad_to_max_length"]]):
        out = tmp_path / f"lines{i}"
        assert run_in_process(MLM, mlm_args(corpus, out, *extra, "--max_steps", "2")) == 0
        results = read_results(out)
        assert math.isfinite(results["eval_loss"]) and 0.0 <= results["eval_accuracy"] <= 1.0


def test_clm_streaming(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "stream"
    assert run_in_process(CLM, clm_args(corpus, out, "--streaming", "--max_steps", "3")) == 0
    results = read_results(out)
    assert results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]), rel=1e-12)


# ---- starting from a stock checkpoint ---------------------------------------------------------------------


@pytest.fixture
def stock_gpt2(corpus: Path, tmp_path: Path) -> Path:
    """A tiny stock GPT2LMHeadModel with the corpus tokenizer, saved the way a Hub checkpoint is."""
    tokenizer = AutoTokenizer.from_pretrained(corpus / "tok_clm")
    config = GPT2Config(
        vocab_size=len(tokenizer), n_layer=3, n_embd=32, n_head=2, n_positions=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path / "stock-gpt2"
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_model_from(folder: Path, tokenizer, task):
    return build_model(ModelArguments(model_name_or_path=str(folder)), tokenizer, task)


def test_stock_gpt2_loads_untied_with_identical_logits(stock_gpt2: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(stock_gpt2)
    model = build_model_from(stock_gpt2, tokenizer, CAUSAL_LM)
    assert isinstance(model, DynTieGPT2LMHeadModel)
    assert model.config.model_type == "dyntie_gpt2" and model.tie_map == [0, 1, 2]
    stock = GPT2LMHeadModel.from_pretrained(stock_gpt2).eval()
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, stock(ids).logits)


def test_stock_bert_loads_untied_with_identical_logits(corpus: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(corpus / "tok_mlm")
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path / "stock-bert"
    BertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = build_model_from(folder, tokenizer, MASKED_LM)
    assert isinstance(model, DynTieBertForMaskedLM) and model.tie_map == [0, 1, 2]
    stock = BertForMaskedLM.from_pretrained(folder).eval()
    ids = torch.randint(5, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, stock(ids).logits)


def test_clm_trains_from_stock_checkpoint(stock_gpt2: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "from-stock"
    argv = checkpoint_clm_args(corpus, out, stock_gpt2, "--max_steps", "4")
    assert run_in_process(CLM, argv) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "dyntie_gpt2"
    check_compact_checkpoint(out, AutoModelForCausalLM, read_results(out))


def test_clm_one_shot_conversion_at_full_rank_keeps_the_stock_model(
    stock_gpt2: Path, corpus: Path, tmp_path: Path
) -> None:
    """The recipe RESULTS 0.11 recommends, from the command line: a static map tied once at the start, each tied
    position started at the SVD of its residual to its root, offsets for norms and biases. At full rank (the
    stock model's width, 32) and learning rate 0, the saved tied model computes what the stock one did."""
    out = tmp_path / "one-shot"
    argv = checkpoint_clm_args(corpus, out, stock_gpt2, "--max_steps", "1", "--learning_rate", "0", "--tie_policy",
                               "sequence", "--tie_unique_layers", "1", "--tie_lora_rank", "32", "--tie_lora_init",
                               "svd", "--tie_lora_vectors")  # fmt: skip
    assert run_in_process(CLM, argv) == 0
    assert read_results(out)["final_tie_map"] == [0, 0, 0]
    tied = AutoModelForCausalLM.from_pretrained(out).eval()
    assert tied.tie_map == [0, 0, 0] and tied.config.tie_lora_rank == 32 and tied.config.tie_lora_vectors
    stock = GPT2LMHeadModel.from_pretrained(stock_gpt2).eval()
    ids = torch.randint(0, stock.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (tied(ids).logits - stock(ids).logits).abs().max() < 1e-4


def test_clm_compresses_a_stock_checkpoint_and_expands_it_back(
    stock_gpt2: Path, corpus: Path, tmp_path: Path, outside_repo: Path
) -> None:
    """Issue 23's path from a stock folder on disk: shrink to a budget with relaxed ties started from the SVD of
    each merged layer's residual (offsets too); the run trains, saves compact (roots, deltas and offsets), the
    folder reloads (also from its own code, without hf_dyntie), and ``expand`` writes a stock GPT2LMHeadModel
    that computes what the tied model does."""
    out = tmp_path / "compressed"
    argv = checkpoint_clm_args(corpus, out, stock_gpt2, "--max_steps", "8", "--tie_policy", "shrink", "--tie_budget",
                               "1", "--tie_shrink_until", "0.5", "--tie_merge", "average", "--tie_lora_rank", "4",
                               "--tie_lora_init", "svd", "--tie_lora_vectors")  # fmt: skip
    assert run_in_process(CLM, argv) == 0
    results = read_results(out)
    assert results["final_tie_map"] == [0, 0, 0]
    check_compact_checkpoint(out, AutoModelForCausalLM, results)
    tied = AutoModelForCausalLM.from_pretrained(out).eval()
    assert tied.config.tie_lora_rank == 4 and tied.config.tie_lora_vectors
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert "transformer.h.2.ln_2.tie_offset.bias" in set(weights.keys())
    check_loads_without_hf_dyntie([out], outside_repo)
    proc = run_cli(["-m", "hf_dyntie", "expand", str(out), str(tmp_path / "plain")], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain = GPT2LMHeadModel.from_pretrained(tmp_path / "plain").eval()
    ids = torch.randint(0, plain.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (plain(ids).logits - tied(ids).logits).abs().max() < 1e-5


# ---- --push_to_hub (against a local stand-in of the Hub, see conftest.hub) --------------------------------


def test_clm_push_to_hub_uploads_once_a_folder_that_loads_without_hf_dyntie(
    corpus: Path, tmp_path: Path, hub, outside_repo: Path
) -> None:
    out = tmp_path / "pushed"
    argv = clm_args(corpus, out, "--push_to_hub", "--hub_model_id", "me/tiny-dyntie", "--tie_policy", "sequence",
                    "--tie_unique_layers", "2", "--tie_lora_rank", "2")  # relaxed ties: the remote code has them too
    assert run_in_process(CLM, argv) == 0
    assert hub.repos == ["me/tiny-dyntie"] and len(hub.uploads) == 1  # one push, with the DynTie card
    folder = hub.uploads[0]
    assert {"configuration.py", "modeling_gpt2.py", "tokenizer.json", "tie_history.jsonl"} <= {
        p.name for p in folder.iterdir()
    }
    card = (folder / "README.md").read_text()
    assert "- dyntie\n" in card and "- gpt2\n" in card and "pip install" in card
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-dyntie", trust_remote_code=True)' in card
    assert "fixed the map `[0 0 2 2]` from step 0" in card and "initial map `all_tied`" not in card
    assert "its own rank-2 delta" in card
    assert json.loads((folder / "config.json").read_text())["tie_lora_rank"] == 2
    assert "`train.txt`" in card
    check_loads_without_hf_dyntie([folder], outside_repo)


# ---- the quickstart ---------------------------------------------------------------------------------------


def test_quickstart_short(tmp_path: Path) -> None:
    """`python run_clm_dyntie.py` with no arguments, cut to 4 steps: trains, reports, reloads, samples."""
    proc = run_cli([str(REPO_ROOT / "run_clm_dyntie.py")], cwd=tmp_path, DYNTIE_QUICKSTART_STEPS="4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()

    def line(prefix: str) -> str:
        found = [x for x in lines if x.startswith(prefix)]
        assert found, f"no line starting with {prefix!r} in:\n{proc.stdout[-2000:]}"
        return found[-1]

    assert re.fullmatch(r"perplexity: \d+\.\d", line("perplexity: "))
    assert re.fullmatch(r"unique layers: [1-6] of 6 \(final\), \d\.\d mean", line("unique layers: "))
    assert re.fullmatch(r"tie map: \[0( [0-5]){5}\]  \([1-6] unique of 6\)", line("tie map: "))
    assert re.fullmatch(r"parameters: [\d.]+[KM] stored of [\d.]+[KM] total \(\d+%\).*", line("parameters: "))
    assert line("plots: ") == "plots: runs/quickstart/tie_map.png, runs/quickstart/unique_layers.png"
    assert len(line("sample: ")) > len("sample: The")
    out = tmp_path / "runs" / "quickstart"
    for name in MODEL_FILES + RUN_FILES:
        assert (out / name).exists(), name
    results = read_results(out)
    assert results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]), rel=1e-12)
    assert "pydoc_data.topics" in (out / "README.md").read_text()

    # the README's next commands, as written there (``python`` is the venv's): inspect and expand the result
    block = next(b for b in re.findall(r"```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.DOTALL)
                 if "hf_dyntie inspect" in b)
    for command in [line.split("#")[0].split() for line in block.splitlines() if line.strip()]:
        assert command[0] == "python", command
        proc = run_cli(command[1:], cwd=tmp_path, timeout=120)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]


# ---- arguments --------------------------------------------------------------------------------------------

CLM_FLAGS = (
    "--model_name_or_path --model_type --config_name --config_overrides --tokenizer_name --cache_dir --model_revision "
    "--token --trust_remote_code --dtype --dataset_name --dataset_config_name --train_file --validation_file "
    "--validation_split_percentage --block_size --max_train_samples --max_eval_samples --streaming "
    "--preprocessing_num_workers --overwrite_cache --keep_linebreaks --tie_policy --tie_reward"
).split()
MLM_ONLY_FLAGS = ["--max_seq_length", "--mlm_probability", "--line_by_line", "--pad_to_max_length"]


@pytest.mark.parametrize("script", ["clm", "mlm"])
def test_help_documents_every_flag(script: str, capsys) -> None:
    module = CLM if script == "clm" else MLM
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    flags = [f for f in CLM_FLAGS if f != "--block_size"] + (MLM_ONLY_FLAGS if script == "mlm" else ["--block_size"])
    for flag in flags:
        assert re.search(rf"{flag}\b[^\n]*\n?\s+\S", text), flag


def test_json_file_as_the_only_argument(corpus: Path, tmp_path: Path) -> None:
    path = tmp_path / "args.json"
    path.write_text(json.dumps({
        "train_file": str(corpus / "train.txt"), "model_type": "dyntie_gpt2", "config_overrides": TINY_GPT2,
        "block_size": 32, "output_dir": str(tmp_path / "out"), "do_train": True, "tie_reward": "neg_loss",
    }))  # fmt: skip
    model_args, data_args, training_args = parse_arguments(CausalLMDataArguments, [str(path)])
    assert model_args.config_overrides == TINY_GPT2 and data_args.block_size == 32
    assert training_args.do_train and training_args.tie_reward == "neg_loss"


# ---- launchers --------------------------------------------------------------------------------------------


def test_clm_under_torchrun_two_cpu_processes(corpus: Path, tmp_path: Path) -> None:
    """Two gloo ranks on the CPU (~15 s): both train on their shard, the compact checkpoint reloads."""
    out = tmp_path / "ddp"
    argv = clm_args(corpus, out, "--use_cpu", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "4")
    proc = run_cli(
        ["-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO_ROOT / "run_clm_dyntie.py"), *argv],
        cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    results = read_results(out)
    per_epoch = math.ceil(results["train_samples"] / (4 * 2))  # batches of 4 on each of 2 ranks
    assert results["epoch"] == pytest.approx(4 / per_epoch)
    assert (out / "README.md").exists()
    check_compact_checkpoint(out, AutoModelForCausalLM, results)
    check_compact_checkpoint(out / "checkpoint-4", AutoModelForCausalLM, results)


def test_accelerate_cpu_launch_says_it_started_one_process(corpus: Path, tmp_path: Path) -> None:
    """``accelerate launch --num_processes 2 --cpu`` runs one process (accelerate's simple launcher): the script
    says so and names the command that starts two; that command trains on two ranks."""
    launch = ["-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]  # fmt: skip
    one = tmp_path / "one"
    proc = run_cli([*launch, "--num_processes", "2", "--cpu", str(REPO_ROOT / "run_clm_dyntie.py"),
                    *clm_args(corpus, one, "--max_steps", "2")], cwd=tmp_path, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    said = proc.stdout + proc.stderr  # the scripts log to stdout, like transformers' examples
    assert "accelerate launch --cpu started one process, not the 2 asked for" in said
    assert "accelerate launch --multi_gpu --num_processes 2 run_clm_dyntie.py ... --use_cpu" in said

    two = tmp_path / "two"
    proc = run_cli([*launch, "--multi_gpu", "--num_processes", "2",
                    "--main_process_port", str(free_port()), str(REPO_ROOT / "run_clm_dyntie.py"),
                    *clm_args(corpus, two, "--max_steps", "2", "--use_cpu")], cwd=tmp_path, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "started one process" not in proc.stdout + proc.stderr
    for folder, world in ((one, 1), (two, 2)):
        results = read_results(folder)
        assert results["epoch"] == pytest.approx(2 / math.ceil(results["train_samples"] / (4 * world)))


# ---- the machine: threads -------------------------------------------------------------------------------------


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
