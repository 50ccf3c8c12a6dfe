"""Association measures checked against brute force built in the test from the model's own modules."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from extractor.attribution.analysis import DocAttention, analyse_batch, decomposition_error
from extractor.attribution.layer_value_norm import layer_value_norm
from extractor.attribution.rollout import rollout
from extractor.attribution.value_norm import value_norm
from extractor.core.encode import encode
from extractor.core.models import LoadedModel
from extractor.core.words import to_words


def get_model(which: str, minilm: LoadedModel, tiny_loaded: Callable[..., LoadedModel]) -> LoadedModel:
    return minilm if which == "minilm" else tiny_loaded(which)


def value_vectors_from_modules(loaded: LoadedModel, model_inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per layer f_h(x_j) = (x_j·W_V + b_V)_h · W_O_h: [batch, head, key, d_model], from nn.Linear/Conv1D.

    x_j comes from Hugging Face's `output_hidden_states` (GPT-2: after `ln_1`), not from the extractor's
    hooks;
    the weights are read from the modules here, not through an adapter.
    """
    model, family = loaded.model, loaded.provenance["model_type"]
    with torch.no_grad():
        hidden = model(**model_inputs, output_hidden_states=True).hidden_states
        out = []
        for layer in range(loaded.provenance["n_layers"]):
            if family == "gpt2":
                block = model.h[layer]
                x = block.ln_1(hidden[layer])
                d_model = x.shape[-1]
                # Conv1D computes x·W + b with W stored [in, out]; c_attn's value third is columns 2d..3d.
                v = x @ block.attn.c_attn.weight[:, 2 * d_model :] + block.attn.c_attn.bias[2 * d_model :]
                W_out = block.attn.c_proj.weight  # [in = head·d_head, out = d_model]
            elif family == "distilbert":
                attn = model.transformer.layer[layer].attention
                x = hidden[layer]
                v = attn.v_lin(x)
                W_out = attn.out_lin.weight.T  # nn.Linear stores [out, in]
            else:
                layer_module = model.encoder.layer[layer].attention
                x = hidden[layer]
                v = layer_module.self.value(x)  # [batch, key, head·d_head]
                W_out = layer_module.output.dense.weight.T  # [head·d_head, d_model]
            n_heads = loaded.provenance["n_heads"]
            d_head = v.shape[-1] // n_heads
            f = torch.stack(
                [v[..., h * d_head : (h + 1) * d_head] @ W_out[h * d_head : (h + 1) * d_head] for h in range(n_heads)],
                dim=1,
            )  # [batch, head, key, d_model]
            out.append(f)
    return out


