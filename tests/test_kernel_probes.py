"""The fast path of a run: the model's own sdpa kernel, the pattern computed once from the q and k it received,
and randomized (Freivalds) checks of q, k, v against the weights and of the pattern against the kernel's z.

Every check compares with Hugging Face's own outputs: its eager `output_attentions`, or the z its output
projection receives. Negative controls perturb the forward (a hook scaling one layer's projection) or the
extractor's own maths (a mask without the sliding window) and must fail exactly where the change is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from conftest import EXAMPLE_SENTENCES, FAMILIES

from extractor.attribution.analysis import analyse_batch
from extractor.core.adapters.base import AttentionWeights
from extractor.core.encode import encode
from extractor.core.models import LoadedModel
from extractor.core.probes import projection_errors, z_probe_errors
from extractor.core.recompute import rotate, unrotate
from extractor.core.sdpa_capture import SDPA_RECORDING

ATOL = 1e-5
ENCODERS = ["bert", "roberta", "distilbert", "gpt2"]
# the module whose output is layer 0's q (fused q/k/v for GPT-2 and GPT-NeoX; after the norm for Qwen3)
Q_MODULE = {"bert": "attention.self.query", "roberta": "attention.self.query", "distilbert": "attention.q_lin",
            "gpt2": "attn.c_attn"}


def loaded_family(name: str, tiny_loaded, rotary_loaded) -> LoadedModel:
    return rotary_loaded(name) if name in FAMILIES else tiny_loaded(name)


def q_module(loaded: LoadedModel, layer: int) -> torch.nn.Module:
    family = loaded.adapter.family
    if family in Q_MODULE:
        block = loaded.adapter.layer_modules()[layer]
        return block.get_submodule(Q_MODULE[family])
    attention = loaded.adapter.attention_modules()[layer]
    return getattr(attention, {"gpt_neox": "query_key_value", "qwen3": "q_norm"}.get(family, "q_proj"))


@contextmanager
def scaled_on_sdpa(module: torch.nn.Module, model: torch.nn.Module, factor: float) -> Iterator[None]:
    """Scale `module`'s output only while the model runs the recording sdpa kernel: the eager comparison never
    sees the change, so only the probes can catch it."""
    def hook(mod, args, output):
        return output * factor if model.config._attn_implementation == SDPA_RECORDING else output

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("name", [*ENCODERS, *FAMILIES])
def test_pattern_from_the_sdpa_kernel_equals_hugging_faces_eager_attentions(name: str, tiny_loaded, rotary_loaded) -> None:
    loaded = loaded_family(name, tiny_loaded, rotary_loaded)
    batch = encode(loaded.tokenizer, EXAMPLE_SENTENCES)
    assert bool((batch.attention_mask == 0).any())  # a padded batch
    analysis = analyse_batch(loaded, batch, measures=("attention", "value_norm"), eager=False)
    report = analysis.verification
    assert report is not None and report.passed, report.summary()
    assert report.n_docs_compared == 0 and report.n_docs == 3  # probed, not compared with eager
    assert float(report.projection_err.max()) < 1e-5 and float(report.z_probe_err.max()) < ATOL
    assert float(report.z_probe_err.max()) > 0 or float(report.projection_err.max()) > 0  # the probes did run
    with torch.no_grad():
        eager = loaded.model(**batch.model_inputs, output_attentions=True).attentions
    assert loaded.model.config._attn_implementation == "eager"  # switched back after the forward
    eager_values = analyse_batch(loaded, batch, measures=("value_norm",), eager=True).per_layer["value_norm"]
    for layer, hf in enumerate(eager):
        for b, n in enumerate(batch.lengths):
            torch.testing.assert_close(analysis.per_layer["attention"][layer][b, :, :n, :n], hf[b, :, :n, :n],
                                       rtol=0, atol=ATOL)
            torch.testing.assert_close(analysis.per_layer["value_norm"][layer][b, :, :n, :n],
                                       eager_values[layer][b, :, :n, :n], rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize("name", [*ENCODERS, *FAMILIES])
def test_a_scaled_q_projection_fails_the_probes_in_exactly_its_layer(name: str, tiny_loaded, rotary_loaded) -> None:
    loaded = loaded_family(name, tiny_loaded, rotary_loaded)
    batch = encode(loaded.tokenizer, EXAMPLE_SENTENCES)
    with scaled_on_sdpa(q_module(loaded, 1), loaded.model, 1.05):
        probed = analyse_batch(loaded, batch, measures=("attention",), eager=False).verification
        compared = analyse_batch(loaded, batch, measures=("attention",), eager=True).verification
    assert probed is not None and compared is not None
    assert probed.failing_heads() == [(1, h) for h in range(4)], probed.summary()
    assert float(probed.projection_err[1].min()) > 1e-3  # q is 5% off its weights
    assert compared.passed  # the eager kernel never saw the hook


def test_a_mask_without_the_sliding_window_fails_the_z_probe(rotary_loaded, monkeypatch) -> None:
    """q, k, v are right, the extractor's own mask is wrong (no window): only the pattern-against-z probe can
    see it, and it fails exactly the windowed layer."""
    loaded = rotary_loaded("qwen2-window-layer1")
    batch = encode(loaded.tokenizer, EXAMPLE_SENTENCES)
    monkeypatch.setattr(type(loaded.adapter), "sliding_window", lambda self, attention: None)
    loaded.adapter._weight_cache.clear()
    try:
        report = analyse_batch(loaded, batch, measures=("attention",), eager=False).verification
    finally:
        loaded.adapter._weight_cache.clear()
    assert report is not None
    assert report.failing_heads() == [(1, h) for h in range(4)], report.summary()
    assert float(report.projection_err.max()) < 1e-5 and float(report.z_probe_err[1].min()) > 1e-3


@pytest.mark.parametrize("flags", [{"scale_attn_by_inverse_layer_idx": True}, {"reorder_and_upcast_attn": True},
                                   {"scale_attn_weights": False}], ids=lambda flags: next(iter(flags)))
def test_gpt2_scaling_flags_on_the_sdpa_kernel(flags: dict, tiny_loaded) -> None:
    """GPT-2's scaling flags reach the sdpa kernel as its `scaling`; the pattern computed with the adapter's scale
    must equal Hugging Face's eager attentions (which apply the flags their own way)."""
    loaded = tiny_loaded("gpt2", **flags)
    batch = encode(loaded.tokenizer, EXAMPLE_SENTENCES)
    analysis = analyse_batch(loaded, batch, measures=("attention",), eager=False)
    assert analysis.verification is not None and analysis.verification.passed, analysis.verification.summary()
    with torch.no_grad():
        eager = loaded.model(**batch.model_inputs, output_attentions=True).attentions
    for layer, hf in enumerate(eager):
        for b, n in enumerate(batch.lengths):
            torch.testing.assert_close(analysis.per_layer["attention"][layer][b, :, :n, :n], hf[b, :, :n, :n],
                                       rtol=0, atol=ATOL)


