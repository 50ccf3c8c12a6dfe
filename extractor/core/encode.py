"""Tokenising documents: tokenize once → truncate or split into windows → pad into batches.

A `TokenizedDoc` remembers each token's text, word (`extractor.core.words`: what the user typed between
spaces), special flag, character span and its position in the whole document (so windows of a long document
keep document-relative positions).

A document is one text, or a sentence pair `(text, text_pair)` tokenised the way the tokenizer pairs texts
(`tokenizer(text, text_pair)`: BERT's [CLS] A [SEP] B [SEP] with token_type_ids 0…0 1…1). Each token knows its
segment (0: the text, 1: the pair; a special token takes the segment of the text before it, so BERT's segments
equal its token_type_ids), and its character span indexes into its own segment's text. A pair that is too long
is truncated like any document (its end is cut: the pair's text first), or cut into windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from transformers import BatchEncoding, PretrainedConfig, PreTrainedTokenizerBase

from extractor.core.adapters import SUBWORD_MARKERS, adapter_class
from extractor.core.words import token_words

Text = str | tuple[str, str]  # one text, or a sentence pair (text, text_pair)


def segment_texts(text: Text) -> tuple[str, ...]:
    """The texts of a document, by segment: (text,) or (text, text_pair)."""
    return (text,) if isinstance(text, str) else tuple(text)


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
    offsets: list[tuple[int, int]]  # per token: [char_start, char_end) in its segment's text
    positions: list[int]  # per token: its position in the document (windows keep the whole document's)
    word_positions: list[int]  # per word (by word_index): its word position in the document
    truncated: bool = False
    window: int = 0  # window number (0 unless long_documents = window)
    segments: list[int] | None = None  # per token: 0 = the text, 1 = the pair's text; None: one text
    token_type_ids: list[int] | None = None  # per token, when the tokenizer makes them (BERT); else None

    @property
    def token_segments(self) -> list[int]:
        """Per token: its segment (0 = the text, 1 = the pair)."""
        return self.segments if self.segments is not None else [0] * self.n_tokens

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_words(self) -> int:
        return len(set(self.word_index))


@dataclass(frozen=True)
class EncodedBatch:
    model_inputs: dict[str, torch.Tensor]  # input_ids, attention_mask (, token_type_ids): [batch, pos]
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


def _segments(sequence_ids: Sequence[int | None], special: Sequence[bool]) -> list[int]:
    """Per token: its text's number; a special token (no sequence id) takes the segment of the token before it."""
    segments: list[int] = []
    for sequence, is_special in zip(sequence_ids, special, strict=True):
        previous = segments[-1] if segments else 0
        segments.append(previous if sequence is None or is_special else int(sequence))
    return segments


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[Text]) -> list[TokenizedDoc]:
    """Tokenise whole documents (no truncation, no padding): single texts in one call, pairs in another."""
    docs: dict[int, TokenizedDoc] = {}
    singles = [i for i, text in enumerate(texts) if isinstance(text, str)]
    pairs = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    options = {"add_special_tokens": True, "return_offsets_mapping": True, "return_special_tokens_mask": True}
    for chosen in (singles, pairs):
        if not chosen:
            continue
        split = [segment_texts(texts[i]) for i in chosen]
        enc = tokenizer([s[0] for s in split], [s[1] for s in split], **options) if chosen is pairs \
            else tokenizer([s[0] for s in split], **options)
        for k, i in enumerate(chosen):
            docs[i] = _tokenized_doc(tokenizer, enc, k, split[k])
    return [docs[i] for i in range(len(texts))]


def _tokenized_doc(tokenizer: PreTrainedTokenizerBase, enc: BatchEncoding, k: int, texts: tuple[str, ...]) -> TokenizedDoc:
    """Document `k` of a tokenizer's batch output; `texts`: its text, or its text and text_pair."""
    ids = enc["input_ids"][k]
    special = [bool(s) for s in enc["special_tokens_mask"][k]]
    offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"][k]]
    segments = _segments(enc.sequence_ids(k), special)
    word_index = word_indices(token_words(offsets, segments, special, texts))
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert isinstance(tokens, list), "a list of ids converts to a list of tokens"
    return TokenizedDoc(
        input_ids=list(ids),
        tokens=tokens,
        word_index=word_index,
        is_special=special,
        offsets=offsets,
        positions=list(range(len(ids))),
        word_positions=list(range(max(word_index, default=-1) + 1)),
        segments=segments if len(texts) > 1 else None,
        token_type_ids=list(enc["token_type_ids"][k]) if "token_type_ids" in enc else None,
    )


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
        segments=None if doc.segments is None else [doc.segments[i] for i in keep],
        token_type_ids=None if doc.token_type_ids is None else [doc.token_type_ids[i] for i in keep],
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
    """Right-pad `docs` into one batch; token_type_ids go to the model when the tokenizer made them (padded
    with 0, as the tokenizer pads)."""
    longest = max(doc.n_tokens for doc in docs)
    input_ids = torch.full((len(docs), longest), pad_id, dtype=torch.long)  # [batch, pos]
    attention_mask = torch.zeros((len(docs), longest), dtype=torch.long)  # [batch, pos]
    typed = any(doc.token_type_ids is not None for doc in docs)
    token_type_ids = torch.zeros((len(docs), longest), dtype=torch.long)  # [batch, pos]
    for i, doc in enumerate(docs):
        input_ids[i, : doc.n_tokens] = torch.tensor(doc.input_ids, dtype=torch.long)
        attention_mask[i, : doc.n_tokens] = 1
        if doc.token_type_ids is not None:
            token_type_ids[i, : doc.n_tokens] = torch.tensor(doc.token_type_ids, dtype=torch.long)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    if typed:
        inputs["token_type_ids"] = token_type_ids.to(device)
    return EncodedBatch(inputs, docs)


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
    texts: Sequence[Text],
    max_length: int | None = None,
    device: str | torch.device = "cpu",
    config: PretrainedConfig | None = None,
) -> EncodedBatch:
    """Tokenise, truncate to `max_length` (model limit if None) and pad `texts` (texts or pairs) into one batch."""
    limit = max_length or model_max_length(tokenizer, config)
    docs = [truncate(doc, limit) for doc in tokenize(tokenizer, texts)]
    return collate(docs, tokenizer.pad_token_id, device)
