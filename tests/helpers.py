"""Every helper more than one test file uses: tiny models, the "stock copy" every equivalence test compares with,
trainer runs, the example scripts in-process, subprocesses and captured warnings. The fixtures built on them are
in conftest.py; a helper only one file uses stays in that file.

One module over ~450 lines, on purpose: a test file finds whatever it shares with the others here, in the
sections below, and nowhere else.

The stock copy of a DynTie model is the plain transformers model (``GPT2LMHeadModel``, ``BertForMaskedLM``,
...) whose every layer holds its own tensors, and whose tied layers hold *copies* of their roots' weights.
It is built here from the tie map and the roots' tensors only, independently of ``hf_dyntie.convert``,
so the tests of that module compare against a reference it did not produce.

Nothing of the training wing is imported at the top (conftest imports this module for every test file):
the trainer helpers and the scripts import it when they are used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, TrainerCallback
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

import hf_dyntie
from hf_dyntie import (  # importing hf_dyntie registers the DynTie classes with the Auto classes
    DynTieBertConfig,
    DynTieBertForMaskedLM,
    DynTieBertForSequenceClassification,
    DynTieBertLMHeadModel,
    DynTieBertModel,
    DynTieGPT2Config,
    DynTieGPT2LMHeadModel,
    DynTieGPT2Model,
)
from hf_dyntie.checkpoint_files import is_delta_key
from hf_dyntie.deltas import TieDelta, TieOffset
from hf_dyntie.families import CAUSAL_LM, FAMILIES, family_named
from hf_dyntie.training.policies import PAPER_OPTIONS, PolicyConfig

if TYPE_CHECKING:
    from datasets import Dataset

    from hf_dyntie.training.training_args import DynTieTrainingArguments

torch.set_num_threads(1)  # tiny models: threads only add contention on a shared machine

REPO_ROOT = Path(__file__).resolve().parent.parent
VOCAB = 101
TIED_MAP = [0, 0, 2, 0, 2, 5]  # three roots (0, 2, 5); 1 and 3 share layer 0, 4 shares layer 2

# every DynTie class of the family table -> the stock class it extends
STOCK_CLASS: dict[type, type] = {
    family.dyntie_class(head): head.stock for family in FAMILIES for head in family.heads
}

_TIE_FIELDS = ("tie_map", "tie_mode")


# ---- configs and models ---------------------------------------------------------------------------


def paper_config(**options) -> PolicyConfig:
    """A policy config with the paper code's settings where the trainer's defaults differ (reward, epsilon
    decay, a decision every 4 steps): what the policy tests were written against."""
    return PolicyConfig(**{**PAPER_OPTIONS, **options})


def gpt2_config(tie_map: list[int] | None = None, **overrides) -> DynTieGPT2Config:
    """A 6-layer, 32-wide GPT-2 whose special tokens fit the 101-token vocabulary (no config warnings)."""
    fields = dict(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=6, n_head=2, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_map=tie_map,
    )
    fields.update(overrides)
    return DynTieGPT2Config(**fields)


def bert_config(tie_map: list[int] | None = None, **overrides) -> DynTieBertConfig:
    """A 6-layer, 32-wide BERT, dropout off so train-mode comparisons are deterministic."""
    fields = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, tie_map=tie_map,
    )
    fields.update(overrides)
    return DynTieBertConfig(**fields)


def build(model_class: type, config, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised model in eval mode, reproducible from ``seed``."""
    torch.manual_seed(seed)
    return model_class(config).eval()


def randomize_layers(model: PreTrainedModel, seed: int = 1) -> None:
    """Give every parameter a distinct random value (init leaves LayerNorms at 1/0 and biases at 0, which
    would hide a position running the wrong layer's norm or bias). Tied positions alias their roots,
    so they follow. Relaxed deltas and offsets keep their init (zero while off, as a real model has them;
    ``randomize_relaxed`` sets the ones that are on)."""
    from hf_dyntie.deltas import DELTA_CLASSES

    relaxed = {id(p) for m in model.modules() if isinstance(m, DELTA_CLASSES) for p in m.parameters()}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in relaxed:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)


