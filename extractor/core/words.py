"""Subword → word aggregation (Clark et al., 2019, "What Does BERT Look At?").

Attention *to* a word is the sum over its pieces (columns); attention *from* a word is the mean over its
pieces (rows). If token rows sum to 1, word rows still sum to 1.
"""

from __future__ import annotations

import torch


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
