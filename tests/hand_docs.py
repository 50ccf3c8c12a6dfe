"""Hand-built documents for head-metric and similarity tests: a [layer, head, query, key] pattern + tokens."""

from __future__ import annotations

import torch

from extractor.attribution.analysis import DocAttention
from extractor.core.encode import TokenizedDoc


def make_doc(
    attention: torch.Tensor,
    tokens: list[str],
    specials: list[bool] | None = None,
    value_norm: torch.Tensor | None = None,
) -> DocAttention:
    """A token-level DocAttention; `attention` is [query, key] (one head) or [layer, head, query, key]."""
    if attention.dim() == 2:
        attention = attention[None, None]
    if value_norm is not None and value_norm.dim() == 2:
        value_norm = value_norm[None, None]
    n = len(tokens)
    assert attention.shape[-2:] == (n, n)
    specials = specials if specials is not None else [t.startswith("[") and t.endswith("]") for t in tokens]
    doc = TokenizedDoc(
        input_ids=list(range(n)),
        tokens=tokens,
        word_index=list(range(n)),
        is_special=specials,
        offsets=[(i, i + 1) for i in range(n)],
        positions=list(range(n)),
        word_positions=list(range(n)),
    )
    measures = {"attention": attention.float()}
    if value_norm is not None:
        measures["value_norm"] = value_norm.float()
    return DocAttention(doc=doc, level="token", head_measures=measures)


def random_patterns(
    n_layers: int, n_heads: int, n: int, causal: bool, generator: torch.Generator
) -> torch.Tensor:
    """[layer, head, query, key] random softmax rows (peaked), upper triangle 0 when causal."""
    scores = 3.0 * torch.randn(n_layers, n_heads, n, n, generator=generator)
    if causal:
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(dim=-1)
