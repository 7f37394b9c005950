"""The map training starts from (``training/start.py``): a loaded model keeps its trained layers and says so,
an explicit ``tie_init`` that drops trained layers names them, a fresh model starts all tied without a word, and
a start over the budget or an option the policy ignores is said before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

from helpers import BLOCK, LOADED_MAP, NUM_LAYERS, tiny_model, warnings_logged
from helpers import short_args as make_args  # 8 steps, logged one by one: the fault tests' run
from helpers import short_blocks as byte_blocks
from hf_dyntie import DynTieGPT2LMHeadModel
from hf_dyntie.convert import from_stock
from hf_dyntie.training.policies.static import sequence_map
from hf_dyntie.training.start import build_policy
from hf_dyntie.training.trainer import DynTieTrainer


# ---- helpers --------------------------------------------------------------------------------------------------


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


# ---- loaded models keep their trained layers ------------------------------------------------------------------


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


def test_a_pretrained_start_that_merges_says_so_instead_of_discarding(tmp_path, caplog):
    torch.manual_seed(0)
    model = from_stock(GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=BLOCK, n_embd=32, n_layer=NUM_LAYERS,
                                                  n_head=4)))
    args = make_args(tmp_path / "out", max_steps=2, tie_policy="sequence", tie_unique_layers=2, tie_merge="average",
                     tie_lora_rank=4, tie_lora_init="svd")
    tie_map, messages = start_map(model, args, caplog)
    said = [m for m in messages if "ties layer(s)" in m]
    assert tie_map == sequence_map(NUM_LAYERS, 2) and len(said) == 1, messages
    assert "tie_merge='average'" in said[0] and "rank-4 SVD delta" in said[0] and "discarding" not in said[0]


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


# ---- options the policy does not use --------------------------------------------------------------------------


def test_unused_tie_unique_layers_is_a_warning(tmp_path, caplog):
    build_policy(tiny_model(), make_args(tmp_path, tie_unique_layers=3, tie_seed=123))  # qlearning ignores it
    assert any("tie_unique_layers=3 is ignored" in m for m in warnings_logged(caplog))
