"""A simple word-level tokenizer for task instructions (no downloads, serialisable).

Instructions in simulated benchmarks come from a small closed vocabulary ("pick up the red cube
and place it on the plate"), so a word-level tokenizer built from the task texts is enough for
the tiny VLA.  The vocabulary travels with checkpoints through :meth:`WordTokenizer.to_dict`.

Ids: ``0 = <pad>``, ``1 = <unk>``, then the vocabulary words in the given order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import torch

PAD, UNK = "<pad>", "<unk>"
_WORD_RE = re.compile(r"[a-z0-9]+")


def split_words(text: str) -> list[str]:
    """Lower-case ``text`` and split it into alphanumeric words (punctuation is dropped)."""
    return _WORD_RE.findall(text.lower())


class WordTokenizer:
    """Word-level tokenizer with a fixed vocabulary; unknown words map to ``<unk>``.

    Args:
        vocab: the words (without the special tokens); entries are split like texts, so whole
            instructions work too; duplicates are ignored, first-seen order is kept.
        max_len: default number of tokens per instruction (longer ones are truncated).
    """

    pad_id: int = 0
    unk_id: int = 1

    def __init__(self, vocab: Iterable[str], max_len: int = 16):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        words: list[str] = []
        seen = {PAD, UNK}
        for entry in vocab:  # entries may be words or whole texts: split them the same way
            for w in split_words(entry):
                if w not in seen:
                    seen.add(w)
                    words.append(w)
        self.words = words
        self.max_len = max_len
        self.itos = [PAD, UNK] + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_texts(cls, texts: Iterable[str], max_len: int = 16) -> "WordTokenizer":
        """Build the vocabulary from example texts (words in first-seen order)."""
        return cls(vocab_from_texts(texts), max_len=max_len)

    @property
    def vocab_size(self) -> int:
        """Number of ids including ``<pad>`` and ``<unk>``."""
        return len(self.itos)

    def encode_one(self, text: str) -> list[int]:
        """Ids of one text (no padding, no truncation); memoised (instructions repeat a lot)."""
        ids = self._cache.get(text)
        if ids is None:
            ids = [self.stoi.get(w, self.unk_id) for w in split_words(text)]
            if len(self._cache) < 100_000:
                self._cache[text] = ids
        return ids

    def encode(self, texts: list[str], max_len: int | None = None,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-encode texts.

        Returns ``ids [B, L]`` int64 (padded with ``<pad>``, truncated to ``L = max_len``) and
        ``mask [B, L]`` bool (True on real tokens).  An empty text gets one ``<unk>`` token so
        that every row attends to at least one token.
        """
        L = max_len or self.max_len
        ids = torch.full((len(texts), L), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            row = self.encode_one(text)[:L] or [self.unk_id]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        ids = ids.to(device) if device is not None else ids
        return ids, ids != self.pad_id

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Words of one id sequence, pads dropped."""
        seq = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return " ".join(self.itos[i] for i in seq if i != self.pad_id)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "word", "vocab": list(self.words), "max_len": self.max_len}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WordTokenizer":
        return cls(d["vocab"], max_len=int(d.get("max_len", 16)))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "WordTokenizer":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, WordTokenizer) and self.words == other.words
                and self.max_len == other.max_len)

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, max_len={self.max_len})"


def vocab_from_texts(texts: Iterable[str]) -> list[str]:
    """Distinct words of ``texts`` in first-seen order."""
    out: list[str] = []
    seen: set[str] = set()
    for t in texts:
        for w in split_words(t):
            if w not in seen:
                seen.add(w)
                out.append(w)
    return out