def test_attribution_measures_and_models_without_the_interface_take_the_eager_path(minilm) -> None:
    batch = encode(minilm.tokenizer, EXAMPLE_SENTENCES)
    report = analyse_batch(minilm, batch, measures=("attention", "value_zeroing"), eager=False).verification
    assert report is not None and report.n_docs_compared == 3  # value zeroing re-runs layers on the eager kernel


# --- the probes themselves, on hand-made tensors -------------------------------------------------------------


def _weights(n_heads: int, n_kv: int, d_model: int = 12, d_head: int = 4, rotary: int = 0) -> AttentionWeights:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return AttentionWeights(W_Q=rand(n_heads, d_model, d_head), W_K=rand(n_kv, d_model, d_head),
                            W_V=rand(n_kv, d_model, d_head), W_O=rand(n_heads, d_head, d_model),
                            b_Q=rand(n_heads, d_head), b_K=rand(n_kv, d_head), b_V=rand(n_kv, d_head),
                            b_O=rand(d_model), scale=0.5, causal=True, rotary_dims=rotary)


def _qkv(x: torch.Tensor, w: AttentionWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Brute force, head by head: x [batch, pos, d_model] → q, k, v [batch, head, pos, d_head]."""
    def per_head(W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.stack([x @ W[h] + b[h] for h in range(W.shape[0])], dim=1)

    return per_head(w.W_Q, w.b_Q), per_head(w.W_K, w.b_K), per_head(w.W_V, w.b_V)


def test_projection_probe_finds_a_wrong_value_head_of_a_group() -> None:
    w = _weights(n_heads=4, n_kv=2)
    x = torch.randn(2, 5, 12)
    q, k, v = _qkv(x, w)
    assert float(projection_errors(x, w, q, k, v, None, seed=0).max()) < 1e-6
    v_wrong = v.clone()
    v_wrong[:, 1, 3, 0] += 0.01  # one number of key/value head 1 (query heads 2 and 3)
    errors = projection_errors(x, w, q, k, v_wrong, None, seed=0)
    assert float(errors[:2].max()) < 1e-6 and float(errors[2:].min()) > 1e-5


def test_projection_probe_undoes_the_rotation() -> None:
    w = _weights(n_heads=2, n_kv=2, rotary=4)
    x = torch.randn(1, 6, 12)
    q, k, v = _qkv(x, w)
    angle = torch.arange(6)[:, None] * torch.tensor([0.3, 0.7, 0.3, 0.7])  # [pos, rotary_dims], halves repeated
    cos, sin = angle.cos()[None], angle.sin()[None]
    assert torch.allclose(unrotate(rotate(q, cos, sin), cos, sin), q, atol=1e-6)
    rotated = (rotate(q, cos, sin), rotate(k, cos, sin))
    assert float(projection_errors(x, w, *rotated, v, (cos, sin), seed=1).max()) < 1e-6
    assert float(projection_errors(x, w, q, rotated[1], v, (cos, sin), seed=1).min()) > 1e-3  # q not rotated


def test_z_probe_compares_pattern_times_v_with_z_on_real_rows_only() -> None:
    w = _weights(n_heads=2, n_kv=1)
    pattern = torch.softmax(torch.randn(1, 2, 4, 4), dim=-1)  # [batch, head, query, key]
    v = torch.randn(1, 1, 4, 4)  # one key/value head for both query heads
    z = torch.matmul(pattern, v.expand(1, 2, 4, 4)).transpose(1, 2)  # [batch, query, head, d_head]
    mask = torch.tensor([[1, 1, 1, 0]])
    assert float(z_probe_errors(pattern, v, z, mask, w, seed=0).max()) < 1e-6
    z_padding_off = z.clone()
    z_padding_off[0, 3] += 1.0  # the padding row: not compared
    assert float(z_probe_errors(pattern, v, z_padding_off, mask, w, seed=0).max()) < 1e-6
    z_off = z.clone()
    z_off[0, 1, 1] += 0.01  # head 1, a real row
    errors = z_probe_errors(pattern, v, z_off, mask, w, seed=0)
    assert float(errors[0]) < 1e-6 and float(errors[1]) > 1e-4