def hf_attentions(loaded: LoadedModel, model_inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return loaded.model(**model_inputs, output_attentions=True).attentions


# --- (1) the decomposition Σ_h Σ_j α f_h(x_j) + b_O is the model's own output projection -----------------


@pytest.mark.parametrize("which", ["minilm", "gpt2", "distilbert"])
def test_decomposition_is_exact(which: str, minilm, tiny_loaded, sentences: list[str]) -> None:
    loaded = get_model(which, minilm, tiny_loaded)
    errors = decomposition_error(loaded, encode(loaded.tokenizer, sentences))
    assert len(errors) == loaded.adapter.n_layers
    assert max(errors) <= 1e-5, errors


def test_decomposition_error_detects_wrong_output_weights(tiny_loaded, monkeypatch, sentences: list[str]) -> None:
    """If W_O were read wrongly (here: heads' blocks swapped) the decomposition check would say so."""
    import dataclasses

    loaded = tiny_loaded("bert")
    original = loaded.adapter.layer_weights
    monkeypatch.setattr(
        loaded.adapter,
        "layer_weights",
        lambda i: dataclasses.replace(original(i), W_O=original(i).W_O.flip(0)),
    )
    assert min(decomposition_error(loaded, encode(loaded.tokenizer, sentences))) > 1e-3


# --- (2) value_norm = α_hij · ‖f_h(x_j)‖, built independently --------------------------------------------


@pytest.mark.parametrize("which", ["minilm", "gpt2", "distilbert"])
def test_value_norm_matches_independent_computation(which: str, minilm, tiny_loaded, sentences: list[str]) -> None:
    loaded = get_model(which, minilm, tiny_loaded)
    batch = encode(loaded.tokenizer, sentences)
    analysis = analyse_batch(loaded, batch, measures=("attention", "value_norm"))
    f_per_layer = value_vectors_from_modules(loaded, batch.model_inputs)
    attentions = hf_attentions(loaded, batch.model_inputs)
    for i, doc in enumerate(analysis.docs):
        n = doc.doc.n_tokens
        got = doc.head_measures["value_norm"]  # [layer, head, query, key]
        for layer, f in enumerate(f_per_layer):
            alpha = attentions[layer][i, :, :n, :n]  # [head, query, key]
            norm = f[i, :, :n].norm(dim=-1)  # [head, key]
            expected = alpha * norm[:, None, :]
            torch.testing.assert_close(got[layer], expected, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(doc.head_measures["attention"][layer], alpha, rtol=0, atol=1e-5)


# --- (3) layer_value_norm = ‖Σ_h α_hij f_h(x_j)‖, brute force ----------------------------------------------


@pytest.mark.parametrize("which", ["minilm", "gpt2"])
def test_layer_value_norm_matches_brute_force(which: str, minilm, tiny_loaded) -> None:
    loaded = get_model(which, minilm, tiny_loaded)
    batch = encode(loaded.tokenizer, ["I love pets, especially cats.", "The animal was tired."])
    analysis = analyse_batch(loaded, batch, measures=("layer_value_norm",))
    f_per_layer = value_vectors_from_modules(loaded, batch.model_inputs)
    attentions = hf_attentions(loaded, batch.model_inputs)
    for i, doc in enumerate(analysis.docs):
        n = doc.doc.n_tokens
        for layer, f in enumerate(f_per_layer):
            alpha = attentions[layer][i, :, :n, :n]  # [head, query, key]
            summed = (alpha[:, :, :, None] * f[i, :, None, :n, :]).sum(dim=0)  # [query, key, d_model]
            expected = summed.norm(dim=-1)  # [query, key]
            torch.testing.assert_close(doc.layer_measures["layer_value_norm"][layer], expected, rtol=1e-4, atol=1e-5)


def test_layer_value_norm_unit_brute_force() -> None:
    pattern = torch.softmax(torch.randn(2, 3, 5, 5), dim=-1)  # [batch, head, query, key]
    f = torch.randn(2, 3, 5, 7)  # [batch, head, key, d_model]
    got = layer_value_norm(pattern, f)
    expected = torch.empty(2, 5, 5)
    for b in range(2):
        for i in range(5):
            for j in range(5):
                expected[b, i, j] = sum(pattern[b, h, i, j] * f[b, h, j] for h in range(3)).norm()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_value_norm_unit() -> None:
    pattern = torch.softmax(torch.randn(1, 2, 3, 3), dim=-1)
    f = torch.randn(1, 2, 3, 4)
    got = value_norm(pattern, f.norm(dim=-1))
    for h in range(2):
        for i in range(3):
            for j in range(3):
                torch.testing.assert_close(got[0, h, i, j], (pattern[0, h, i, j] * f[0, h, j]).norm())


# --- (4) rows sum to 1; rollout by brute force ------------------------------------------------------------


@pytest.mark.parametrize("level", ["token", "word"])
@pytest.mark.parametrize("which", ["minilm", "gpt2"])
def test_attention_and_rollout_rows_sum_to_one(
    which: str, level: str, minilm, tiny_loaded, sentences: list[str]
) -> None:
    loaded = get_model(which, minilm, tiny_loaded)
    analysis = analyse_batch(
        loaded, encode(loaded.tokenizer, sentences), measures=("attention", "rollout"), level=level
    )
    for doc in analysis.docs:
        assert doc.level == level
        for measure in (doc.head_measures["attention"], doc.layer_measures["rollout"]):
            assert measure.shape[-1] == measure.shape[-2] == doc.size
            sums = measure.sum(dim=-1)
            torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-5)
            assert (measure >= 0).all()
    if which == "minilm" and level == "word":  # "councilmen" is two pieces, so word and token sizes differ
        assert any(doc.doc.n_words < doc.doc.n_tokens for doc in analysis.docs)


def test_rollout_brute_force() -> None:
    batch, heads, n, layers = 2, 3, 4, 3
    patterns = [torch.softmax(torch.randn(batch, heads, n, n) * 2, dim=-1) for _ in range(layers)]
    got = rollout(patterns)
    assert len(got) == layers
    for b in range(batch):
        rolled = None
        for layer in range(layers):
            mixed = torch.zeros(n, n)
            for i in range(n):
                for j in range(n):
                    mean = sum(float(patterns[layer][b, h, i, j]) for h in range(heads)) / heads
                    mixed[i, j] = 0.5 * mean + (0.5 if i == j else 0.0)
            mixed = mixed / mixed.sum(dim=1, keepdim=True)
            rolled = mixed if rolled is None else mixed @ rolled
            torch.testing.assert_close(got[layer][b], rolled, rtol=1e-5, atol=1e-6)


def test_rollout_of_self_attention_is_identity() -> None:
    patterns = [torch.eye(4).expand(1, 2, 4, 4).clone() for _ in range(3)]
    for rolled in rollout(patterns):
        torch.testing.assert_close(rolled[0], torch.eye(4))


def test_rollout_of_single_uniform_layer() -> None:
    n = 4
    got = rollout([torch.full((1, 2, n, n), 1.0 / n)])[0][0]
    expected = torch.full((n, n), 0.5 / n) + 0.5 * torch.eye(n)
    torch.testing.assert_close(got, expected)


# --- (5) word aggregation on a hand-built example ---------------------------------------------------------


def test_to_words_hand_built() -> None:
    # Tokens 1 and 2 are one word: word_index [0, 1, 1, 2].
    matrix = torch.tensor(
        [
            [0.1, 0.2, 0.3, 0.4],
            [0.5, 0.1, 0.1, 0.3],
            [0.3, 0.3, 0.2, 0.2],
            [0.0, 0.6, 0.2, 0.2],
        ]
    )
    # Rows: mean over the word's query pieces; columns: sum over the word's key pieces.
    expected = torch.tensor(
        [
            [0.1, 0.2 + 0.3, 0.4],
            [(0.5 + 0.3) / 2, (0.1 + 0.1 + 0.3 + 0.2) / 2, (0.3 + 0.2) / 2],
            [0.0, 0.6 + 0.2, 0.2],
        ]
    )
    got = to_words(matrix, [0, 1, 1, 2])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.sum(dim=-1), torch.ones(3))
    # Leading dimensions ([layer, head, ...]) are carried through.
    stacked = torch.stack([matrix, 2 * matrix])[None]  # [1, 2, 4, 4]
    torch.testing.assert_close(to_words(stacked, [0, 1, 1, 2]), torch.stack([expected, 2 * expected])[None])


