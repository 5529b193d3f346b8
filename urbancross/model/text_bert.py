"""CMPAGL's text encoder: a BERT (`transformers.BertModel`) and a WordPiece tokenizer, all offline.

The tiny config's vocabulary (`vocab_tiny.txt`, shipped) is: BERT's special tokens ([PAD] is
id 0, so padding is `tokens == 0` as with open_clip), ASCII punctuation, single letters and
digits, their `##` continuations (so any ASCII word splits into known pieces instead of
[UNK]), and the whole words of the embedded benchmark's captions plus a generic English /
remote-sensing word list (`words_en.txt`). `python -m urbancross.model.text_bert` rewrites
the vocabulary file from those two sources; a test checks the shipped file is up to date.
A BERT-base text encoder and its tokenizer load from a local directory instead.
"""

from __future__ import annotations

import os
import re
import string
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import BertConfig, BertModel, BertTokenizer

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB_FILE = Path(__file__).with_name("vocab_tiny.txt")
WORDS_FILE = Path(__file__).with_name("words_en.txt")
TEXT_TINY = {  # BertConfig fields of the CPU text encoder (vocab_size comes from the vocabulary)
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "max_position_embeddings": 64,
    # trained from scratch: BERT's 0.02 init leaves [CLS] nearly the same for every caption (cosine
    # 0.9999 between different benchmark captions) and contrastive training stalls; width**-0.5
    # (open_clip's attention init) does not. No dropout, like the tiny CLIP it is compared with.
    "initializer_range": 128**-0.5,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
CONTEXT_LENGTH = 64  # tokens per caption, [CLS] and [SEP] included (benchmark captions need <= ~50)


def split_words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks, split as BERT's pre-tokenizer does for ASCII text."""
    return re.findall(r"[a-z0-9]+|[^a-z0-9\s]", text.lower())


def benchmark_words(scenes_per_domain: int = 300) -> set[str]:
    """Every word the embedded benchmark writes: captions of many random scenes, plus its word tables."""
    from urbancross.data import synth

    found: set[str] = set(synth.NUMBER_WORDS)
    for table in (synth.NOUNS.values(), synth.DIRECTIONS.values()):
        for pair in table:
            for item in pair:
                found.update(split_words(" ".join(item) if isinstance(item, tuple) else item))
    for d, style in enumerate(synth.STYLES.values()):
        found.update(w for name, _ in style.roofs for w in split_words(name + "-roofed"))
        found.update(w for area in style.areas for w in split_words(area))
        rng = np.random.default_rng([0, d])
        for _ in range(scenes_per_domain):
            scene = synth.make_scene(rng, style)
            for text in synth.describe(synth.perturb(scene, rng, style) if rng.random() < 0.5 else scene, rng):
                found.update(split_words(text))
    return found


def build_vocab() -> list[str]:
    """The tiny vocabulary, in id order (see the module docstring)."""
    pieces = string.ascii_lowercase + string.digits
    words = set(WORDS_FILE.read_text().split()) | benchmark_words()
    words -= set(pieces) | set(string.punctuation)
    return [*SPECIALS, *string.punctuation, *pieces, *("##" + c for c in pieces), *sorted(words)]


def read_vocab(path: str | os.PathLike = VOCAB_FILE) -> list[str]:
    return Path(path).read_text().splitlines()


class BertTextTokenizer:
    """list[str] -> LongTensor [N, context_length]: [CLS] wordpieces [SEP], then [PAD] (id 0).

    The same call surface as open_clip's tokenizers, so the data path does not care which
    family it feeds. `vocab` travels with saved models, so a loaded model needs no files.
    """

    def __init__(self, vocab: list[str], context_length: int = CONTEXT_LENGTH, lowercase: bool = True):
        if not vocab or vocab[0] != "[PAD]" or not set(SPECIALS) <= set(vocab):
            raise ValueError(f"vocabulary must start with [PAD] and contain {SPECIALS}")
        self.vocab = list(vocab)
        self.context_length = context_length
        self.lowercase = lowercase
        self.pad_id = 0
        self.unk_id = self.vocab.index("[UNK]")
        self._tok = BertTokenizer(vocab={t: i for i, t in enumerate(self.vocab)}, do_lower_case=lowercase)

    @classmethod
    def tiny(cls) -> BertTextTokenizer:
        return cls(read_vocab())

    @classmethod
    def from_dir(cls, path: str | os.PathLike, context_length: int = CONTEXT_LENGTH) -> BertTextTokenizer:
        """The tokenizer of a local BERT directory (its `vocab.txt`; casing from `tokenizer_config.json`)."""
        tok = BertTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
        vocab = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
        return cls(vocab, context_length, lowercase=bool(getattr(tok, "do_lower_case", True)))

    def __call__(self, texts: str | list[str]) -> torch.LongTensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = self._tok(texts, padding="max_length", truncation=True, max_length=self.context_length,
                        return_tensors="pt")
        return out["input_ids"]

    def decode(self, ids: torch.Tensor) -> str:
        return self._tok.decode(ids.tolist(), skip_special_tokens=True)


class TextEncoder(nn.Module):
    """`BertModel` (no pooler): token ids -> per-token states, padding masked out."""

    def __init__(self, bert: BertConfig | BertModel):
        super().__init__()
        self.bert = bert if isinstance(bert, BertModel) else BertModel(bert, add_pooling_layer=False)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> TextEncoder:
        """A BERT from a local directory (its `config.json` and weights; nothing is downloaded)."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"bert checkpoint: {path!r} is not a local directory")
        return cls(BertModel.from_pretrained(os.fspath(path), local_files_only=True, add_pooling_layer=False))

    def keep_layers(self, n: int) -> None:
        """Drop every layer after the first `n` (ALBEF's text encoder is BERT's first 6 of 12)."""
        if not 1 <= n <= len(self.bert.encoder.layer):
            raise ValueError(f"text_layers: {n} is not in [1, {len(self.bert.encoder.layer)}]")
        self.bert.encoder.layer = self.bert.encoder.layer[:n]
        self.bert.config.num_hidden_layers = n

    @property
    def width(self) -> int:
        return self.bert.config.hidden_size

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`tokens` [B,L] right-padded ids -> (states [B,L',W], mask [B,L'] True = real token).

        Columns that are padding in every row are dropped first (L' = the longest caption):
        masked padding changes nothing but costs attention.
        """
        mask = tokens != self.bert.config.pad_token_id
        n = max(int(mask.sum(1).max()), 1)
        tokens, mask = tokens[:, :n], mask[:, :n]
        states = self.bert(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        return states, mask


def text_config(vocab_size: int, **fields) -> BertConfig:
    """A `BertConfig` for a randomly initialised text encoder ([PAD] = 0)."""
    return BertConfig(vocab_size=vocab_size, pad_token_id=0, **fields)


if __name__ == "__main__":  # rewrite the shipped vocabulary from words_en.txt + the benchmark
    VOCAB_FILE.write_text("\n".join(build_vocab()) + "\n")
    print(f"wrote {VOCAB_FILE} ({len(read_vocab())} tokens)")
