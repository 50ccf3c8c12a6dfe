"""What the user gave us: their ids and labels carried into documents.parquet, sentence pairs tokenised as the
tokenizer pairs them, and words as the user typed them (whitespace-delimited)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from extractor.api import ArgumentError, extract
from extractor.core.encode import encode, tokenize
from extractor.core.models import LoadedModel
from extractor.corpus.config import validate_config
from extractor.corpus.manifest import check_resumable
from extractor.corpus.run_folder import RunFolder
from extractor.corpus.tables import words_table
from extractor.errors import UserError
from tests.test_run import NO_EXTRAS, invoke, run_ok, table

SENTENCE = "I didn't see the cats."
PAIRS = [("Is it raining outside?", "No, it isn't."), ("The cat sat.", "It was tired of standing all day.")]


# --- words: what was typed between spaces --------------------------------------------------------------------


def test_words_are_whitespace_chunks(minilm: LoadedModel) -> None:
    """BERT pre-tokenises "didn't" into didn ' t; the words table has the text's own whitespace chunks."""
    doc = tokenize(minilm.tokenizer, [SENTENCE])[0]
    words = words_table(0, doc, SENTENCE).to_pandas()
    assert words["word"].tolist() == ["[CLS]", *SENTENCE.split(), "[SEP]"]
    for row in words[~words["is_special"]].itertuples():
        assert SENTENCE[row.char_start : row.char_end] == row.word
    pieces = words.set_index("word")["n_tokens"]
    assert pieces["didn't"] == len(minilm.tokenizer.tokenize("didn't")) > 1


def test_byte_level_words_are_whitespace_chunks(tiny_model_dir: Callable[..., Path]) -> None:
    """Byte-level BPE spans include the space before a word; whitespace-only tokens join the next word."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))
    text = "The  cat didn't\nsit, said  Bob. "
    doc = tokenize(tokenizer, [text])[0]
    assert words_table(0, doc, text).to_pandas()["word"].tolist() == text.split()
    assert doc.word_index == sorted(doc.word_index)  # each word's pieces are consecutive


def test_word_level_rows_still_sum_to_one(minilm: LoadedModel) -> None:
    """Clark et al.: mean over query pieces, sum over key pieces keeps every word row a distribution."""
    result = extract(SENTENCE, model=minilm, level="word", measures="attention")
    attention = result.attention(0)  # [layer, head, word, word]
    assert attention.shape[-1] == len(SENTENCE.split()) + 2
    torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]), rtol=1e-5, atol=1e-5)


def test_explain_finds_words_as_typed() -> None:
    result = invoke(["explain", "--text", SENTENCE, "--level", "word", "--token", "didn't", "--layer", "0",
                     "--head", "0"])
    assert result.exit_code == 0, result.output
    assert "row 'didn't' (position 2)" in result.output
    # punctuation at a word's ends does not stop a match: "cats" finds the word "cats."
    result = invoke(["explain", "--text", SENTENCE, "--level", "word", "--token", "cats", "--layer", "0",
                     "--head", "0"])
    assert result.exit_code == 0, result.output
    assert "row 'cats.' (position 5)" in result.output


# --- sentence pairs ------------------------------------------------------------------------------------------


def test_pairs_tokenise_as_the_tokenizer_pairs_texts(minilm: LoadedModel) -> None:
    batch = encode(minilm.tokenizer, [SENTENCE, *PAIRS])
    for row, text in enumerate([SENTENCE, *PAIRS]):
        expected = minilm.tokenizer(*((text,) if isinstance(text, str) else text))
        n = len(expected["input_ids"])
        assert batch.model_inputs["input_ids"][row, :n].tolist() == expected["input_ids"]
        assert batch.model_inputs["token_type_ids"][row, :n].tolist() == expected["token_type_ids"]
        doc = batch.docs[row]
        # segments are the tokenizer's sequence ids; a special takes the segment of the text before it
        for segment, sequence in zip(doc.token_segments, expected.sequence_ids(), strict=True):
            assert sequence is None or segment == sequence
        texts = (text,) if isinstance(text, str) else text
        for token, special, (start, end), segment in zip(doc.tokens, doc.is_special, doc.offsets,
                                                        doc.token_segments, strict=True):
            if not special:  # char spans index into their own segment's text
                assert texts[segment][start:end].lower() == token.removeprefix("##")


def test_pairs_through_extract_verify_and_match_hugging_face(minilm: LoadedModel) -> None:
    result = extract([SENTENCE, *PAIRS], model=minilm, measures="attention")
    assert result.report is not None and result.report.passed
    for index, pair in enumerate(PAIRS, start=1):
        inputs = minilm.tokenizer(*pair, return_tensors="pt")
        with torch.no_grad():
            hf = torch.stack(minilm.model(**inputs, output_attentions=True).attentions)[:, 0]  # [layer, head, q, k]
        torch.testing.assert_close(result.attention(index), hf, rtol=1e-5, atol=1e-5)
        tokens = result.tokens()
        segments = tokens[tokens["doc_id"] == index]["segment"].tolist()
        assert segments == inputs["token_type_ids"][0].tolist()  # BERT: segments are its token types
    # without the token types, the pair's attention differs: they reach the model
    inputs = minilm.tokenizer(*PAIRS[0], return_tensors="pt")
    del inputs["token_type_ids"]
    with torch.no_grad():
        untyped = torch.stack(minilm.model(**inputs, output_attentions=True).attentions)[:, 0]
    assert not torch.allclose(result.attention(1), untyped, atol=1e-4)


