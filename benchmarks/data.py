"""The data the benchmarks train and score on, in one place: one ``Blocks`` dataset for every harness.

- ``Blocks``: fixed rows of token ids, labels = inputs (the model shifts). The char-level harness scores
  its validation and test slices on it, ``quality.py`` trains and scores on it (``MaskedBlocks`` for BERT),
  ``speed.py``'s trainer rows train on random ones (``random_blocks``).
- ``Windows``: training windows at precomputed offsets, the char-level harness's paired data order.
- The corpora under the shared data folder: Tiny Shakespeare by character or WikiText-2 by byte
  (``load_chars``); WikiText-2 or Tiny Shakespeare through a byte-level BPE trained on the training text
  (``load_corpus``, ``train_tokenizer``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from common import shared_path

TINY_SHAKESPEARE = "data/tinyshakespeare/input.txt"


def split_blocks(ids: torch.Tensor, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping ``seq_len`` blocks of ``ids`` (run_clm's grouping; the tail is dropped), the first
    ``limit`` of them if given."""
    n = len(ids) // seq_len
    blocks = ids[: n * seq_len].view(n, seq_len)
    return blocks if limit is None else blocks[:limit]


class Blocks(Dataset):
    """Rows of a ``(n, seq_len)`` id tensor as causal-LM examples."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class MaskedBlocks(Blocks):
    """BERT-style masking (15% of tokens: 80% mask token, 10% random, 10% kept; loss on those only).

    Training blocks draw a new mask at every visit (torch's global RNG, seeded by the Trainer); evaluation
    blocks use a fixed mask per block so every row is scored on the same masked tokens."""

    def __init__(self, blocks: torch.Tensor, mask_id: int, vocab_size: int, fixed: bool = False):
        super().__init__(blocks)
        self.mask_id, self.vocab_size, self.fixed = mask_id, vocab_size, fixed

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(i) if self.fixed else None
        ids = self.blocks[i]
        chosen = torch.rand(ids.shape, generator=gen) < 0.15
        chosen[torch.randint(0, len(ids), (1,), generator=gen)] = True  # at least one target per block
        roll = torch.rand(ids.shape, generator=gen)
        inputs = ids.clone()
        inputs[chosen & (roll < 0.8)] = self.mask_id
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        inputs[swap] = torch.randint(0, self.vocab_size, ids.shape, generator=gen)[swap]
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        return {"input_ids": inputs, "labels": labels}


def random_blocks(n: int, seq_len: int, vocab: int, seed: int) -> Blocks:
    """``n`` blocks of uniform random ids: timing needs shapes, not text."""
    return Blocks(torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed)))


class Windows(Dataset):
    """Training windows at precomputed offsets, in order (``train_sampling_strategy='sequential'``)."""

    def __init__(self, ids: torch.Tensor, offsets: torch.Tensor, seq_len: int):
        self.ids, self.offsets, self.seq_len = ids, offsets, seq_len

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        o = int(self.offsets[i])
        x = self.ids[o: o + self.seq_len]
        return {"input_ids": x, "labels": x}


def window_offsets(seed: int, n: int, train_len: int, seq_len: int) -> torch.Tensor:
    """``n`` window starts drawn from ``seed`` alone: every row of one seed sees the same windows."""
    return torch.randint(0, train_len - seq_len + 1, (n,), generator=torch.Generator().manual_seed(seed))


CHAR_CORPORA = ("shakespeare", "wikitext2")  # charlm.py --corpus; the first is the default (RESULTS section 0)
WIKITEXT2_TRAIN, WIKITEXT2_HELD = "data/wikitext-2/valid.txt", "data/wikitext-2/test.txt"


def load_chars(regime: dict[str, Any], corpus: str = CHAR_CORPORA[0]) -> dict[str, Any]:
    """The char-level harness's data: vocabulary size, training ids, validation and test blocks (fixed,
    disjoint: the first and the last blocks of the held-out text).

    - ``shakespeare``: Tiny Shakespeare by character (65 symbols); the first ``train_frac`` of the text trains,
      the rest is held out.
    - ``wikitext2``: WikiText-2 by UTF-8 byte (256 symbols; Wikipedia prose, another domain and alphabet);
      ``valid.txt`` trains (the train split is not on these machines), ``test.txt`` is held out."""
    if corpus == "shakespeare":
        text = shared_path(TINY_SHAKESPEARE).read_text(encoding="utf-8")
        chars = sorted(set(text))
        stoi = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
        cut = int(regime["train_frac"] * len(ids))
        train, held, vocab, symbols = ids[:cut], ids[cut:], len(chars), len(text)
    elif corpus == "wikitext2":
        raw = shared_path(WIKITEXT2_TRAIN).read_bytes()
        train = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        held = torch.frombuffer(bytearray(shared_path(WIKITEXT2_HELD).read_bytes()), dtype=torch.uint8).long()
        vocab, symbols = 256, len(raw) + len(held)
    else:
        raise ValueError(f"unknown corpus {corpus!r} (known: {', '.join(CHAR_CORPORA)})")
    blocks = split_blocks(held, regime["seq_len"])
    n_blocks = len(blocks)
    if n_blocks < regime["val_blocks"] + regime["test_blocks"]:
        raise SystemExit(f"charlm: held-out split has {n_blocks} blocks, need {regime['val_blocks'] + regime['test_blocks']}")
    return {
        "vocab_size": vocab, "train": train, "chars": symbols, "held_blocks": n_blocks,
        "val": blocks[: regime["val_blocks"]], "test": blocks[n_blocks - regime["test_blocks"]:],
    }


def load_corpus(dataset: str, quick: bool) -> tuple[str, str, str]:
    """(train text, eval text, description of the split)."""
    if dataset == "wikitext2":
        train = shared_path("data/wikitext-2/valid.txt").read_text(encoding="utf-8")
        test = shared_path("data/wikitext-2/test.txt").read_text(encoding="utf-8")
        split = "WikiText-2: trained on valid.txt, evaluated on test.txt (the train split is not available here)"
    elif dataset == "tinyshakespeare":
        text = shared_path(TINY_SHAKESPEARE).read_text(encoding="utf-8")
        cut = int(0.9 * len(text))
        train, test = text[:cut], text[cut:]
        split = "Tiny Shakespeare: first 90% of characters train, last 10% evaluate"
    else:
        raise ValueError(f"unknown dataset {dataset!r}")
    if quick:
        train, test = train[:60_000], test[:20_000]
    return train, test, split


def train_tokenizer(text: str, vocab_size: int, special_tokens: list[str] | None = None):
    """A byte-level BPE trained on the training text only (small vocab: the embedding must not dominate)."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(text.splitlines(keepends=True), vocab_size=vocab_size, min_frequency=2,
                            show_progress=False, special_tokens=special_tokens or [])
    return tok


def encode(tok, text: str) -> torch.Tensor:
    """All of ``text`` as one id tensor (encoded in batches of 2,000 lines)."""
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    for start in range(0, len(lines), 2000):
        for enc in tok.encode_batch(lines[start : start + 2000]):
            ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)