def test_doc_to_word_level_aggregates_every_measure(minilm: LoadedModel) -> None:
    doc = encode(minilm.tokenizer, ["councilmen"]).docs[0]
    assert doc.tokens == ["[CLS]", "council", "##men", "[SEP]"]
    assert doc.word_index == [0, 1, 1, 2]
    head = torch.rand(2, 3, 4, 4)
    layer = torch.rand(2, 4, 4)
    words = DocAttention(
        doc=doc, level="token", head_measures={"attention": head}, layer_measures={"rollout": layer}
    ).to_word_level()
    assert words.level == "word" and words.size == 3
    # Brute force for one cell of each: query word 1 (tokens 1, 2), key word 1 (tokens 1, 2).
    torch.testing.assert_close(words.head_measures["attention"][1, 2, 1, 1], head[1, 2, 1:3, 1:3].sum() / 2)
    torch.testing.assert_close(words.layer_measures["rollout"][0, 1, 0], layer[0, 1:3, 0].sum() / 2)
    torch.testing.assert_close(words.layer_measures["rollout"][0, 0, 1], layer[0, 0, 1:3].sum())


# --- (6) Kobayashi et al. (2020): value_norm moves weight away from [CLS]/[SEP] ----------------------------


def test_value_norm_gives_special_tokens_less_than_attention(minilm: LoadedModel, sample_texts: list[str]) -> None:
    assert len(sample_texts) == 60
    attention_share, value_share, rows = 0.0, 0.0, 0
    for start in range(0, len(sample_texts), 20):
        batch = encode(minilm.tokenizer, sample_texts[start : start + 20])
        for doc in analyse_batch(minilm, batch, measures=("attention", "value_norm"), verify=False).docs:
            special = torch.tensor(doc.doc.is_special)  # [key]
            assert special.sum() == 2  # [CLS] and [SEP]
            attention = doc.head_measures["attention"]  # [layer, head, query, key]
            value = doc.head_measures["value_norm"]
            value = value / value.sum(dim=-1, keepdim=True)  # normalised per row
            attention_share += float(attention[..., special].sum())
            value_share += float(value[..., special].sum())
            rows += attention.shape[0] * attention.shape[1] * attention.shape[2]
    attention_share /= rows
    value_share /= rows
    assert value_share < attention_share, (value_share, attention_share)
