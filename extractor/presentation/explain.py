"""`extractor explain`: the row of A for one token, and how Z = A·V follows from it.

This is the user's question answered by the tool: A (per layer and head) is the N×N association; row i is
how token i spreads its attention over every token j; Z is the mixture of value vectors that row produces.
"""

from __future__ import annotations

import unicodedata

from extractor.attribution.analysis import DocAttention
from extractor.attribution.attention import row_entropy
from extractor.attribution.measures import LAYER_MEASURES, REGISTRY
from extractor.core.encode import strip_subword_markers
from extractor.errors import UserError, shortened


def normalise_token(token: str, level: str = "token") -> str:
    """Token text without subword markers (BERT `##`, GPT-2 `Ġ`), lower-cased; at level word also without
    punctuation at either end (so 'cats' finds the word 'cats.', and '"didn't"' finds didn't), unless the word
    is punctuation only ('...' finds '...')."""
    text = strip_subword_markers(token).strip().lower()
    if level != "word":
        return text
    start, end = 0, len(text)
    while start < end and unicodedata.category(text[start]).startswith("P"):
        start += 1
    while end > start and unicodedata.category(text[end - 1]).startswith("P"):
        end -= 1
    return text[start:end] or text


def shown_labels(doc: DocAttention, text: object = None) -> list[str]:
    """What to print for each position: the slice of the user's `text` each token covers (specials: their token),
    so a byte-level BPE token reads "it", not "Ġit"; words, or no text given, as `doc.labels()`."""
    if doc.level == "word" or not isinstance(text, str):
        return doc.labels()
    return [text[start:end].strip() or token for token, (start, end) in zip(doc.doc.tokens, doc.doc.offsets, strict=True)]


def find_token(doc: DocAttention, token: str, occurrence: int = 1, labels: list[str] | None = None) -> int:
    """Position of the `occurrence`-th token (or word, at level word: what was typed between spaces, matched
    without punctuation at its ends) whose text is `token`; a clear error listing the tokens if absent."""
    if occurrence < 1:
        raise UserError(f"--occurrence counts from 1; got {occurrence}")
    wanted = normalise_token(token, doc.level)
    labels = labels or doc.labels()
    matches = [i for i, t in enumerate(labels) if normalise_token(t, doc.level) == wanted]
    if len(matches) < occurrence:
        raise UserError(
            f"{'word' if doc.level == 'word' else 'token'} '{shortened(token)}' is not in the text (occurrence "
            f"{occurrence}); its {doc.level}s are: {shortened(' '.join(labels))}"
        )
    return matches[occurrence - 1]


def sharpest_heads(doc: DocAttention, position: int, count: int = 3) -> list[tuple[int, int]]:
    """The (layer, head) pairs whose attention row for `position` has the lowest entropy (focuses most sharply)."""
    rows = doc.head_measures["attention"][:, :, position, :]  # [layer, head, key]
    entropy = row_entropy(rows).flatten()
    n_heads = rows.shape[1]
    return [(int(i) // n_heads, int(i) % n_heads) for i in entropy.argsort()[:count]]


def format_head_row(doc: DocAttention, position: int, layer: int, head: int, measure: str, top: int = 10,
                    labels: list[str] | None = None) -> str:
    """Attention and value_norm for one token's row, side by side, strongest first by `measure`."""
    labels = labels or doc.labels()
    attention = doc.head_measures["attention"][layer, head, position]  # [key]
    value = doc.head_measures["value_norm"][layer, head, position]  # [key]
    value_share = value / value.sum().clamp_min(1e-30)
    order = (value_share if measure == "value_norm" else attention).argsort(descending=True)[:top]
    # Drop keys that carry (almost) nothing under both measures, but always show the strongest one.
    order = order[: max(1, int(((attention[order] >= 1e-3) | (value_share[order] >= 1e-3)).sum()))]
    lines = [
        f"layer {layer} head {head}: row '{labels[position]}' (position {position}), "
        f"entropy {float(row_entropy(attention)):.2f} nats",
        f"  {'key':<14}{'attention':>10}{'value_norm':>12}{'share':>8}",
    ]
    for j in order.tolist():
        lines.append(f"  {labels[j]:<14}{float(attention[j]):>10.3f}{float(value[j]):>12.3f}{float(value_share[j]):>8.3f}")
    lines.append(
        f"  z['{labels[position]}'] = Σ_j A[{position}, j]·v_j: this row mixes the value vectors with the weights above; "
        f"the top {len(order)} keys hold {float(attention[order].sum()):.1%} of the attention "
        f"and {float(value_share[order].sum()):.1%} of the value-weighted norm."
    )
    return "\n".join(lines)


def format_layer_row(doc: DocAttention, position: int, layer: int, measure: str, top: int = 10,
                     labels: list[str] | None = None) -> str:
    """One layer-level measure's row for `position` (all heads together), strongest keys first."""
    labels = labels or doc.labels()
    row = doc.layer_measures[measure][layer, position]
    order = row.argsort(descending=True)[:top]
    lines = [f"{measure} after layer {layer}: row '{labels[position]}' — {REGISTRY[measure].meaning}"]
    lines += [f"  {labels[j]:<14}{float(row[j]):>8.3f}" for j in order.tolist()]
    return "\n".join(lines)


def explain_token(
    doc: DocAttention, token: str, layer: int | None, head: int | None, measure: str = "attention", occurrence: int = 1,
    text: object = None,
) -> str:
    """The text `extractor explain` prints (`text`: the document's text, to print tokens as the user wrote them)."""
    if measure not in REGISTRY:
        raise UserError(f"--measure '{measure}' is not supported; choose one of: {', '.join(REGISTRY)}")
    n_layers, n_heads = doc.head_measures["attention"].shape[:2]
    if layer is not None and not 0 <= layer < n_layers:
        raise UserError(f"--layer {layer} is out of range; this model has layers 0..{n_layers - 1}")
    if head is not None and not 0 <= head < n_heads:
        raise UserError(f"--head {head} is out of range; this model has heads 0..{n_heads - 1}")
    labels = shown_labels(doc, text)
    position = find_token(doc, token, occurrence, labels)
    if measure in LAYER_MEASURES:
        layers = [layer] if layer is not None else list(range(n_layers))
        return "\n\n".join(format_layer_row(doc, position, lay, measure, labels=labels) for lay in layers)
    if layer is not None and head is not None:
        heads = [(layer, head)]
        intro = ""
    else:
        candidates = sharpest_heads(doc, position, count=n_layers * n_heads)
        heads = [(l, h) for l, h in candidates if (layer is None or l == layer) and (head is None or h == head)][:3]
        intro = f"The {len(heads)} heads that focus '{labels[position]}' most sharply (lowest row entropy):\n\n"
    body = "\n\n".join(format_head_row(doc, position, l, h, measure, labels=labels) for l, h in heads)
    footer = (
        "\nA (attention) is the association table: row i is how token i spreads its attention over every token j "
        "and sums to 1. Z = A·V is that row's mixture of value vectors (the layer's output for token i), not a table "
        "of associations. value_norm = ‖α_ij·f(x_j)‖ also weighs how large each value vector is after W_O; "
        "'share' is its fraction of the row."
    )
    return intro + body + "\n" + footer
