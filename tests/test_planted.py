"""Planted tie map: can a scored controller find the map that the weights support?

A random 6-position GPT-2 teacher runs the planted map ``P = [0, 0, 2, 2, 2, 5]`` (3 unique layers; its
block matrices scaled by 3 and its embeddings by 4 so that which block runs where matters). Its argmax
next-token predictions on random token sequences are the data. The student has the teacher's shape and
starts from the teacher's weights laid out untied (position ``i`` holds a copy of the teacher's layer
``P[i]`` plus noise of 5e-4): the planted structure is present in the weights, and the question is only
whether the controller's scores find it. This is a unit test of the *search*, not a claim that training
discovers structure from scratch (the evidence benchmark, ``benchmarks/charlm.py``, asks that).

The static rows separate by a wide margin (held-out loss at the start, checked below): the planted map
is better than every other 3-unique-layer map the test names by more than 0.04 nats.

- ``greedy`` with a size penalty (0.02 nats per unique layer) from the untied map must tie its way down
  to exactly ``P``: equal copies cost ~0 to tie, wrong ties cost more than the penalty.
- ``grow`` with ``tie_grow_order="scored"`` from ``[0, 0, 0, 0, 0, 5]`` with budget 3 must make the one
  split that yields ``P``. (From ``[0, 0, 2, 2, 2, 2]`` it splits ``{4, 5}`` off instead of ``{5}``: the
  sign-step gain grows with the size of the split-off part, so ties between a larger and a smaller part
  lean to the larger. Recorded here as a known limit, not tested as a success.)
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from hf_dyntie import DynTieGPT2Config, DynTieGPT2LMHeadModel
from hf_dyntie.training.trainer import DynTieTrainer
from hf_dyntie.training.training_args import DynTieTrainingArguments

V, T, D, L = 32, 16, 32, 6
P = [0, 0, 2, 2, 2, 5]


def config(tie_map):
    return DynTieGPT2Config(vocab_size=V, n_positions=T, n_embd=D, n_layer=L, n_head=4, tie_map=tie_map,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(100)
    teacher = DynTieGPT2LMHeadModel(config(P)).eval()
    with torch.no_grad():
        teacher.transformer.wte.weight.mul_(4.0)
        for i in set(P):
            for p in teacher.transformer.h[i].parameters():
                if p.dim() == 2:
                    p.mul_(3.0)
    generator = torch.Generator().manual_seed(0)

    def data(n: int) -> Dataset:
        x = torch.randint(0, V, (n, T), generator=generator)
        with torch.no_grad():
            y = teacher(x).logits.argmax(-1)
        labels = torch.full_like(x, -100)
        labels[:, 1:] = y[:, :-1]
        return Dataset.from_dict({"input_ids": x.tolist(), "labels": labels.tolist()})

    return teacher, data(2048), data(256)


def student(teacher, seed: int = 0) -> DynTieGPT2LMHeadModel:
    torch.manual_seed(seed)
    model = DynTieGPT2LMHeadModel(config(None))
    outside = {k: v for k, v in teacher.state_dict().items() if not k.startswith("transformer.h.")}
    model.load_state_dict(outside, strict=False)
    with torch.no_grad():
        for i, r in enumerate(P):
            for p, q in zip(model.transformer.h[i].parameters(), teacher.transformer.h[r].parameters()):
                p.copy_(q + 5e-4 * torch.randn_like(q))
    return model


def held_out(model, valid) -> float:
    x, y = torch.tensor(valid["input_ids"]), torch.tensor(valid["labels"])
    model.eval()
    with torch.no_grad():
        return float(model(x, labels=y).loss)


def train(teacher, train_set, valid, tmp_path, **tie_args) -> DynTieTrainer:
    args = DynTieTrainingArguments(
        output_dir=str(tmp_path), max_steps=24, per_device_train_batch_size=32, learning_rate=1e-4,
        report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=100, seed=0,
        tie_plots=False, tie_score_tokens=1024, **tie_args,
    )
    trainer = DynTieTrainer(model=student(teacher), args=args, train_dataset=train_set, eval_dataset=valid)
    trainer.train()
    return trainer


def test_static_rows_separate(planted):
    teacher, _, valid = planted
    losses = {}
    for tie_map in (P, [0, 0, 2, 2, 4, 4], [0, 1, 2, 2, 2, 2], [0, 0, 2, 2, 2, 2], [0, 0, 0, 0, 0, 5]):
        model = student(teacher)
        model.retie(tie_map)
        losses[tuple(tie_map)] = held_out(model, valid)
    best_wrong = min(v for k, v in losses.items() if list(k) != P)
    assert losses[tuple(P)] < best_wrong - 0.04, losses


def test_greedy_ties_down_to_the_planted_map(planted, tmp_path):
    teacher, train_set, valid = planted
    trainer = train(teacher, train_set, valid, tmp_path, tie_policy="greedy", tie_init="untied",
                    tie_size_penalty=0.02, tie_interval=4)
    assert trainer.dyntie_model.tie_map == P
    first = trainer.history.records[0]
    assert all("score" in e and "tie_map" in e for e in first["scores"])  # the history says why


def test_scored_grow_makes_the_planted_split(planted, tmp_path):
    teacher, train_set, valid = planted
    trainer = train(teacher, train_set, valid, tmp_path, tie_policy="grow", tie_init="0,0,0,0,0,5", tie_budget=3,
                    tie_grow_order="scored", tie_grow_until=0.5)
    assert trainer.dyntie_model.tie_map == P
