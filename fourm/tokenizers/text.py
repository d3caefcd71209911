"""Text tokenizers, trained on captions, saved in their own library's format.

Backends (``TextTokenizerConfig.backend``):
    bpe                     Hugging Face ``tokenizers`` byte-level BPE (exact round trip)  -> tokenizer.json
    wordpiece               Hugging Face ``tokenizers`` WordPiece, BERT pre-tokenisation     -> tokenizer.json
    sentencepiece-unigram   ``sentencepiece`` unigram, identity normalisation               -> spm.model
    sentencepiece-bpe       ``sentencepiece`` BPE, identity normalisation                   -> spm.model

Ids here are local (0 .. vocab_size-1); ``TokenizerSet`` maps them into the shared vocabulary.
A user's own ``tokenizer.json`` or ``.model`` file loads with ``TextTokenizer.from_file``.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

BACKENDS = ("bpe", "wordpiece", "sentencepiece-unigram", "sentencepiece-bpe")
HF_FILE = "tokenizer.json"
SPM_FILE = "spm.model"


@dataclass
class TextTokenizerConfig:
    backend: str = "bpe"
    vocab_size: int = 1000  # an upper bound: small corpora give fewer ids
    min_frequency: int = 2

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"text backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.vocab_size < 30:
            raise ValueError(f"vocab_size must be >= 30, got {self.vocab_size}")


class TextTokenizer:
    """A trained text tokenizer: ``encode(str) -> list[int]``, ``decode(list[int]) -> str``."""

    def __init__(self, backend: str, impl):
        self.backend = backend
        self._impl = impl

    # -- training and files ----------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], config: TextTokenizerConfig) -> "TextTokenizer":
        """Train on an iterable of strings."""
        texts = [t for t in texts if t]
        if not texts:
            raise ValueError("no text to train the tokenizer on")
        if config.backend.startswith("sentencepiece"):
            import sentencepiece as spm

            model = io.BytesIO()
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=model, vocab_size=config.vocab_size,
                model_type=config.backend.split("-")[1], character_coverage=1.0, hard_vocab_limit=False,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2,
            )
            return cls(config.backend, spm.SentencePieceProcessor(model_proto=model.getvalue()))
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if config.backend == "bpe":
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, min_frequency=config.min_frequency, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        else:
            from tokenizers import normalizers

            tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
            tok.normalizer = normalizers.NFC()
            tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            tok.decoder = decoders.WordPiece()
            trainer = trainers.WordPieceTrainer(vocab_size=config.vocab_size, min_frequency=config.min_frequency, special_tokens=["[UNK]"], show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(config.backend, tok)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TextTokenizer":
        """Load a Hugging Face ``tokenizer.json`` or a sentencepiece ``.model`` file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        if path.suffix == ".model":
            import sentencepiece as spm

            return cls("sentencepiece", spm.SentencePieceProcessor(model_file=str(path)))
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        model_type = json.loads(path.read_text()).get("model", {}).get("type", "BPE").lower()
        return cls("wordpiece" if model_type == "wordpiece" else "bpe", tok)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the library's own file into ``directory``; returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.is_sentencepiece:
            path = directory / SPM_FILE
            path.write_bytes(self._impl.serialized_model_proto())
        else:
            path = directory / HF_FILE
            self._impl.save(str(path))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TextTokenizer":
        """Load what ``save`` wrote (``tokenizer.json`` or ``spm.model``)."""
        directory = Path(directory)
        for name in (HF_FILE, SPM_FILE):
            if (directory / name).is_file():
                return cls.from_file(directory / name)
        raise FileNotFoundError(f"no {HF_FILE} or {SPM_FILE} in {directory}")

    # -- use -------------------------------------------------------------------------------------
    @property
    def is_sentencepiece(self) -> bool:
        return self.backend.startswith("sentencepiece")

    @property
    def vocab_size(self) -> int:
        return int(self._impl.get_piece_size() if self.is_sentencepiece else self._impl.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        """Text -> local ids."""
        if self.is_sentencepiece:
            return list(self._impl.encode(text))
        return list(self._impl.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.is_sentencepiece:
            return [list(x) for x in self._impl.encode(list(texts))]
        return [list(e.ids) for e in self._impl.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Local ids -> text."""
        ids = [int(i) for i in ids]
        if self.is_sentencepiece:
            return self._impl.decode(ids)
        return self._impl.decode(ids, skip_special_tokens=False)