def test_pair_words_index_their_own_text(minilm: LoadedModel) -> None:
    result = extract([PAIRS[0]], model=minilm, measures="attention", level="word")
    words = result.words()
    first, second = PAIRS[0]
    assert words["word"].tolist() == ["[CLS]", *first.split(), "[SEP]", *second.split(), "[SEP]"]
    for row in words[~words["is_special"]].itertuples():
        assert (first, second)[row.segment][row.char_start : row.char_end] == row.word


def test_decoder_refuses_pairs(tiny_model_dir: Callable[..., Path]) -> None:
    with pytest.raises(ArgumentError, match="decoder.*join the two texts"):
        extract([("A cat.", "A dog.")], model=str(tiny_model_dir("gpt2")))


@pytest.mark.parametrize("item", [("only one",), ("a", "b", "c"), ("a", "  "), ("a", 3)])
def test_bad_pairs_are_refused(minilm: LoadedModel, item: tuple) -> None:
    with pytest.raises(ArgumentError, match="text_pair"):
        extract(["fine", item], model=minilm)


# --- corpus runs: ids, labels and pairs ----------------------------------------------------------------------


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


RECORDS = [
    {"id": "q1", "label": "entail", "premise": "A man plays a guitar.", "hypothesis": "Someone makes music."},
    {"id": "q2", "label": "contradict", "premise": "The cat sleeps.", "hypothesis": "The cat runs around."},
    {"id": 3, "premise": "Dogs bark.", "hypothesis": "Animals make sounds."},  # no label, a numeric id
    {"id": "q4", "label": "entail", "premise": "No pair here."},  # no hypothesis: skipped
]
PAIR_FLAGS = ["--text-field", "premise", "--text-pair-field", "hypothesis", "--id-field", "id",
              "--keep-fields", "label"]


def test_jsonl_pairs_ids_and_labels_reach_the_tables(tmp_path: Path, tiny_model_dir: Callable[..., Path]) -> None:
    corpus = write_jsonl(tmp_path / "nli.jsonl", RECORDS)
    out = tmp_path / "out"
    run_ok(str(tiny_model_dir("bert")), corpus, out, *PAIR_FLAGS, "--level", "word")
    documents = table(out, "documents").sort_values("doc_id")
    assert documents["source_id"].tolist() == ["q1", "q2", "3", "q4"]
    labels = pq.read_table(out / "documents.parquet").sort_by("doc_id").column("label").to_pylist()
    assert labels == ["entail", "contradict", None, "entail"]  # a record without the field keeps a null
    assert documents["text_pair"].tolist()[:3] == [r["hypothesis"] for r in RECORDS[:3]]
    assert documents["status"].tolist() == ["ok", "ok", "ok", "skipped"]
    assert "hypothesis" in documents["reason"].iloc[3]
    tokens = table(out, "tokens")
    for doc_id in range(3):
        record = RECORDS[doc_id]
        rows = tokens[tokens["doc_id"] == doc_id].sort_values("position")
        from transformers import AutoTokenizer

        expected = AutoTokenizer.from_pretrained(tiny_model_dir("bert"))(record["premise"], record["hypothesis"])
        assert rows["segment"].tolist() == expected["token_type_ids"]
    words = table(out, "words")
    second = words[(words["doc_id"] == 0) & (words["segment"] == 1) & ~words["is_special"]]
    assert second["word"].tolist() == RECORDS[0]["hypothesis"].split()
    # the run folder labels a pair's second-text words from that text
    labels, _ = RunFolder(out).position_labels([0])[0]
    assert labels == ["[CLS]", *RECORDS[0]["premise"].split(), "[SEP]", *RECORDS[0]["hypothesis"].split(), "[SEP]"]
    # heads grouped by the user's label in one query
    query = ("SELECT d.label, count(*) AS n FROM documents d JOIN tokens t USING (doc_id) "
             "WHERE t.segment = 1 GROUP BY d.label ORDER BY d.label NULLS LAST")
    result = invoke(["query", str(out), query, "--format", "csv"])
    assert result.exit_code == 0, result.output
    counts = tokens[tokens["segment"] == 1].merge(documents, on="doc_id").groupby("label", dropna=False).size()
    assert f"contradict,{counts['contradict']}" in result.output
    assert f"entail,{counts['entail']}" in result.output


def test_decoder_run_refuses_pairs(tmp_path: Path, tiny_model_dir: Callable[..., Path]) -> None:
    corpus = write_jsonl(tmp_path / "nli.jsonl", RECORDS)
    result = invoke(["run", "--model", str(tiny_model_dir("gpt2")), "-i", str(corpus), "-o", str(tmp_path / "o"),
                     "--quiet", *NO_EXTRAS, *PAIR_FLAGS])
    assert result.exit_code == 2
    assert "decoder" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("suffix", ["csv", "tsv", "parquet"])