# (model class, config factory, extra config fields); every GPT-2 and BERT head with a 6-layer stack
MODEL_CASES = {
    "gpt2-lm": (DynTieGPT2LMHeadModel, gpt2_config, {}),
    "gpt2-base": (DynTieGPT2Model, gpt2_config, {}),
    "bert-mlm": (DynTieBertForMaskedLM, bert_config, {}),
    "bert-causal": (DynTieBertLMHeadModel, bert_config, {"is_decoder": True}),
    "bert-cls": (DynTieBertForSequenceClassification, bert_config, {"num_labels": 3}),
    "bert-base": (DynTieBertModel, bert_config, {}),
}


def make_case(case: str, tie_map: list[int] | None = TIED_MAP, **fields) -> PreTrainedModel:
    """A tiny model of ``MODEL_CASES[case]`` with the given map, its layers randomised (roots differ)."""
    model_class, config_factory, extra = MODEL_CASES[case]
    model = build(model_class, config_factory(tie_map, **{**extra, **fields}))
    randomize_layers(model)
    return model


def input_ids(batch: int = 2, length: int = 12, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


# ---- every family of the table --------------------------------------------------------------------

CAUSAL_FAMILIES = [pytest.param(family, id=family.name) for family in FAMILIES if family.head(CAUSAL_LM)]

# Small enough to run every family in seconds; fields a family's config does not have are left out.
# 4 query heads over 2 key/value heads: grouped-query attention wherever the family has it.
TINY = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    attention_dropout=0.0,
)


def tiny_config(family, head=None, tie_map=TIED_MAP, **overrides):
    known = family.stock_config()
    fields = {k: v for k, v in TINY.items() if hasattr(known, k)}
    if head is not None and head.auto_class == CAUSAL_LM and hasattr(known, "is_decoder") and family.head("AutoModelForMaskedLM"):
        fields["is_decoder"] = True  # an encoder family as a causal LM
    if head is not None and "Classification" in head.auto_class:
        fields["num_labels"] = 3
    return family.config_class()(**fields, tie_map=tie_map, **overrides)


def make(family, head, tie_map=TIED_MAP, seed=0, **overrides):
    """A tiny model of ``family`` with ``head``, its layers randomised."""
    torch.manual_seed(seed)
    model = family.dyntie_class(head)(tiny_config(family, head, tie_map, **overrides)).eval()
    randomize_layers(model, seed=seed + 1)  # distinct values everywhere, norms included
    return model


