"""The notebook layer: a short repr and an HTML summary of `ExtractionResult`, `show()` (the report's explorer
inline, checked in a real headless browser), `heads()`, `attention()`/`tensor()`, an in-memory Hugging Face
model, and API errors that name Python arguments."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import transformers as tf
from conftest import INIT_RANGE, _tiny_config
from test_report import page_data

from extractor import ExtractionResult, extract
from extractor.api import ArgumentError
from extractor.core.models import LoadedModel, bundled_model_path
from extractor.errors import UserError
from extractor.heads.metrics import HeadStats
from extractor.presentation.report import TEMPLATE, decode_group


@pytest.fixture(scope="module")
def result(minilm: LoadedModel, sentences: list[str]) -> ExtractionResult:
    return extract(sentences[:2], model=minilm)


def hf_attentions(loaded: LoadedModel, text: str) -> torch.Tensor:
    """Hugging Face's own attentions of `text`, stacked: [layer, head, query, key]."""
    inputs = loaded.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        attentions = loaded.model(**inputs, output_attentions=True).attentions
    return torch.stack([a[0] for a in attentions])  # [layer, head, query, key]


def shown_page(view: Any) -> str:
    """The report page inside `show()`'s <iframe srcdoc>, unescaped."""
    markup = view._repr_html_()
    match = re.search(r'<iframe [^>]*srcdoc="([^"]*)"', markup)
    assert match is not None, "show() renders an <iframe srcdoc>"
    return html.unescape(match.group(1))


# -- 1. repr ---------------------------------------------------------------------------------------------------
def test_repr_is_one_short_line(result: ExtractionResult) -> None:
    text = repr(result)
    assert len(text) < 300 and "\n" not in text
    assert text.startswith("ExtractionResult(2 texts, minilm 6×12, ")
    for measure in (*result.docs[0].head_measures, *result.docs[0].layer_measures):
        assert measure in text
    assert "verification passed" in text


def test_repr_html_lists_texts_and_token_counts(result: ExtractionResult, sentences: list[str]) -> None:
    markup = result._repr_html_()
    tokens = result.tokens()
    for doc, text in enumerate(sentences[:2]):
        assert html.escape(text) in markup  # "didn't" → "didn&#x27;t"
        assert f"<td>{doc}</td>" in markup and f"<td>{(tokens['doc_id'] == doc).sum()}</td>" in markup
    assert "verification passed" in markup and "minilm 6×12" in markup
    assert f"max |Δ pattern| {result.report.pattern_err.max().item():.2e}" in markup


# -- 2. show ---------------------------------------------------------------------------------------------------
def test_show_embeds_the_report_page_with_every_token(result: ExtractionResult, tmp_path: Path) -> None:
    page = shown_page(result.show(doc=1))
    template_root = re.search(r"<body>\s*(<header>)", TEMPLATE.read_text(encoding="utf-8"))
    assert template_root is not None and template_root.group(1) in page
    assert '<svg id="view"' in page and '<script id="app">' in page
    (tmp_path / "page.html").write_text(page, encoding="utf-8")
    meta, docs = page_data(tmp_path / "page.html")
    tokens = list(result.docs[1].doc.tokens)
    assert [d["id"] for d in docs] == [1]
    assert docs[0]["tokens"] == tokens
    for token in tokens:
        assert json.dumps(token) in page
    assert (meta["n_layers"], meta["n_heads"]) == (6, 12)
    assert meta["verification_summary"]["passed"] is True
    # The values on the page are the result's patterns, rounded to the page's 4 decimals.
    group = decode_group(docs[0]["h"][3][7])
    pattern = result.pattern(1, 3, 7)
    torch.testing.assert_close(
        torch.tensor(group["attention"], dtype=torch.float32),
        pattern[torch.tensor(group["query_pos"]), torch.tensor(group["key_pos"])],
        rtol=0, atol=0.5e-4 + 1e-7,
    )
    # The grid is coloured by the per-head metrics of the shown document.
    heads = result.heads([1])
    assert meta["metrics"]["max_weight"] == pytest.approx(heads["max_weight"].tolist())


def test_show_top_k_and_size_bound(result: ExtractionResult, tmp_path: Path) -> None:
    page = shown_page(result.show(doc=None, top_k=2))
    (tmp_path / "page.html").write_text(page, encoding="utf-8")
    meta, docs = page_data(tmp_path / "page.html")
    assert [d["id"] for d in docs] == [0, 1]
    counts = decode_group(docs[0]["h"][0][0])["query_pos"]
    assert max(pd.Series(counts).value_counts()) == 2  # two keys per query row
    with pytest.raises(UserError, match=r"do not fit in max_mb=0.1; .* top_k=8"):
        result.show(max_mb=0.1)  # the page without documents fits, a dense document does not
    with pytest.raises(UserError, match=r"more than max_bytes=1,000; raise max_mb=$"):
        result.show(max_mb=0.001)  # the report's own check, its option named as show()'s argument
    with pytest.raises(ArgumentError, match=r"doc=5 .* 0\.\.1"):
        result.show(doc=5)


def test_show_runs_in_a_browser(result: ExtractionResult, browser: Any) -> None:
    """The inline view loads inside a host page (as in Jupyter) with no errors and draws every head and token."""
    markup = result.show(doc=0)._repr_html_()
    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.set_default_timeout(15_000)
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.set_content(f"<!DOCTYPE html><html><body><h1>notebook</h1>{markup}</body></html>")
        frame = page.frame_locator("iframe.extractor-view")
        frame.locator("#grid rect.cell").first.wait_for()
        cells = frame.locator("#grid rect.cell").count()
        drawn = frame.locator('#view g.tok[data-role="query"] text').all_text_contents()
        verdict = frame.locator("#verification-verdict").text_content()  # in the collapsed provenance
        host_title = page.inner_text("h1")
    finally:
        page.close()
    assert cells == 6 * 12
    assert [t.strip() for t in drawn] == [t for t in result.docs[0].doc.tokens]
    assert verdict == "PASSED"
    assert host_title == "notebook"  # the page's styles and ids stay inside its frame
    assert errors == []


