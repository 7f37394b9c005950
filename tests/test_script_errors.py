"""Bad input to run_clm_dyntie.py and run_mlm_dyntie.py: one line on stderr, exit status 2, before any data work
where the input can be checked before it (no dataset loaded or tokenized), and no traceback."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from helpers import CLM, MLM, REPO_ROOT, clm_args, mlm_args, run_cli, run_in_process, script_error
from helpers import replace_flag as _replace


# ---- files, flags and the model ---------------------------------------------------------------------------


@pytest.fixture
def small_vocab_gpt2(tmp_path: Path) -> Path:
    """A stock GPT-2 with a 100-token embedding: smaller than the corpus tokenizer's 300."""
    folder = tmp_path / "small-vocab"
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_layer=2, n_embd=16, n_head=2, n_positions=64)).save_pretrained(folder)
    return folder


BAD_INPUTS = {
    "missing train file": (CLM, lambda a, c, t: _replace(a, "--train_file", str(t / "nope.txt")), "--train_file"),
    "train file is a folder": (CLM, lambda a, c, t: _replace(a, "--train_file", str(t)), "is not a file"),
    "unknown model type": (CLM, lambda a, c, t: _replace(a, "--model_type", "opt"), "unknown --model_type 'opt'"),
    "gpt2 in the mlm script": (
        MLM, lambda a, c, t: _replace(a, "--model_type", "dyntie_gpt2"), "unknown --model_type"
    ),
    "block size over positions": (CLM, lambda a, c, t: _replace(a, "--block_size", "128"), "64 positions"),
    "max_seq_length over positions": (MLM, lambda a, c, t: _replace(a, "--max_seq_length", "100"), "64 positions"),
    "streaming without max_steps": (
        CLM, lambda a, c, t: _replace(a, "--max_steps", None) + ["--streaming"], "--streaming needs --max_steps"
    ),
    "tokenizer without mask token": (
        MLM, lambda a, c, t: _replace(a, "--tokenizer_name", str(c / "tok_clm")), "has no mask token"
    ),
    "bad config override": (
        CLM, lambda a, c, t: _replace(a, "--config_overrides", "n_layerz=2"), "--config_overrides"
    ),
    "nothing to do": (CLM, lambda a, c, t: [x for x in a if x not in ("--do_train", "--do_eval")], "--do_train"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_1(case: str, corpus: Path, tmp_path: Path, capsys) -> None:
    script, edit, expected = BAD_INPUTS[case]
    out = tmp_path / "out"
    base = clm_args(corpus, out) if script is CLM else mlm_args(corpus, out)
    assert run_in_process(script, edit(base, corpus, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and expected in err[-1], err[-3:]
    assert not (out / "model.safetensors").exists()  # failed before any training work


def test_tokenizer_larger_than_loaded_model(corpus: Path, small_vocab_gpt2: Path, tmp_path: Path, capsys) -> None:
    argv = _replace(_replace(clm_args(corpus, tmp_path / "out"), "--model_type", None), "--config_overrides", None)
    assert run_in_process(CLM, ["--model_name_or_path", str(small_vocab_gpt2), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the tokenizer has 300 tokens but the model's embedding only 100 rows"), err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_train_file(corpus: Path, tmp_path: Path, capsys) -> None:
    locked = tmp_path / "locked.txt"
    locked.write_text("text")
    locked.chmod(0)
    assert run_in_process(CLM, _replace(clm_args(corpus, tmp_path / "out"), "--train_file", str(locked))) == 2
    assert "not readable" in capsys.readouterr().err


def test_cli_exit_status_and_stderr(corpus: Path, tmp_path: Path) -> None:
    """The real command line: one line on stderr, exit status 2, no traceback."""
    argv = _replace(clm_args(corpus, tmp_path / "out"), "--train_file", str(tmp_path / "missing.txt"))
    proc = run_cli([str(REPO_ROOT / "run_clm_dyntie.py"), *argv], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    missing = str(tmp_path / "missing.txt")
    assert proc.stderr.strip().splitlines()[-1] == f"error: --train_file {missing!r} does not exist"


# ---- before any data work: the tying arguments, the files, the disk, the Hub ---------------------------------


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


# ---- after the data is read -----------------------------------------------------------------------------------


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


def test_script_refuses_a_corrupt_checkpoint_in_one_line(corpus, checkpoint, tmp_path, capsys):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    argv = [a for a in clm_args(corpus, tmp_path / "out") if a not in ("--model_type", "dyntie_gpt2")]
    argv = _replace(argv, "--config_overrides", None)
    assert run_in_process(CLM, ["--model_name_or_path", str(checkpoint), *argv]) == 2
    line = script_error(capsys)
    assert line.startswith(f"error: cannot load the model {str(checkpoint)!r}"), line


def test_a_clean_run_tears_its_process_group_down_and_a_failed_one_leaves_it(tmp_path):
    """A finished rank must not leave gloo's threads to interpreter shutdown (they can abort the process after
    the work is done); a failed one must not wait in a teardown for ranks that did not fail."""
    import torch.distributed as dist

    from hf_dyntie.scripts import UsageError, run_script

    def group():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'pg{time.monotonic_ns()}'}", rank=0,
                                world_size=1)

    group()
    run_script(lambda: None)
    assert not dist.is_initialized()
    group()
    try:
        with pytest.raises(SystemExit):
            run_script(lambda: (_ for _ in ()).throw(UsageError("bad flag")))
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