def tiny_llama(seed: int = 0):
    """A 6-layer Llama over bytes (vocab 256), for the trainer."""
    torch.manual_seed(seed)
    config = hf_dyntie.DynTieLlamaConfig(
        vocab_size=256, hidden_size=32, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=BLOCK, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return hf_dyntie.DynTieLlamaForCausalLM(config)


def all_policies() -> list[str]:
    from hf_dyntie.training.policies import POLICIES

    return [name for name in POLICIES if name != "replay"] + ["replay"]  # replay follows the qlearning run


# ---- the stock copy -------------------------------------------------------------------------------


def stock_config(config) -> PretrainedConfig:
    """The stock config with the same fields, minus the tie fields."""
    stock_cls = family_named(config.model_type).stock_config
    fields = {k: v for k, v in config.to_dict().items() if k not in (*_TIE_FIELDS, "model_type", "auto_map")}
    stock = stock_cls(**fields)
    stock._attn_implementation = config._attn_implementation
    return stock


def stock_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The plain transformers model computing what ``model`` computes: layer ``i`` holds a copy of the
    weights of layer ``tie_map[i]``, every other tensor is copied as is."""
    stock_class = STOCK_CLASS[type(model)]
    torch.manual_seed(1234)  # the values are overwritten; the seed only keeps the build reproducible
    stock = stock_class(stock_config(model.config))
    prefix = model._dyntie_layers_path + "."
    tie_map = model.tie_map
    source = model.state_dict()
    state = {}
    for key in stock.state_dict():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            key_from = f"{prefix}{tie_map[int(index)]}.{rest}"
        else:
            key_from = key
        state[key] = source[key_from].detach().clone()
    stock.load_state_dict(state, strict=True)
    stock.train(model.training)
    return stock


RETIE_TOUR = (TIED_MAP, [0, 0, 0, 0, 0, 0], [0, 1, 1, 3, 1, 5], list(range(6)))  # tie, merge, move, untie all


def retie_tour(model: PreTrainedModel) -> Iterator[torch.Tensor]:
    """Retie a 6-layer DynTie causal LM through ``RETIE_TOUR`` as a trainer would (AdamW, its state carried along
    each retie's moves), one optimizer step per map, asserting that the parameter set, its order and shapes and
    the optimizer's parameter list never change. Yields the step's input ids after each map for more checks."""
    from hf_dyntie.training.optimizer_state import carry_optimizer_state

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    ids_before = [id(p) for p in model.parameters()]
    shapes_before = [p.shape for p in model.parameters()]
    ids = input_ids()
    for tie_map in RETIE_TOUR:
        report = model.retie(tie_map)
        carry_optimizer_state(optimizer, report.moves)
        optimizer.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        assert [id(p) for p in optimizer.param_groups[0]["params"]] == ids_before
        assert [id(p) for p in model.parameters()] == ids_before
        assert [p.shape for p in model.parameters()] == shapes_before
        yield ids


# ---- relaxed ties: deltas and offsets, found by walking the modules (not through hf_dyntie's helpers) ----


def relaxed_modules(model, position: int) -> dict[str, nn.Module]:
    """``{module path in the block: TieDelta or TieOffset}`` of one position, found by walking the modules."""
    layer = model.dyntie_layers[position]
    return {name: m for name, m in layer.named_modules() if isinstance(m, (TieDelta, TieOffset))}


def relaxed_on(model) -> list[int]:
    """Positions whose deltas and offsets are on, worked out here from the map (not by the library): the tied
    ones, and with ``tie_lora_roots`` the roots that have followers."""
    tie_map = model.tie_map
    followed = {r for i, r in enumerate(tie_map) if r != i}
    return [i for i, r in enumerate(tie_map) if r != i or (model.config.tie_lora_roots and i in followed)]


def randomize_relaxed(model, seed: int = 5) -> None:
    """Distinct non-zero deltas and offsets at every position where they are on (they start at zero, which
    would hide a lost or misplaced one)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in relaxed_on(model):
            for module in relaxed_modules(model, i).values():
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def trained_a_little(model, ids: torch.Tensor, steps: int = 3) -> torch.optim.Optimizer:
    """``steps`` AdamW steps (lr 1e-2) of ``model`` on ``ids``: deltas and offsets move away from zero. The optimizer,
    whose state a retie must then carry."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    return optimizer


def relaxed_reference(model) -> PreTrainedModel:
    """The stock model computing, at every position whose deltas are on, its root's weights (its own for a
    relaxed root) plus its own delta (and offsets)."""
    stock = stock_copy(model)
    prefix = model._dyntie_layers_path
    with torch.no_grad():
        for i in relaxed_on(model):
            for path, module in relaxed_modules(model, i).items():
                leaf_name, kind = path.rsplit(".", 1)
                leaf = stock.get_submodule(f"{prefix}.{i}.{leaf_name}")
                if kind == "tie_delta":
                    product = module.up @ module.down
                    leaf.weight += product.t() if isinstance(leaf, Conv1D) else product
                else:
                    for name, p in module.named_parameters():
                        getattr(leaf, name).add_(p)
    return stock


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


# ---- DynTieTrainer runs on a tiny GPT-2 over bytes ------------------------------------------------

NUM_LAYERS = 6
BLOCK = 16
LOADED_MAP = [0, 1, 1, 3, 0, 1]  # roots 0, 1 and 3: a trained tied model to load


def byte_blocks(num_blocks: int = 48) -> Dataset:
    """A few hundred tokens of real text: Python's bundled docs as bytes (vocab 256)."""
    from datasets import Dataset
    from pydoc_data.topics import topics

    data = "\n".join(topics[k] for k in sorted(topics)).encode("utf-8")[: num_blocks * BLOCK]
    blocks = [list(data[i : i + BLOCK]) for i in range(0, len(data) - BLOCK + 1, BLOCK)]
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def tiny_model(seed: int = 0, **overrides) -> DynTieGPT2LMHeadModel:
    torch.manual_seed(seed)
    config = DynTieGPT2Config(
        vocab_size=256, n_positions=BLOCK, n_embd=32, n_layer=NUM_LAYERS, n_head=4,
        bos_token_id=0, eos_token_id=0, **overrides,
    )
    return DynTieGPT2LMHeadModel(config)


def make_args(tmp_path: Path, **overrides) -> DynTieTrainingArguments:
    """24 steps, Q-learning deciding every 2 with a fast epsilon decay: a run whose ties change."""
    from hf_dyntie.training.training_args import DynTieTrainingArguments

    defaults = dict(
        output_dir=str(tmp_path), max_steps=24, per_device_train_batch_size=4, learning_rate=3e-3,
        logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        tie_policy="qlearning", tie_interval=2, tie_reward="neg_loss", tie_epsilon_decay=0.5,
        dataloader_num_workers=0,
    )
    defaults.update(overrides)
    return DynTieTrainingArguments(**defaults)


def short_blocks(num_blocks: int = 32) -> Dataset:
    """``byte_blocks`` cut to 32 blocks: what the fault tests (nonfinite, start, resume, saving) train on."""
    return byte_blocks(num_blocks)


def short_args(out: Path, **overrides) -> DynTieTrainingArguments:
    """8 steps logged one by one, the trainer's own epsilon schedule: the fault tests' run."""
    from hf_dyntie.training.training_args import DynTieTrainingArguments

    defaults = dict(
        output_dir=str(out), max_steps=8, per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, tie_policy="qlearning",
        tie_interval=2, tie_reward="neg_loss", dataloader_num_workers=0,
    )  # fmt: skip
    defaults.update(overrides)
    return DynTieTrainingArguments(**defaults)


class OptimizerHygiene(TrainerCallback):
    """Checks, right before every optimizer step, what a tied parameter must look like."""

    def __init__(self):
        self.group_sizes: set[tuple[int, ...]] = set()
        self.checked = 0
        self.trainer = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        model = trainer.dyntie_model
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        self.group_sizes.add(tuple(len(g["params"]) for g in inner.param_groups))
        layers = model.dyntie_layers
        for i, r in enumerate(model.tie_map):
            if r == i:
                continue
            for p, q in zip(layers[i].parameters(), layers[r].parameters()):
                assert p.grad is None, f"tied position {i} has a gradient"
                assert p not in inner.state or not inner.state[p], f"tied position {i} has optimizer state"
                assert p.data_ptr() == q.data_ptr(), f"tied position {i} holds its own storage"
                self.checked += 1


class MapRecorder(TrainerCallback):
    """The tie map after every optimizer step (the torchrun workers)."""

    def __init__(self):
        self.maps, self.trainer = [], None

    def on_step_end(self, args, state, control, **kwargs):
        self.maps.append(self.trainer.dyntie_model.tie_map)


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }  # fmt: skip