def test_delimited_and_parquet_keep_ids_and_labels(tmp_path: Path, tiny_model_dir: Callable[..., Path],
                                                   suffix: str) -> None:
    import pandas as pd

    frame = pd.DataFrame({"text": ["A man plays.", "The cat sleeps."], "pair": ["Music.", "Rest."],
                          "uid": ["a", "b"], "topic": ["music", "pets"]})
    corpus = tmp_path / f"c.{suffix}"
    if suffix == "parquet":
        frame.to_parquet(corpus)
    else:
        frame.to_csv(corpus, index=False, sep="," if suffix == "csv" else "\t")
    out = tmp_path / "out"
    run_ok(str(tiny_model_dir("bert")), corpus, out, "--text-pair-field", "pair", "--id-field", "uid",
           "--keep-fields", "topic")
    documents = table(out, "documents").sort_values("doc_id")
    assert documents["source_id"].tolist() == ["a", "b"]
    assert documents["topic"].tolist() == ["music", "pets"]
    assert documents["text_pair"].tolist() == ["Music.", "Rest."]
    assert set(table(out, "tokens")["segment"]) == {0, 1}


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_missing_column_is_one_line_naming_file_and_column(tmp_path: Path, tiny_model_dir: Callable[..., Path],
                                                           suffix: str) -> None:
    import pandas as pd

    corpus = tmp_path / f"c.{suffix}"
    frame = pd.DataFrame({"text": ["A man plays."], "uid": ["a"]})
    frame.to_parquet(corpus) if suffix == "parquet" else frame.to_csv(corpus, index=False)
    result = invoke(["run", "--model", str(tiny_model_dir("bert")), "-i", str(corpus), "-o", str(tmp_path / "o"),
                     "--quiet", *NO_EXTRAS, "--id-field", "uid", "--keep-fields", "topic"])
    assert result.exit_code == 2
    assert str(corpus) in result.output and "no column 'topic'" in result.output and "keep_fields" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_plain_text_has_no_fields(tmp_path: Path, tiny_model_dir: Callable[..., Path]) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("A line.\n", encoding="utf-8")
    result = invoke(["run", "--model", str(tiny_model_dir("bert")), "-i", str(corpus), "-o", str(tmp_path / "o"),
                     "--quiet", *NO_EXTRAS, "--id-field", "uid"])
    assert result.exit_code == 2 and "plain text" in result.output and "id_field" in result.output


def test_kept_field_cannot_shadow_a_document_column() -> None:
    with pytest.raises(UserError, match="'text' is already a documents.parquet column"):
        validate_config({"keep_fields": ["text"]})


def test_resume_refuses_other_fields() -> None:
    before = validate_config({"keep_fields": ["label"], "id_field": "id"})
    for change in ({"keep_fields": ["topic"]}, {"id_field": "uid"}, {"text_pair_field": "b"}):
        with pytest.raises(UserError, match=next(iter(change))):
            check_resumable({"config": before.model_dump()}, validate_config({**before.model_dump(), **change}))


def test_resume_of_a_dense_run_in_the_older_layout_is_refused() -> None:
    """Dense parts are matrices now; an interrupted dense run whose manifest does not say so stored one row per
    cell, and mixing the two layouts in one folder would make it unreadable."""
    config = validate_config({"storage": "dense"})
    with pytest.raises(UserError, match="one matrix per row"):
        check_resumable({"config": config.model_dump()}, config)
    check_resumable({"config": config.model_dump(), "dense_layout": "matrices"}, config)  # today's layout resumes
    topk = validate_config({"storage": "topk"})
    check_resumable({"config": topk.model_dump()}, topk)  # other storage modes did not change


def test_kept_values_are_text(tmp_path: Path) -> None:
    from extractor.corpus.readers import RecordKeys, read_documents

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "x y", "n": 3, "tags": ["a", "b"], "flag": None}])
    record = next(read_documents(str(corpus), keys=RecordKeys(keep=("n", "tags", "flag", "absent"))))
    assert record.fields == {"n": "3", "tags": '["a", "b"]', "flag": None, "absent": None}


def test_the_report_shows_both_texts_of_a_pair(tmp_path: Path, tiny_model_dir: Callable[..., Path]) -> None:
    """The report embeds a pair's second text next to its first (its tokens' spans index into it)."""
    from extractor.presentation.report import build_report

    corpus = write_jsonl(tmp_path / "nli.jsonl", RECORDS)
    out = tmp_path / "out"
    run_ok(str(tiny_model_dir("bert")), corpus, out, *PAIR_FLAGS)
    page, _ = build_report(out)
    start = page.index('id="report-docs">') + len('id="report-docs">')
    docs = json.loads(page[start : page.index("</script>", start)])
    shown = {doc["id"]: (doc["text"], doc.get("pair")) for doc in docs}
    assert shown[0] == (RECORDS[0]["premise"], RECORDS[0]["hypothesis"])
    assert all(pair is not None for _, pair in shown.values())
