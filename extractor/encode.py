"""Tokenising documents into a padded batch that remembers tokens, words and character offsets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TokenizedDoc:
    """One document's real (non-padded) tokens."""

    tokens: list[str]
    word_index: list[int]  # per token: the word it belongs to; each special token is a word of its own
    is_special: list[bool]
    offsets: list[tuple[int, int]]  # per token: [char_start, char_end) in the document's text
    truncated: bool

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_words(self) -> int:
        return self.word_index[-1] + 1 if self.word_index else 0


@dataclass(frozen=True)
class EncodedBatch:
    model_inputs: dict[str, torch.Tensor]  # input_ids, attention_mask (and token_type_ids): [batch, pos]
    docs: list[TokenizedDoc]

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.model_inputs["attention_mask"]  # [batch, pos], 1 = real token

    @property
    def lengths(self) -> list[int]:
        return [doc.n_tokens for doc in self.docs]


def word_indices(word_ids: list[int | None]) -> list[int]:
    """Number words 0..W-1 in order: pieces with the same tokenizer word id share a word; specials stand alone."""
    indices: list[int] = []
    previous: int | None = None
    current = -1
    for word_id in word_ids:
        if word_id is None or word_id != previous:
            current += 1
        indices.append(current)
        previous = word_id
    return indices


def encode(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int | None = None, device: str | torch.device = "cpu"
) -> EncodedBatch:
    """Tokenise `texts` into one right-padded batch, truncating each to `max_length` tokens (model limit if None)."""
    limit = max_length or _model_max_length(tokenizer)
    full_lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    enc = tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=limit,
        return_tensors="pt",
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    docs = []
    for i in range(len(texts)):
        n = int(enc["attention_mask"][i].sum())
        ids = enc["input_ids"][i, :n].tolist()
        special = [bool(s) for s in enc["special_tokens_mask"][i, :n].tolist()]
        word_ids = enc.word_ids(i)[:n]
        # Some tokenizers give specials a word id; the special-tokens mask wins.
        word_ids = [None if s else w for w, s in zip(word_ids, special, strict=True)]
        docs.append(
            TokenizedDoc(
                tokens=tokenizer.convert_ids_to_tokens(ids),
                word_index=word_indices(word_ids),
                is_special=special,
                offsets=[(int(a), int(b)) for a, b in enc["offset_mapping"][i, :n].tolist()],
                truncated=full_lengths[i] > limit,
            )
        )
    model_inputs = {
        key: enc[key].to(device) for key in ("input_ids", "attention_mask", "token_type_ids") if key in enc
    }
    return EncodedBatch(model_inputs=model_inputs, docs=docs)


def _model_max_length(tokenizer: PreTrainedTokenizerBase) -> int:
    limit = tokenizer.model_max_length
    return int(limit) if limit and limit < 1_000_000 else 512