def warnings_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ---- logging and subprocesses ---------------------------------------------------------------------


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def captured_warnings() -> Iterator[list[str]]:
    """Everything transformers logs at WARNING or above and every Python warning, as strings."""
    handler = _ListHandler()
    hf_root = hf_logging.get_logger()
    hf_root.addHandler(handler)
    messages = handler.messages
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # an earlier test (e.g. an in-process benchmark) may have silenced it
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        hf_root.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)


def run_python(code: str, cwd: Path, *, hide_hf_dyntie: bool = True, timeout: int = 180) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter, offline, from ``cwd`` (outside the repository). With
    ``hide_hf_dyntie`` the package cannot be imported there, like on a machine that never installed it."""
    prelude = "import sys; sys.modules['hf_dyntie'] = None\n" if hide_hf_dyntie else ""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["HF_HOME"] = str(cwd / "hf_home")  # remote code is copied to a private modules cache, not ~/.cache
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )


def subprocess_results(stdout: str) -> dict[str, dict]:
    """The ``RESULT {json}`` lines a checking subprocess printed, keyed by their ``folder``."""
    results = [json.loads(line[len("RESULT "):]) for line in stdout.splitlines() if line.startswith("RESULT ")]
    return {result["folder"]: result for result in results}


REMOTE_LOAD = """
import json, torch
try:
    import hf_dyntie
    importable = True
