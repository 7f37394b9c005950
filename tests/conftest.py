"""Shared fixtures: tiny configs and models, and the "stock copy" every equivalence test compares with.

The stock copy of a DynTie model is the plain transformers model (``GPT2LMHeadModel``, ``BertForMaskedLM``,
...) whose every layer holds its own tensors, and whose tied layers hold *copies* of their roots' weights.
It is built here from the tie map and the roots' tensors only, independently of ``hf_dyntie.convert``,
so the tests of that module compare against a reference it did not produce.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

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
from hf_dyntie.families import FAMILIES, family_named
from hf_dyntie.training.policies import PAPER_OPTIONS, PolicyConfig

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
    so they follow."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
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


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


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


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def outside_repo(tmp_path: Path) -> Path:
    """A working directory outside the repository, so ``import hf_dyntie`` cannot find the source tree."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    return cwd


@pytest.fixture
def tied_gpt2() -> DynTieGPT2LMHeadModel:
    model = build(DynTieGPT2LMHeadModel, gpt2_config(TIED_MAP))
    randomize_layers(model)
    return model


@pytest.fixture
def tied_bert_mlm() -> DynTieBertForMaskedLM:
    model = build(DynTieBertForMaskedLM, bert_config(TIED_MAP))
    randomize_layers(model)
    return model


# ---- a local stand-in of the Hub's upload API ----------------------------------------------------


@dataclass
class HubStandIn:
    """What would have gone to the Hub: the repositories created and a copy of each uploaded folder."""

    root: Path
    repos: list[str] = field(default_factory=list)
    uploads: list[Path] = field(default_factory=list)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch) -> HubStandIn:
    """``HfApi.create_repo``, ``HfApi.upload_folder`` (what ``Trainer.push_to_hub`` calls), ``HfApi.create_commit``
    (``model.push_to_hub``) and ``ModelCard.load`` (a new repository: no card yet) replaced by a
    recorder: each upload is copied, minus what its ``ignore_patterns`` leave out, to ``hub.uploads[i]``."""
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    stand_in = HubStandIn(tmp_path / "hub")

    def create_repo(self, repo_id: str, *args, **kwargs):
        stand_in.repos.append(repo_id)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id: str, folder_path, ignore_patterns=None, **kwargs):
        patterns = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        target = stand_in.root / f"upload-{len(stand_in.uploads)}"
        shutil.copytree(
            folder_path, target,
            ignore=lambda _, names: [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)],
        )
        stand_in.uploads.append(target)
        info = SimpleNamespace(repo_id=repo_id, commit_url=f"local://{target}")
        if not kwargs.get("run_as_future"):
            return info
        future = Future()  # checkpoint pushes run in the background: this one is done already
        future.set_result(info)
        return future

    def create_commit(self, *, repo_id: str, operations, **kwargs):  # what ``model.push_to_hub`` calls
        target = stand_in.root / f"upload-{len(stand_in.uploads)}"
        for op in operations:
            (target / op.path_in_repo).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(op.path_or_fileobj, target / op.path_in_repo)
        stand_in.uploads.append(target)
        return SimpleNamespace(repo_id=repo_id, commit_url=f"local://{target}")

    def whoami(self, token=None, **kwargs):  # the scripts ask before any data work
        return {"name": "stand-in", "type": "user"}

    def load_card(*args, **kwargs):  # a new repository has no README.md yet
        raise EntryNotFoundError("no model card in the stand-in repository")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "whoami", whoami)
    monkeypatch.setattr(ModelCard, "load", load_card)
    return stand_in


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
