"""Tokenising documents: tokenize once → truncate or split into windows → pad into batches.

A `TokenizedDoc` remembers each token's text, word, special flag, character span and its position in the
whole document (so windows of a long document keep document-relative positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from extractor.core.adapters import SUBWORD_MARKERS, adapter_class


def strip_subword_markers(token: str, markers: Sequence[str] = SUBWORD_MARKERS) -> str:
    """A token's text without subword markers ('##ing' → 'ing', 'Ġthe' → 'the').

    `markers`: one family's (its adapter's `subword_markers`); by default every supported family's.
    """
    for marker in markers:
        token = token.replace(marker, "")
    return token


@dataclass(frozen=True)
class TokenizedDoc:
    """One document (or one window of it): real tokens only, no padding."""

    input_ids: list[int]
    tokens: list[str]
    word_index: list[int]  # per token: its word; each special token is a word of its own
    is_special: list[bool]
    offsets: list[tuple[int, int]]  # per token: [char_start, char_end) in the document's text
    positions: list[int]  # per token: its position in the document (windows keep the whole document's)
    word_positions: list[int]  # per word (by word_index): its word position in the document
    truncated: bool = False
    window: int = 0  # window number (0 unless long_documents = window)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_words(self) -> int:
        return len(set(self.word_index))


@dataclass(frozen=True)
class EncodedBatch:
    model_inputs: dict[str, torch.Tensor]  # input_ids, attention_mask: [batch, pos]
    docs: list[TokenizedDoc]

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.model_inputs["attention_mask"]  # [batch, pos], 1 = real token

    @property
    def lengths(self) -> list[int]:
        return [doc.n_tokens for doc in self.docs]


def word_indices(word_ids: Sequence[int | None]) -> list[int]:
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


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[TokenizedDoc]:
    """Tokenise whole documents (no truncation, no padding)."""
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True)
    docs = []
    for i in range(len(texts)):
        ids = enc["input_ids"][i]
        special = [bool(s) for s in enc["special_tokens_mask"][i]]
        # Some tokenizers give specials a word id; the special-tokens mask wins.
        word_ids = [None if s else w for w, s in zip(enc.word_ids(i), special, strict=True)]
        tokens = tokenizer.convert_ids_to_tokens(ids)
        assert isinstance(tokens, list), "a list of ids converts to a list of tokens"
        docs.append(
            TokenizedDoc(
                input_ids=list(ids),
                tokens=tokens,
                word_index=word_indices(word_ids),
                is_special=special,
                offsets=[(int(a), int(b)) for a, b in enc["offset_mapping"][i]],
                positions=list(range(len(ids))),
                word_positions=list(range(max(word_indices(word_ids), default=-1) + 1)),
            )
        )
    return docs


def _special_edges(doc: TokenizedDoc) -> tuple[int, int]:
    """How many special tokens open and close the document ([CLS] … [SEP] → (1, 1); GPT-2 → (0, 0))."""
    n = doc.n_tokens
    head = 0
    while head < n and doc.is_special[head]:
        head += 1
    tail = 0
    while tail < n - head and doc.is_special[n - 1 - tail]:
        tail += 1
    return head, tail


def _take(doc: TokenizedDoc, keep: list[int]) -> TokenizedDoc:
    """A document made of the tokens at indices `keep`: words renumbered from 0, document positions kept."""
    parent_words = [doc.word_index[i] for i in keep]
    words = word_indices(parent_words)
    word_positions = [doc.word_positions[w] for w in dict.fromkeys(parent_words)]
    return replace(
        doc,
        input_ids=[doc.input_ids[i] for i in keep],
        tokens=[doc.tokens[i] for i in keep],
        word_index=words,
        is_special=[doc.is_special[i] for i in keep],
        offsets=[doc.offsets[i] for i in keep],
        positions=[doc.positions[i] for i in keep],
        word_positions=word_positions,
    )


def truncate(doc: TokenizedDoc, max_length: int) -> TokenizedDoc:
    """Keep the opening specials, the first content tokens and the closing specials: at most `max_length` tokens."""
    if doc.n_tokens <= max_length:
        return doc
    head, tail = _special_edges(doc)
    content = max_length - head - tail
    keep = list(range(head + content)) + list(range(doc.n_tokens - tail, doc.n_tokens))
    kept = _take(doc, keep)
    # A truncated document is the document from now on: positions renumbered 0..max_length-1.
    return replace(kept, positions=list(range(kept.n_tokens)), word_positions=list(range(kept.n_words)), truncated=True)


def windows(doc: TokenizedDoc, max_length: int, stride: int) -> list[TokenizedDoc]:
    """Overlapping windows of at most `max_length` tokens; consecutive windows share `stride` content tokens.

    Every window keeps the document's opening and closing specials, so positions of those specials repeat
    across windows; content positions stay relative to the whole document.
    """
    if doc.n_tokens <= max_length:
        return [doc]
    head, tail = _special_edges(doc)
    content = max_length - head - tail
    step = max(1, content - stride)
    first, last = head, doc.n_tokens - tail
    result: list[TokenizedDoc] = []
    start = first
    while True:
        end = min(start + content, last)
        keep = list(range(head)) + list(range(start, end)) + list(range(last, doc.n_tokens))
        result.append(replace(_take(doc, keep), window=len(result)))
        if end >= last:
            return result
        start += step


def collate(docs: list[TokenizedDoc], pad_id: int, device: str | torch.device = "cpu") -> EncodedBatch:
    """Right-pad `docs` into one batch."""
    longest = max(doc.n_tokens for doc in docs)
    input_ids = torch.full((len(docs), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(docs), longest), dtype=torch.long)
    for i, doc in enumerate(docs):
        input_ids[i, : doc.n_tokens] = torch.tensor(doc.input_ids, dtype=torch.long)
        attention_mask[i, : doc.n_tokens] = 1
    return EncodedBatch({"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}, docs)


def model_max_length(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig | None = None) -> int:
    """The longest input the model takes: the tokenizer's limit, capped by the position embeddings."""
    limit = tokenizer.model_max_length
    limit = int(limit) if limit and limit < 1_000_000 else 512
    positions = getattr(config, "max_position_embeddings", None)  # GPT-2's n_positions answers to this name too
    if config is None or not positions:
        return limit
    family = adapter_class(getattr(config, "model_type", None))
    offset = 0 if family is None else family.position_offset(config)
    return min(limit, int(positions) - offset)


def encode(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int | None = None,
    device: str | torch.device = "cpu",
    config: PretrainedConfig | None = None,
) -> EncodedBatch:
    """Tokenise, truncate to `max_length` (model limit if None) and pad `texts` into one batch."""
    limit = max_length or model_max_length(tokenizer, config)
    docs = [truncate(doc, limit) for doc in tokenize(tokenizer, texts)]
    return collate(docs, tokenizer.pad_token_id, device)