except ImportError:
    importable = False
from transformers import AutoModelForCausalLM
for folder in FOLDERS:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(torch.arange(12).reshape(1, 12)).logits
    print("RESULT " + json.dumps(dict(folder=folder, importable=importable, module=type(model).__module__,
                                      tie_map=model.tie_map, logits=logits[0, -1, :16].tolist())))
"""


def check_loads_without_hf_dyntie(folders: list[Path], cwd: Path) -> None:
    """Each folder loads with ``trust_remote_code=True`` where ``import hf_dyntie`` fails, from the folder's own
    code, with the logits hf_dyntie itself computes from it."""
    result = run_python(REMOTE_LOAD.replace("FOLDERS", repr([str(f) for f in folders])), cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    results = subprocess_results(result.stdout)
    assert set(results) == {str(f) for f in folders}, result.stdout + result.stderr
    for folder in folders:
        checked = results[str(folder)]
        assert checked["importable"] is False  # a machine without hf_dyntie
        assert checked["module"].startswith("transformers_modules")  # the folder's code, not a package
        local = AutoModelForCausalLM.from_pretrained(folder).eval()  # here hf_dyntie is imported
        with torch.no_grad():
            expected = local(torch.arange(12).reshape(1, 12)).logits[0, -1, :16]
        assert checked["tie_map"] == local.tie_map
        assert torch.allclose(torch.tensor(checked["logits"]), expected, atol=1e-5)


@dataclass
class HubStandIn:
    """What would have gone to the Hub (the ``hub`` fixture): the repositories created and a copy of each
    uploaded folder."""

    root: Path
    repos: list[str] = field(default_factory=list)
    uploads: list[Path] = field(default_factory=list)


# ---- the example scripts, in-process ------------------------------------------------------------------

TINY_GPT2 = "n_layer=4,n_embd=32,n_head=2,n_positions=64"
TINY_BERT = "num_hidden_layers=4,hidden_size=32,num_attention_heads=2,intermediate_size=64,max_position_embeddings=64"
SCRIPTS = {"CLM": "run_clm_dyntie", "MLM": "run_mlm_dyntie"}


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_module(name: str) -> ModuleType:
    """``"CLM"`` or ``"MLM"``: the script as a module, loaded once (seconds of imports) by the first test asking."""
    if name not in globals():
        globals()[name] = load_script(SCRIPTS[name])
    return globals()[name]


def __getattr__(name: str) -> ModuleType:
    """``from helpers import CLM, MLM`` loads the scripts; importing this module alone does not."""
    if name in SCRIPTS:
        return script_module(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_in_process(script: ModuleType, argv: list[str]) -> int:
    """The script's exit status, as ``python script.py argv`` would end (0, or 1 for bad input)."""
    from hf_dyntie.scripts import run_script

    try:
        run_script(lambda: script.main(argv))
    except SystemExit as exit_:
        return exit_.code
    return 0


