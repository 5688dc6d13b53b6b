"""Text tokenizers for the real VLAs, loaded from local files only (never from a hub).

Backends, picked by what a checkpoint folder holds:

- ``tokenizer.model``: a SentencePiece model (openpi's ``paligemma_tokenizer.model``); needs the
  ``sentencepiece`` package.
- ``tokenizer.json``: a Hugging Face ``tokenizers`` file (LeRobot / SmolVLM folders); read with the
  ``tokenizers`` package when installed.  Without it, word-level files (``"model": {"type":
  "WordLevel"}``, what :class:`WordTokenizer` writes) are read by a small pure-Python reader.

:class:`WordTokenizer` is the stand-in used by the tiny test configs: built from a few sentences at
test time, saved as a valid ``tokenizer.json`` (loadable by ``tokenizers`` too).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol

_WORD_RE = re.compile(r"\w+|[^\w\s]+")


class TextTokenizer(Protocol):
    """What the VLAs need from a tokenizer."""

    bos_id: int | None
    pad_id: int

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...


class WordTokenizer:
    """Word-level tokenizer (split on ``\\w+|[^\\w\\s]+``), HF ``WordLevel`` json layout.

    Ids: 0 ``<pad>``, 1 ``<bos>``, 2 ``<unk>``, then the vocabulary.
    """

    SPECIALS = ("<pad>", "<bos>", "<unk>")

    def __init__(self, vocab: dict[str, int]):
        self.vocab = dict(vocab)
        self.pad_id = self.vocab["<pad>"]
        self.bos_id = self.vocab.get("<bos>")
        self.unk_id = self.vocab["<unk>"]

    @classmethod
    def train(cls, sentences: list[str], extra_words: list[str] = ()) -> "WordTokenizer":
        """Vocabulary = specials + every word of ``sentences`` + ``extra_words`` (in order)."""
        vocab = {s: i for i, s in enumerate(cls.SPECIALS)}
        for w in [w for s in sentences for w in _WORD_RE.findall(s)] + list(extra_words):
            vocab.setdefault(w, len(vocab))
        return cls(vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [self.vocab.get(w, self.unk_id) for w in _WORD_RE.findall(text)]
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/tokenizer.json`` (HF tokenizers format)."""
        path = Path(folder) / "tokenizer.json"
        data = {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": self.vocab[s], "content": s, "single_word": False,
                              "lstrip": False, "rstrip": False, "normalized": False,
                              "special": True} for s in self.SPECIALS],
            "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": self.vocab, "unk_token": "<unk>"},
        }
        path.write_text(json.dumps(data))
        return path


class _HFTokenizer:
    """``tokenizers.Tokenizer`` wrapper (no special tokens added by the file's post-processor;
    BOS added explicitly like openpi).  The pad / BOS tokens are the ones a
    ``tokenizer_config.json`` next to the file names (as ``transformers`` reads them), else the
    usual names."""

    def __init__(self, path: Path):
        import tokenizers

        self.path = path
        self.tok = tokenizers.Tokenizer.from_file(str(path))
        named = {}
        conf = path.parent / "tokenizer_config.json"
        if conf.is_file():
            data = json.loads(conf.read_text())
            for key in ("pad_token", "bos_token"):
                tok = data.get(key)
                tok = tok.get("content") if isinstance(tok, dict) else tok
                if tok is not None and self.tok.token_to_id(tok) is not None:
                    named[key] = self.tok.token_to_id(tok)
        self.pad_id = named.get("pad_token", next(
            (self.tok.token_to_id(t) for t in ("<pad>", "<|endoftext|>")
             if self.tok.token_to_id(t) is not None), 0))
        self.bos_id = named.get("bos_token", next(
            (self.tok.token_to_id(t) for t in ("<bos>", "<s>", "<|im_start|>")
             if self.tok.token_to_id(t) is not None), None))

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can emit (added tokens included)."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids


class _SentencePieceTokenizer:
    def __init__(self, path: Path):
        import sentencepiece

        self.path = path
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.pad_id = max(self.sp.pad_id(), 0)
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids


def load_tokenizer(folder: str | Path) -> TextTokenizer:
    """Tokenizer from a local folder (or a file path).  Raises FileNotFoundError naming what was
    looked for, ImportError naming the package a file format needs."""
    p = Path(folder)
    candidates = [p] if p.is_file() else [p / "tokenizer.model", p / "tokenizer.json",
                                          p / "tokenizer" / "tokenizer.model",
                                          p / "tokenizer" / "tokenizer.json"]
    for c in candidates:
        if not c.is_file():
            continue
        if c.suffix == ".model":
            try:
                return _SentencePieceTokenizer(c)
            except ImportError as e:
                raise ImportError(f"{c} is a SentencePiece model: pip install sentencepiece") from e
        data = json.loads(c.read_text())
        if (data.get("model", {}).get("type") == "WordLevel"
                and (data.get("pre_tokenizer") or {}).get("type") == "Whitespace"):
            return WordTokenizer(data["model"]["vocab"])  # what WordTokenizer.save writes
        try:
            return _HFTokenizer(c)
        except ImportError:
            raise ImportError(f"{c} needs the 'tokenizers' package (pip install tokenizers)")
    raise FileNotFoundError(f"no tokenizer found in {p} (looked for {[str(c) for c in candidates]})")


def pad_tokens(seqs: list[list[int]], max_len: int, pad_id: int) -> tuple[list[list[int]],
                                                                         list[list[bool]]]:
    """Right-pad / truncate to ``max_len``; returns (ids, mask) as nested lists ``[B][max_len]``."""
    ids, mask = [], []
    for s in seqs:
        s = s[:max_len]
        ids.append(s + [pad_id] * (max_len - len(s)))
        mask.append([True] * len(s) + [False] * (max_len - len(s)))
    return ids, mask
