"""Length bucketing: sort documents by length within a read-ahead buffer, then fill batches by a token budget.

Padding waste is the enemy on real text (lengths vary a lot): a batch costs batch × longest tokens.
A document that is split into windows stays whole inside one batch (its windows are one group).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

G = TypeVar("G")


def plan_batches(
    group_lengths: Sequence[Sequence[int]],
    token_budget: int,
    max_batch: int,
    bucketing: bool = True,
    attention_budget: int | None = None,
) -> list[list[int]]:
    """Split groups (one per document; each a list of unit lengths) into batches of group indices.

    A batch holds at most `max_batch` units, at most `token_budget` padded tokens (units × longest) and at most
    `attention_budget` attention cells per head (units × longest², which is what memory grows with), except
    that a single group always fits in a batch of its own.
    """
    cells = attention_budget or float("inf")
    order = list(range(len(group_lengths)))
    if bucketing:
        order.sort(key=lambda g: max(group_lengths[g]))
    batches: list[list[int]] = []
    current: list[int] = []
    units, longest = 0, 0
    for g in order:
        lengths = group_lengths[g]
        new_units, new_longest = units + len(lengths), max(longest, max(lengths))
        too_big = new_units * new_longest > token_budget or new_units * new_longest**2 > cells
        if current and (new_units > max_batch or too_big):
            batches.append(current)
            current, new_units, new_longest = [], len(lengths), max(lengths)
        current.append(g)
        units, longest = new_units, new_longest
    if current:
        batches.append(current)
    # Within a batch, documents keep their reading order: the batch's rows then come out in doc_id order.
    return [sorted(batch) for batch in batches]


def chunks(items: Sequence[G], size: int) -> list[Sequence[G]]:
    """Consecutive slices of at most `size` items."""
    return [items[i : i + size] for i in range(0, len(items), size)]