def cli_env(**extra: str) -> dict[str, str]:
    """Offline, and one math thread: these models are too small to gain from more, and on a shared CPU
    spinning OpenMP threads make a subprocess several times slower."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=cli_env(**env), capture_output=True, text=True, timeout=timeout
    )


def run_torchrun(worker: str, *args: str, processes: int = 2, timeout: int = 600) -> None:
    """``torchrun --standalone --nproc_per_node N tests/<worker> args...`` (gloo, one thread per rank); fails with
    the workers' output. ``--standalone`` picks a free rendezvous port: a fixed one fails when an earlier run's
    socket still holds it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone",
           str(REPO_ROOT / "tests" / worker), *args]
    proc = subprocess.run(cmd, env=env, timeout=timeout, cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def free_port() -> int:
    """A TCP port no process listens on now, for launchers that cannot pick their own (accelerate's
    ``--main_process_port``); torchrun tests use :func:`run_torchrun`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_results(folder: Path) -> dict:
    return json.loads((folder / "all_results.json").read_text())


def _script_args(corpus: Path, out: Path, tokenizer: str, model_type: str, overrides: str, length_flag: str,
                 extra: tuple[str, ...]) -> list[str]:
    return [
        "--train_file", str(corpus / "train.txt"), "--validation_file", str(corpus / "valid.txt"),
        "--tokenizer_name", str(corpus / tokenizer), "--model_type", model_type, "--config_overrides", overrides,
        length_flag, "32", "--output_dir", str(out), "--do_train", "--do_eval", "--max_steps", "6",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--tie_interval", "2",
        "--report_to", "none", "--save_strategy", "no", "--cache_dir", str(corpus / "cache"), "--seed", "0",
        *extra,
    ]  # fmt: skip


def clm_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return _script_args(corpus, out, "tok_clm", "dyntie_gpt2", TINY_GPT2, "--block_size", extra)


def checkpoint_clm_args(corpus: Path, out: Path, checkpoint: Path, *extra: str) -> list[str]:
    """:func:`clm_args` for a run from ``checkpoint``, which brings the model type, config and tokenizer."""
    argv = clm_args(corpus, out, *extra)
    for flag in ("--model_type", "--config_overrides", "--tokenizer_name"):
        argv = replace_flag(argv, flag, None)
    return ["--model_name_or_path", str(checkpoint), *argv]


def mlm_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return _script_args(corpus, out, "tok_mlm", "dyntie_bert", TINY_BERT, "--max_seq_length", extra)


def replace_flag(argv: list[str], flag: str, value: str | None) -> list[str]:
    """``argv`` with ``flag``'s value replaced (or the flag removed when ``value`` is None)."""
    i = argv.index(flag)
    return argv[:i] + ([flag, value] if value is not None else []) + argv[i + 2 :]


def checkpointed_run(corpus, out: Path, *extra: str) -> list[str]:
    """The CLM script for 4 steps with a checkpoint every 2; the arguments it ran with."""
    argv = clm_args(corpus, out, "--save_strategy", "steps", "--save_steps", "2", "--max_steps", "4", *extra)
    assert run_in_process(script_module("CLM"), argv) == 0
    return argv


def script_error(capsys) -> str:
    """The last line the script wrote to stderr: its one-line error."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "nothing on stderr"
    return lines[-1]


def check_compact_checkpoint(folder: Path, auto_class, results: dict) -> None:
    """The folder reloads with its ties; the weights file holds no tensor of a tied position."""
    model = auto_class.from_pretrained(folder)
    assert model.tie_map == results["final_tie_map"] == json.loads((folder / "config.json").read_text())["tie_map"]
    assert model.tie_summary()["stored_parameters"] == results["stored_parameters"]
    with safe_open(folder / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    prefix = model._dyntie_layers_path
    for i, root in enumerate(model.tie_map):  # relaxed ties' deltas and offsets are every position's own
        own = [k for k in keys if k.startswith(f"{prefix}.{i}.") and not is_delta_key(k)]
        assert bool(own) == (root == i), f"position {i} (root {root}) stored: {own[:2]}"
