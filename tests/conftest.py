"""The fixtures every test file may ask for: tiny tied models, a folder outside the repository, a local stand-in
of the Hub's upload API, the scripts' text corpus and a compact checkpoint. The plain helpers they are built
from (and that test files import) are in helpers.py."""

from __future__ import annotations

import fnmatch
import shutil
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import (
    TIED_MAP,
    HubStandIn,
    bert_config,
    build,
    gpt2_config,
    randomize_layers,
    tiny_model,
)
from hf_dyntie import DynTieBertForMaskedLM, DynTieGPT2LMHeadModel


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


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """train.txt (~900 tokens), valid.txt (~300 tokens) and two tiny byte-level BPE tokenizers (300 tokens):
    ``tok_clm`` (GPT-2 style) and ``tok_mlm`` (BERT-style specials, with [MASK])."""
    from hf_dyntie.scripts.quickstart import pydoc_corpus, train_tokenizer

    folder = tmp_path_factory.mktemp("corpus")
    train, validation = pydoc_corpus()
    (folder / "train.txt").write_text(train[3][:2400], encoding="utf-8")
    (folder / "valid.txt").write_text(validation[1][:900], encoding="utf-8")
    train_tokenizer(train[:12], 300).save_pretrained(folder / "tok_clm")
    train_tokenizer(train[:12], 300, masked_lm=True).save_pretrained(folder / "tok_mlm")
    return folder


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A compact tied checkpoint (map [0 0 2 0 2 5])."""
    folder = tmp_path / "ckpt"
    tiny_model(tie_map=[0, 0, 2, 0, 2, 5]).save_pretrained(folder)
    return folder
