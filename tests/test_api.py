"""The notebook API: `extract(...)` → `ExtractionResult` (associations, pattern, tokens, verification)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import torch

from extractor import ExtractionResult, extract
from extractor.core.models import LoadedModel

IT_SENTENCE = "The animal didn't cross the street because it was too tired."


@pytest.fixture(scope="module")
def result(minilm: LoadedModel, sentences: list[str]) -> ExtractionResult:
    return extract(sentences[:2], model=minilm)


def hf_attentions(loaded: LoadedModel, text: str) -> tuple[torch.Tensor, ...]:
    inputs = loaded.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**inputs, output_attentions=True).attentions


def test_extract_returns_everything(result: ExtractionResult, sentences: list[str]) -> None:
    assert result.texts == sentences[:2]
    assert len(result.docs) == 2
    assert result.causal is False
    assert result.provenance["model"] == "minilm"
    associations = result.associations()
    assert isinstance(associations, pd.DataFrame)
    for name in (
        "doc_id",
        "layer",
        "head",
        "query_pos",
        "key_pos",
        "attention",
        "value_norm",
        "layer_value_norm",
        "rollout",
        "query_token",
        "key_token",
    ):
        assert name in associations.columns
    n0, n1 = (len(result.tokens().query("doc_id == @i")) for i in (0, 1))
    assert len(associations) == sum(6 * 12 * n * n + 6 * n * n for n in (n0, n1))
    verification = result.verification()
    assert len(verification) == 6 * 12
    assert verification["passed"].all()
    assert (verification["pattern_max_abs_err"] <= 1e-5).all() and (verification["z_max_abs_err"] <= 1e-5).all()


def test_pattern_is_hugging_face_attention(result: ExtractionResult, minilm: LoadedModel, sentences: list[str]) -> None:
    hf = hf_attentions(minilm, sentences[1])
    for layer, head in ((0, 0), (2, 11), (5, 7)):
        pattern = result.pattern(1, layer, head)
        assert pattern.shape == hf[layer][0, head].shape
        torch.testing.assert_close(pattern, hf[layer][0, head], rtol=0, atol=1e-5)


def test_tokens_frame(result: ExtractionResult, minilm: LoadedModel, sentences: list[str]) -> None:
    tokens = result.tokens()
    doc1 = tokens[tokens["doc_id"] == 1]
    assert doc1["token"].tolist() == ["[CLS]", *minilm.tokenizer.tokenize(sentences[1]), "[SEP]"]


def test_filter_by_layer_and_head(result: ExtractionResult) -> None:
    frame = result.associations(layer=2, head=5)
    assert set(frame["layer"]) == {2} and set(frame["head"]) == {5}
    sizes = result.tokens().groupby("doc_id").size()
    assert len(frame) == sum(n * n for n in sizes)
    only_doc = result.associations(layer=3, doc=1)
    assert set(only_doc["doc_id"]) == {1}
    # head rows (12 heads) and the layer-measure rows (head = -1) of layer 3 of doc 1
    assert len(only_doc) == 13 * sizes[1] ** 2


def test_filter_by_token(result: ExtractionResult, minilm: LoadedModel) -> None:
    frame = result.associations(token="it")
    assert len(frame) > 0
    assert set(frame["query_token"]) == {"it"}
    assert set(frame["doc_id"]) == {1}
    n = int((result.tokens()["doc_id"] == 1).sum())
    assert len(frame) == 6 * 12 * n + 6 * n  # one row per key, for every head and every layer row
    # The 'it' row of layer 2 head 11 is the row of Hugging Face's attention matrix.
    hf = hf_attentions(minilm, IT_SENTENCE)[2][0, 11]
    it_pos = int(frame["query_pos"].iloc[0])
    row = frame[(frame["layer"] == 2) & (frame["head"] == 11)].sort_values("key_pos")
    torch.testing.assert_close(torch.tensor(row["attention"].to_numpy()), hf[it_pos], rtol=0, atol=1e-5)
    assert row["key_token"].tolist() == result.tokens().query("doc_id == 1")["token"].tolist()


def test_word_level_labels(minilm: LoadedModel) -> None:
    result = extract(["The councilmen refused."], model=minilm, measures=("attention",), level="word")
    words = result.words()
    assert "councilmen" in words["word"].tolist()
    frame = result.associations(token="councilmen", layer=0, head=0)
    assert len(frame) == len(words)
    assert frame["attention"].sum() == pytest.approx(1.0, abs=1e-5)


def test_top_k_limits_rows(minilm: LoadedModel, sentences: list[str]) -> None:
    result = extract(sentences[:1], model=minilm, measures=("attention",), top_k=2)
    frame = result.associations()
    n = len(result.tokens())
    assert len(frame) == 6 * 12 * n * 2
    assert "kept_mass" in frame.columns


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_save_reads_back(result: ExtractionResult, tmp_path: Path, fmt: str) -> None:
    out = result.save(tmp_path / "out", format=fmt)
    expected = {
        "associations": len(result.associations()),
        "tokens": len(result.tokens()),
        "verification": len(result.verification()),
    }
    for name, rows in expected.items():
        path = out / f"{name}.{fmt}"
        assert path.is_file(), path
        table = pq.read_table(path) if fmt == "parquet" else pa_csv.read_csv(path)
        assert table.num_rows == rows
    if fmt == "parquet":
        back = pq.read_table(out / "associations.parquet").to_pandas()
        original = result.association_arrow().to_pandas()
        pd.testing.assert_frame_equal(back, original)


def test_save_words_at_word_level(minilm: LoadedModel, tmp_path: Path) -> None:
    result = extract(["The councilmen refused."], model=minilm, measures=("attention",), level="word")
    out = result.save(tmp_path)
    assert pq.read_table(out / "words.parquet").num_rows == len(result.words())


def test_extract_tiny_causal_model(tiny_loaded) -> None:
    loaded = tiny_loaded("gpt2")
    result = extract(IT_SENTENCE, model=loaded)
    assert result.causal is True
    frame = result.associations()
    assert not (frame["key_pos"] > frame["query_pos"]).any()
    assert result.verification()["passed"].all()


def test_extract_loads_a_model_by_path(tiny_model_dir) -> None:
    result = extract(["a short text"], model=str(tiny_model_dir("distilbert")), atol=1e-4)
    assert result.provenance["model_type"] == "distilbert"
    assert result.provenance["tolerance"] == 1e-4
    assert result.report is not None and result.report.atol == 1e-4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"level": "sentence"}, "level"),
        ({"measures": ("attention", "saliency")}, "saliency"),
        ({"texts": ""}, "non-whitespace"),
        ({"texts": ["fine", "   "]}, "non-whitespace"),
        ({"texts": []}, "non-whitespace"),
    ],
)
def test_bad_arguments_raise_value_error(minilm: LoadedModel, kwargs: dict, match: str) -> None:
    arguments = {"texts": "I love pets.", "model": minilm, **kwargs}
    with pytest.raises(ValueError, match=match):
        extract(**arguments)


def test_bad_save_format_and_disabled_verification(minilm: LoadedModel, tmp_path: Path) -> None:
    result = extract("I love pets.", model=minilm, measures=("attention",), verify=False)
    assert result.report is None
    with pytest.raises(ValueError, match="verify=False"):
        result.verification()
    with pytest.raises(ValueError, match="parquet or csv"):
        result.save(tmp_path, format="xlsx")


def test_gpt2_words_have_no_leading_space_and_token_filter_strips_markers(tiny_loaded) -> None:
    # GPT-2's byte-level offsets include the space before a word ("Ġanimal" spans " animal").
    loaded = tiny_loaded("gpt2")
    words = extract(IT_SENTENCE, model=loaded, level="word")
    assert "animal" in list(words.words()["word"])
    assert not any(w != w.strip() for w in words.words()["word"])
    assert len(words.associations(token="animal")) > 0
    tokens = extract(IT_SENTENCE, model=loaded)
    marked = next(t for t in tokens.tokens()["token"] if t.startswith("Ġ") and len(t) > 1)
    labels = set(tokens.associations(token=marked[1:])["query_token"])
    assert marked in labels and all(label.replace("Ġ", "") == marked[1:] for label in labels)
