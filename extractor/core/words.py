"""Words, and subword → word aggregation (Clark et al., 2019, "What Does BERT Look At?").

A word is what the user typed between two whitespace characters: a maximal run of non-whitespace characters of
the original text ("didn't", "cats.", "U.S.-based" are one word each), never the tokenizer's pre-tokens (BERT
splits "didn't" into didn ' t). A token belongs to the word holding the first visible character of its span;
a token with no visible character (byte-level BPE's lone space, a newline token, an empty span) joins the next
word of its text, or the previous one at the end of the text. Each special token is a word of its own. In a
sentence pair each text has its own words (spans index into their own text). Finding a word by its text
(`extractor explain --level word --token cats`) ignores punctuation at either end, so "cats" finds "cats.".

Attention *to* a word is the sum over its pieces (columns); attention *from* a word is the mean over its
pieces (rows). If token rows sum to 1, word rows still sum to 1.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Sequence

import torch

WORD = re.compile(r"\S+")


def whitespace_words(text: str) -> list[tuple[int, int]]:
    """[char_start, char_end) of each word of `text`: its maximal runs of non-whitespace characters."""
    return [match.span() for match in WORD.finditer(text)]


def token_words(
    offsets: Sequence[tuple[int, int]], segments: Sequence[int], is_special: Sequence[bool], texts: Sequence[str]
) -> list[int | None]:
    """Per token: the number of its word over all `texts` (text 0's words first), None for a special token.

    offsets: per token, [char_start, char_end) in the text of its segment (`texts[segment]`)."""
    starts = [[start for start, _ in whitespace_words(text)] for text in texts]
    first_word = [sum(len(s) for s in starts[:i]) for i in range(len(texts))]
    words: list[int | None] = [None] * len(offsets)
    blank: list[int] = []  # tokens with no visible character, placed once their neighbours are known
    for i, ((start, end), segment, special) in enumerate(zip(offsets, segments, is_special, strict=True)):
        if special:
            continue
        text = texts[segment]
        visible = next((c for c in range(start, min(end, len(text))) if not text[c].isspace()), None)
        if visible is None:
            blank.append(i)
            continue
        words[i] = first_word[segment] + bisect_right(starts[segment], visible) - 1
    for i in reversed(blank):  # right to left: a run of blank tokens takes the word after the run
        following = i + 1 if i + 1 < len(words) and segments[i + 1] == segments[i] else None
        words[i] = words[following] if following is not None else None
    for i in blank:  # a blank run at the end of its text takes the word before it
        if words[i] is None:
            earlier = i - 1 if i > 0 and segments[i - 1] == segments[i] and not is_special[i - 1] else None
            words[i] = words[earlier] if earlier is not None else first_word[segments[i]]
    return words


def membership(word_index: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-hot word membership [word, token] from each token's word index."""
    n_words = max(word_index) + 1 if word_index else 0
    index = torch.tensor(word_index, dtype=torch.long)
    matrix = torch.zeros(n_words, len(word_index), dtype=dtype)
    matrix[index, torch.arange(len(word_index))] = 1.0
    return matrix


def to_words(matrix: torch.Tensor, word_index: list[int]) -> torch.Tensor:
    """Aggregate [..., query_tok, key_tok] to [..., query_word, key_word]: mean over query pieces, sum over key pieces."""
    member = membership(word_index, matrix.dtype).to(matrix.device)  # [word, token]
    row_mean = member / member.sum(dim=1, keepdim=True)  # [word, token]
    return row_mean @ matrix @ member.T  # [..., word, word]


def first_key_words(first: torch.Tensor, word_index: list[int]) -> torch.Tensor:
    """[word]: the first key word each query word sees, from the first key token each query token sees ([token]).

    A word's row is the mean of its pieces' rows, so it sees every word one of its pieces sees: from the word of
    the earliest key any piece sees on (word numbers rise with token position, a word's pieces are contiguous).
    """
    index = torch.tensor(word_index, dtype=torch.long, device=first.device)  # [token]
    n_words = int(index.max()) + 1 if len(word_index) else 0
    earliest = torch.full((n_words,), len(word_index), dtype=torch.long, device=first.device)  # [word]
    earliest = earliest.scatter_reduce(0, index, first.long(), reduce="amin")  # earliest key token of any piece
    return index[earliest]