# -- 3. heads, tensors, device -------------------------------------------------------------------------------
def test_heads_equal_head_stats(result: ExtractionResult, minilm: LoadedModel) -> None:
    expected = HeadStats(6, 12, False, minilm.tokenizer.cls_token, minilm.tokenizer.sep_token)
    for doc in result.docs:
        expected.update(doc)
    pd.testing.assert_frame_equal(result.heads(), expected.table())
    one = HeadStats(6, 12, False, minilm.tokenizer.cls_token, minilm.tokenizer.sep_token)
    one.update(result.docs[1])
    pd.testing.assert_frame_equal(result.heads([1]), one.table())
    assert not result.heads()["cls"].isna().any()  # the [CLS] token reached the metrics


def test_attention_tensor_is_every_head_stacked(
    result: ExtractionResult, minilm: LoadedModel, sentences: list[str]
) -> None:
    attention = result.attention(1)
    n = int((result.tokens()["doc_id"] == 1).sum())
    assert attention.shape == (6, 12, n, n)
    torch.testing.assert_close(attention, hf_attentions(minilm, sentences[1]), rtol=1e-5, atol=1e-5)
    for layer in range(6):
        for head in range(12):
            assert torch.equal(attention[layer, head], result.pattern(1, layer, head))
    assert torch.equal(result.tensor(1, "value_norm")[2, 3], result.pattern(1, 2, 3, "value_norm"))
    assert result.tensor(1, "rollout").shape == (6, n, n)
    with pytest.raises(ArgumentError, match=r"measure='alti' was not computed"):
        result.tensor(0, "alti")
    with pytest.raises(ArgumentError, match=r"doc=2 is not a document"):
        result.attention(2)


# -- 4. a Hugging Face model in memory ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[tf.PreTrainedModel, Any, Path]:
    """A tiny random BERT with a classification head, built in memory (default sdpa attention), and the same
    model written to disk with save_pretrained."""
    tokenizer = tf.AutoTokenizer.from_pretrained(bundled_model_path("minilm"), use_fast=True)
    config = _tiny_config("bert", tokenizer, {"num_labels": 3})
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(config)
    with torch.no_grad():  # non-trivial biases and norm gains, as conftest's tiny models
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, INIT_RANGE)
            elif parameter.ndim == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.train()  # as after fine-tuning: dropout on
    folder = tmp_path_factory.mktemp("tiny-classifier")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer, folder


def test_in_memory_model_equals_disk_loaded(
    tiny_classifier: tuple[tf.PreTrainedModel, Any, Path], sentences: list[str]
) -> None:
    model, tokenizer, folder = tiny_classifier
    assert model.config._attn_implementation != "eager"
    tokenizer.padding_side = "left"  # the caller's setting; extraction pads its own copy on the right
    measures = ["attention", "value_norm", "rollout", "layer_value_norm"]
    from_disk = extract(sentences, model=str(folder), measures=measures, device="cpu")
    in_memory = extract(sentences, model=model, tokenizer=tokenizer, measures=measures)
    assert model.config._attn_implementation == "eager" and not model.training
    assert tokenizer.padding_side == "left"
    assert in_memory.report is not None and in_memory.report.passed
    assert in_memory.provenance["model_class"] == from_disk.provenance["model_class"] == "BertModel"
    assert in_memory.provenance["device"] == from_disk.provenance["device"] == "cpu"
    assert in_memory.provenance["config"]["model_type"] == "bert"
    for doc in range(len(sentences)):
        for measure in measures:
            assert torch.equal(in_memory.tensor(doc, measure), from_disk.tensor(doc, measure)), (doc, measure)
    assert "in memory" in repr(in_memory)


def test_in_memory_model_needs_its_tokenizer(tiny_classifier: tuple[tf.PreTrainedModel, Any, Path]) -> None:
    model, _, _ = tiny_classifier
    with pytest.raises(ArgumentError, match=r"pass its tokenizer too, tokenizer="):
        extract("a text", model=model)


# -- 5. errors name Python arguments ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"model": "no-such-model"}, 'model="minilm"'),
        ({"model": 3}, "model=3 is not a model"),
        ({"measures": ["bogus"]}, "measures=['bogus'] has unknown measure(s) bogus; choose from: attention"),
        ({"measures": []}, "measures=[] is empty"),
        ({"level": "sentence"}, "level='sentence' is not supported"),
        ({"batch_size": 0}, "batch_size=0 must be a whole number"),
        ({"top_k": 0}, "top_k=0 must be a whole number"),
        ({"atol": -1.0}, "atol=-1.0 must be a positive tolerance"),
        ({"model": "minilm", "tokenizer": object()}, "tokenizer= goes with a model in memory"),
    ],
)
def test_errors_name_python_arguments(arguments: dict[str, Any], expected: str) -> None:
    with pytest.raises(UserError) as caught:
        extract(["a text"], **arguments)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message and not re.search(r"--[a-z]", message), message


def test_loaded_model_on_another_device_is_refused(minilm: LoadedModel) -> None:
    with pytest.raises(ArgumentError, match=r"LoadedModel on cpu, not device='meta'"):
        extract("a text", model=minilm, device="meta")


def test_measures_as_one_string(minilm: LoadedModel) -> None:
    result = extract("Cats sleep.", model=minilm, measures="attention, rollout")
    assert list(result.docs[0].head_measures) == ["attention"] and list(result.docs[0].layer_measures) == ["rollout"]
