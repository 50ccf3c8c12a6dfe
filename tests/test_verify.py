"""The recomputation against Hugging Face, per layer and head: real MiniLM and tiny models of every family.

The reference is always Hugging Face's own output (`output_attentions`, `output_hidden_states`, and the z the
model feeds its output projection), never something the recomputation produced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from extractor.attribution.analysis import analyse_batch
from extractor.core.adapters import UnsupportedModelError, adapter_for
from extractor.core.capture import run_with_capture
from extractor.core.encode import encode
from extractor.core.models import LoadedModel, ModelLoadError, bundled_model_path, load_model
from extractor.core.recompute import additive_mask, recompute_attention

ATOL = 1e-5
SUPPORTED = ("bert", "roberta", "electra", "distilbert", "gpt2")  # written out here, not read from the code
TINY_CASES = [
    pytest.param("bert", {}, id="bert"),
    pytest.param("bert", {"is_decoder": True}, id="bert-decoder"),
    pytest.param("roberta", {}, id="roberta"),
    pytest.param("electra", {}, id="electra"),
    pytest.param("distilbert", {}, id="distilbert"),
    pytest.param("gpt2", {}, id="gpt2"),
    pytest.param("gpt2", {"scale_attn_weights": False}, id="gpt2-unscaled"),
    pytest.param("gpt2", {"scale_attn_by_inverse_layer_idx": True}, id="gpt2-inverse-layer-idx"),
    pytest.param("gpt2", {"reorder_and_upcast_attn": True}, id="gpt2-reorder-upcast"),
]


def hf_forward(loaded: LoadedModel, model_inputs: dict[str, torch.Tensor]):
    with torch.no_grad():
        return loaded.model(**model_inputs, output_attentions=True, output_hidden_states=True)


def attention_input(loaded: LoadedModel, hidden_states: tuple[torch.Tensor, ...], layer: int) -> torch.Tensor:
    """What layer `layer`'s attention projects Q, K, V from, per Hugging Face's hidden states (not hooks).

    Post-LN encoders feed the layer input straight in; GPT-2 applies `ln_1` first.
    """
    if loaded.provenance["model_type"] == "gpt2":
        with torch.no_grad():
            return loaded.model.h[layer].ln_1(hidden_states[layer])
    return hidden_states[layer]


def assert_matches_hugging_face(loaded: LoadedModel, texts: list[str]) -> None:
    """Every layer's recomputed pattern and z equal Hugging Face's within ATOL over real query rows."""
    batch = encode(loaded.tokenizer, texts)
    capture = run_with_capture(loaded.adapter, batch.model_inputs)
    direct = hf_forward(loaded, batch.model_inputs)
    mask = additive_mask(batch.attention_mask, loaded.adapter.causal)
    for layer in range(loaded.adapter.n_layers):
        # The hooks saw exactly what Hugging Face reports as the layer's input and attention.
        torch.testing.assert_close(capture.hidden_in[layer], attention_input(loaded, direct.hidden_states, layer))
        torch.testing.assert_close(capture.attentions[layer], direct.attentions[layer], rtol=0, atol=0)
        rec = recompute_attention(capture.hidden_in[layer], loaded.adapter.layer_weights(layer), mask)
        for b, n in enumerate(batch.lengths):
            torch.testing.assert_close(
                rec.pattern[b, :, :n, :],
                direct.attentions[layer][b, :, :n, :],
                rtol=0,
                atol=ATOL,
                msg=lambda m, layer=layer, b=b: f"pattern, layer {layer}, doc {b}: {m}",
            )
            torch.testing.assert_close(
                rec.z[b, :n],
                capture.z[layer][b, :n],
                rtol=0,
                atol=ATOL,
                msg=lambda m, layer=layer, b=b: f"z, layer {layer}, doc {b}: {m}",
            )


def verification(loaded: LoadedModel, texts: list[str]):
    report = analyse_batch(loaded, encode(loaded.tokenizer, texts), measures=("attention",), atol=ATOL).verification
    assert report is not None
    return report


# --- (1) the real MiniLM ---------------------------------------------------------------------------------


def test_minilm_batch_is_padded_to_different_lengths(minilm: LoadedModel, sentences: list[str]) -> None:
    batch = encode(minilm.tokenizer, sentences)
    assert len(set(batch.lengths)) == len(sentences)
    assert (batch.attention_mask == 0).any()


def test_minilm_every_layer_and_head_matches_hugging_face(minilm: LoadedModel, sentences: list[str]) -> None:
    assert_matches_hugging_face(minilm, sentences)


def test_minilm_verification_report_passes(minilm: LoadedModel, sentences: list[str]) -> None:
    report = verification(minilm, sentences)
    assert (report.n_layers, report.n_heads) == (6, 12)
    assert report.pattern_err.shape == report.z_err.shape == (6, 12)
    assert report.passed
    assert report.failing_heads() == []
    assert float(report.pattern_err.max()) <= ATOL and float(report.z_err.max()) <= ATOL
    assert report.n_docs == len(sentences)
    table = report.table()
    assert len(table) == 72 and bool(table["passed"].all())
    assert "PASSED" in report.summary()


def test_minilm_padding_does_not_change_a_document(minilm: LoadedModel, sentences: list[str]) -> None:
    """The short sentence alone and inside the padded batch gives the same attention (padded keys get 0)."""
    batch = encode(minilm.tokenizer, sentences)
    alone = encode(minilm.tokenizer, sentences[:1])
    n = alone.lengths[0]
    in_batch = hf_forward(minilm, batch.model_inputs).attentions
    by_itself = hf_forward(minilm, alone.model_inputs).attentions
    for layer in range(6):
        assert torch.all(in_batch[layer][0, :, :n, n:] == 0.0)
        torch.testing.assert_close(in_batch[layer][0, :, :n, :n], by_itself[layer][0], rtol=0, atol=ATOL)


# --- (2) tiny models of every supported family -----------------------------------------------------------


@pytest.mark.parametrize(("family", "overrides"), TINY_CASES)
def test_tiny_model_matches_hugging_face(
    tiny_loaded: Callable[..., LoadedModel], sentences: list[str], family: str, overrides: dict
) -> None:
    loaded = tiny_loaded(family, **overrides)
    assert loaded.provenance["model_type"] == family
    for key, value in overrides.items():  # the flag survived save_pretrained → load_model
        assert getattr(loaded.model.config, key) == value
    assert_matches_hugging_face(loaded, sentences)
    report = verification(loaded, sentences)
    assert (report.n_layers, report.n_heads) == (2, 4)
    assert report.passed, report.summary()
    assert report.failing_heads() == []


@pytest.mark.parametrize(
    "overrides",
    [{"scale_attn_weights": False}, {"scale_attn_by_inverse_layer_idx": True}],
    ids=["unscaled", "inverse-idx"],
)
def test_gpt2_flags_matter(
    tiny_loaded: Callable[..., LoadedModel],
    monkeypatch: pytest.MonkeyPatch,
    sentences: list[str],
    overrides: dict,
) -> None:
    """Ignoring a GPT-2 scaling flag (using the default 1/√d_head) is caught: the flag tests have teeth."""
    loaded = tiny_loaded("gpt2", **overrides)
    original = loaded.adapter.layer_weights
    d_head = 32 // 4
    monkeypatch.setattr(
        loaded.adapter,
        "layer_weights",
        lambda layer: dataclasses.replace(original(layer), scale=d_head**-0.5),
    )
    report = verification(loaded, sentences)
    assert not report.passed
    # With the inverse-layer-index flag, layer 0 divides by 1 and so is unaffected.
    expected_layers = {0, 1} if "scale_attn_weights" in overrides else {1}
    assert {layer for layer, _ in report.failing_heads()} == expected_layers


# --- (3) the check can fail ------------------------------------------------------------------------------


def perturb_layer(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch, layer: int, name: str) -> None:
    """Hand the recomputation a noisy copy of one layer's `name` weight; the model's forward is untouched."""
    original = loaded.adapter.layer_weights

    def noisy(index: int):
        weights = original(index)
        if index != layer:
            return weights
        W = getattr(weights, name)
        generator = torch.Generator().manual_seed(1)
        return dataclasses.replace(weights, **{name: W + torch.randn(W.shape, generator=generator) * W.std()})

    monkeypatch.setattr(loaded.adapter, "layer_weights", noisy)


@pytest.mark.parametrize("which", ["minilm", "bert", "distilbert", "gpt2"])
def test_perturbed_query_weight_fails_exactly_that_layer(
    which: str,
    minilm: LoadedModel,
    tiny_loaded: Callable[..., LoadedModel],
    monkeypatch: pytest.MonkeyPatch,
    sentences: list[str],
) -> None:
    loaded = minilm if which == "minilm" else tiny_loaded(which)
    n_heads = loaded.adapter.n_heads
    perturb_layer(loaded, monkeypatch, layer=1, name="W_Q")
    report = verification(loaded, sentences[:2])
    assert not report.passed
    assert report.failing_heads() == [(1, h) for h in range(n_heads)]
    assert bool((report.pattern_err[1] > ATOL).all())
    assert "FAILED" in report.summary() and "L1H0" in report.summary()


def test_perturbed_value_weight_fails_through_z_only(
    tiny_loaded: Callable[..., LoadedModel], monkeypatch: pytest.MonkeyPatch, sentences: list[str]
) -> None:
    """W_V does not enter the pattern, so only the z comparison can catch it, and it does."""
    loaded = tiny_loaded("bert")
    perturb_layer(loaded, monkeypatch, layer=0, name="W_V")
    report = verification(loaded, sentences[:2])
    assert report.failing_heads() == [(0, h) for h in range(4)]
    assert float(report.pattern_err.max()) <= ATOL
    assert bool((report.z_err[0] > ATOL).all())


# --- (4) unsupported architectures -----------------------------------------------------------------------


def test_unsupported_architecture_is_refused(tiny_model_dir: Callable[..., Path]) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tiny_model_dir("bloom")))
    message = str(info.value)
    assert "bloom" in message
    for model_type in SUPPORTED:
        assert model_type in message
    assert "\n" not in message


def test_adapter_for_unknown_model_lists_supported_types() -> None:
    model = transformers.BloomModel(transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4))
    with pytest.raises(UnsupportedModelError, match="supported model types: .*gpt2"):
        adapter_for(model)


def test_missing_model_folder_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))  # a folder, but not one written by save_pretrained
    with pytest.raises(ModelLoadError):
        load_model(str(tmp_path / "no" / "such" / "model"))


# --- (5) provenance --------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("which", ["minilm", "gpt2"])
def test_provenance(which: str, minilm: LoadedModel, tiny_model_dir: Callable[..., Path], tiny_loaded) -> None:
    if which == "minilm":
        loaded, folder, spec = minilm, bundled_model_path("minilm"), "minilm"
    else:
        loaded, folder = tiny_loaded("gpt2"), tiny_model_dir("gpt2")
        spec = str(folder)
    prov = loaded.provenance
    assert prov["model"] == spec
    assert Path(prov["resolved_path"]).resolve() == Path(folder).resolve()
    assert re.fullmatch(r"[0-9a-f]{64}", prov["weights_sha256"])
    assert prov["weights_sha256"] == sha256_file(Path(folder) / "model.safetensors")
    assert prov["transformers_version"] == transformers.__version__
    assert prov["torch_version"] == torch.__version__
    assert prov["attn_implementation"] == "eager"
    assert loaded.model.config._attn_implementation == "eager"
    assert prov["dtype"] == "float32" and loaded.dtype == torch.float32
    assert prov["tolerance"] == 1e-5
    assert prov["n_layers"] == len(hf_forward(loaded, encode(loaded.tokenizer, ["a test"]).model_inputs).attentions)


def test_provenance_records_requested_tolerance(tiny_model_dir: Callable[..., Path]) -> None:
    loaded = load_model(str(tiny_model_dir("distilbert")), tolerance=1e-4)
    assert loaded.provenance["tolerance"] == 1e-4
    assert loaded.provenance["model_type"] == "distilbert"


def test_sdpa_model_is_refused_with_a_fix_it_message(minilm) -> None:
    """A model whose attention implementation returns no weights (sdpa) is refused, naming the fix."""
    from transformers import AutoModel

    from extractor.core.adapters import adapter_for
    from extractor.core.capture import MissingAttentionsError, run_with_capture
    from extractor.core.encode import encode
    from extractor.core.models import bundled_model_path

    sdpa = AutoModel.from_pretrained(str(bundled_model_path("minilm")), attn_implementation="sdpa").eval()
    batch = encode(minilm.tokenizer, ["I love pets, especially cats."])
    with pytest.raises(MissingAttentionsError, match="attn_implementation='eager'"):
        run_with_capture(adapter_for(sdpa), batch.model_inputs)
