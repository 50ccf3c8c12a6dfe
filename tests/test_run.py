"""`extractor run` end to end: accounting of every record, long documents, storage modes, verification,
bad inputs, progress output, resume after `kill -9`, and bounded memory.

Most runs use the tiny random BERT from conftest (2 layers × 4 heads, MiniLM's tokenizer) on a few lines, so
that a run takes about a second; one run uses the real bundled MiniLM. Runs go through Typer's runner
(in-process) except the kill/resume and memory checks, which need real processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numba
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner, Result

from extractor.api import run_extraction
from extractor.attribution.measures import MEASURES
from extractor.cli import app
from extractor.core.encode import tokenize, windows
from extractor.core.models import LoadedModel
from extractor.corpus.config import RunConfig
from extractor.corpus.run_folder import open_run

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE = (REPO_ROOT / "data" / "sample.txt").read_text(encoding="utf-8").splitlines()
# Figures and the report are other commands' business; keep these runs to the tables.
NO_EXTRAS = ["--set", "plots=false", "--set", "report=false"]
KEYS = ["doc_id", "layer", "head", "query_pos", "key_pos"]
LONG = (
    "The animal didn't cross the street because it was too tired, and the city councilmen refused the "
    "demonstrators a permit because they feared violence."
)


def invoke(args: list[str], input: bytes | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, args, input=input, env=env)


def run_ok(
    model: str, corpus: Path | str, out: Path, *extra: str, input: bytes | None = None
) -> dict[str, Any]:
    """A quiet, successful run; returns its manifest."""
    result = invoke(
        ["run", "--model", model, "-i", str(corpus), "-o", str(out), "--quiet", *NO_EXTRAS, *extra],
        input=input,
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stderr == ""  # --quiet: nothing but errors on stderr
    return json.loads((out / "manifest.json").read_text())


def user_error(args: list[str]) -> str:
    """Run the CLI expecting a user error: exit 2, exactly one `error:` line on stderr, no traceback."""
    result = invoke(args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def table(out: Path, name: str) -> pd.DataFrame:
    return pq.read_table(out / f"{name}.parquet").to_pandas()


def associations(out: Path) -> pd.DataFrame:
    """Every association row of the run (the `associations` view users query), sorted by the key columns."""
    data = open_run(out).sql("SELECT * FROM associations").df()
    return data.sort_values(KEYS + (["window"] if "window" in data.columns else [])).reset_index(drop=True)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Callable[..., Path]) -> str:
    """The tiny random BERT (2 layers × 4 heads) as a save_pretrained folder."""
    return str(tiny_model_dir("bert"))


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """`--set threads=1` in-process changes torch's global setting: put it back afterwards."""
    threads, kernel_threads = torch.get_num_threads(), numba.get_num_threads()
    yield
    torch.set_num_threads(threads)
    numba.set_num_threads(kernel_threads)


# -- every record accounted for -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def messy_run(tiny: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A .txt with BOM, CRLF, invalid bytes, empty/blank lines and long lines, run with --max-length 12."""
    folder = tmp_path_factory.mktemp("messy")
    corpus = folder / "corpus.txt"
    lines = [
        b"\xef\xbb\xbfI love pets.\r\n",  # 1 ok (BOM, CRLF)
        LONG.encode() + b"\r\n",  # 2 truncated
        b"\xc0\xaf broken\n",  # 3 invalid UTF-8
        b"\n",  # 4 empty
        b" \t\n",  # 5 whitespace only
        SAMPLE[1].encode() + b"\n",  # 6 truncated (16 tokens)
        b"Cats.\n",  # 7 ok
        b"\r\n",  # 8 empty (CRLF only)
        "Ünïcode ✓ fine.".encode(),  # 9 ok, no final newline
    ]
    corpus.write_bytes(b"".join(lines))
    out = folder / "out"
    manifest = run_ok(tiny, corpus, out, "--max-length", "12", "--batch-size", "2", "--set", "buffer_size=3")
    return out, manifest


def test_every_input_line_appears_once_with_its_status(messy_run: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = messy_run
    docs = table(out, "documents")
    assert docs["doc_id"].tolist() == list(range(9))
    assert docs["line"].tolist() == list(range(1, 10))
    assert docs["status"].tolist() == "ok truncated skipped skipped skipped truncated ok skipped ok".split()
    skipped = docs[docs["status"] == "skipped"]
    assert skipped["reason"].tolist() == ["invalid UTF-8", "empty", "empty", "empty"]
    assert (skipped["n_tokens"] == 0).all()
    truncated = docs[docs["status"] == "truncated"]
    assert (truncated["n_tokens"] == 12).all()
    assert truncated["reason"].str.fullmatch(r"truncated from \d+ tokens").all()
    assert docs.loc[docs["status"] == "ok", "reason"].isna().all()
    assert manifest["status"] == "complete"
    counts = manifest["counts"]
    assert (counts["records"], counts["ok"], counts["truncated"], counts["skipped"]) == (9, 3, 2, 4)
    assert counts["association_rows"] == len(associations(out))
    assert counts["tokens_processed"] == int(docs["n_tokens"].sum())
    assert manifest["config"]["max_length"] == 12 and manifest["config"]["batch_size"] == 2
    assert manifest["provenance"]["n_layers"] == 2 and manifest["provenance"]["n_heads"] == 4
    assert {"started", "finished", "seconds", "model_load_seconds"} <= set(manifest["timings"])
    assert not (out / "_parts").exists()  # parts folded into the final files


def test_tokens_match_documents_and_truncation(messy_run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = messy_run
    docs, tokens = table(out, "documents"), table(out, "tokens")
    assert not tokens.duplicated(["doc_id", "position"]).any()
    per_doc = tokens.groupby("doc_id")["position"].agg(["count", "min", "max"])
    kept = docs[docs["status"] != "skipped"].set_index("doc_id")
    assert per_doc.index.tolist() == kept.index.tolist()  # skipped documents have no tokens
    assert (per_doc["count"] == kept["n_tokens"]).all() and (per_doc["min"] == 0).all()
    assert (per_doc["max"] == kept["n_tokens"] - 1).all()
    # a truncated document is its truncation: the closing [SEP] sits at the last position it was given
    last = tokens.loc[tokens.groupby("doc_id")["position"].idxmax()].set_index("doc_id")
    assert (last["token"] == "[SEP]").all()
    assert tokens.loc[(tokens["doc_id"] == 1) & (tokens["position"] == 0), "token"].item() == "[CLS]"


def test_associations_are_trimmed_and_laid_out_by_layer(messy_run: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = messy_run
    docs = table(out, "documents").set_index("doc_id")
    assoc = associations(out)
    assert not assoc.duplicated(KEYS).any()
    n = assoc["doc_id"].map(docs["n_tokens"])
    assert set(assoc["doc_id"]) == set(docs.index[docs["status"] != "skipped"])
    assert (assoc["query_pos"] < n).all() and (assoc["key_pos"] < n).all()  # no padded positions
    assert set(assoc["layer"]) == {0, 1} and set(assoc["head"]) == {-1, 0, 1, 2, 3}
    # top-k (default, k = 8): exactly min(8, n) keys per query row and head
    rows = assoc.groupby(["doc_id", "layer", "head", "query_pos"]).size()
    expected = rows.index.get_level_values("doc_id").map(lambda d: min(8, docs.loc[d, "n_tokens"]))
    assert (rows.to_numpy() == expected.to_numpy()).all()
    # each part holds one row group per layer, so a filter on layer reads one row group
    parts = sorted((out / "associations").glob("part-*.parquet"))
    assert 2 <= len(parts) <= manifest["counts"]["parts"]
    for part in parts:
        meta = pq.ParquetFile(part).metadata
        layer = meta.schema.to_arrow_schema().get_field_index("layer")
        bounds = [
            (meta.row_group(i).column(layer).statistics.min, meta.row_group(i).column(layer).statistics.max)
            for i in range(meta.num_row_groups)
        ]
        assert bounds == [(0, 0), (1, 1)]
        # rows in (layer, head, doc_id) order, as the writer promises (it skips its sort for ordered batches)
        key = pq.read_table(part, columns=["layer", "head", "doc_id"]).to_pandas()
        assert list(key.itertuples(index=False)) == sorted(key.itertuples(index=False))


def test_verification_on_by_default(messy_run: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = messy_run
    verification = table(out, "verification")
    assert len(verification) == 8 and verification["passed"].all()
    assert (verification["n_docs"] == 5).all()  # every readable document was checked
    assert manifest["verification"]["passed"] is True and manifest["verification"]["documents_verified"] == 5


# -- long documents -------------------------------------------------------------------------------------


def test_window_policy_keeps_document_positions(tiny: str, minilm: LoadedModel, tmp_path: Path) -> None:
    corpus = write_lines(tmp_path / "c.txt", ["Short one.", LONG])
    out = tmp_path / "out"
    flags = "--max-length 16 --storage dense --set long_documents=window --set window_stride=4"
    run_ok(tiny, corpus, out, *flags.split())
    docs = table(out, "documents").set_index("doc_id")
    (full,) = tokenize(minilm.tokenizer, [LONG])  # the tiny model shares MiniLM's tokenizer
    n = full.n_tokens
    assert docs["status"].tolist() == ["ok", "ok"]
    assert docs.loc[1, "n_tokens"] == n > 16
    expected = windows(full, 16, 4)
    assert docs["n_windows"].tolist() == [1, len(expected)] and len(expected) > 2
    tokens = table(out, "tokens")
    assert tokens.loc[tokens["doc_id"] == 1, "position"].tolist() == list(range(n))  # each position once
    assert tokens.loc[tokens["doc_id"] == 1, "token"].tolist() == full.tokens
    assoc = associations(out)
    long_rows = assoc[(assoc["doc_id"] == 1) & (assoc["head"] >= 0)]
    assert long_rows["query_pos"].max() == n - 1 > 16  # positions are the document's, not the window's
    for w in expected:
        rows = long_rows[long_rows["window"] == w.window]
        assert len(rows) == 2 * 4 * w.n_tokens**2  # dense: every pair of the window, every head
        assert sorted(set(rows["query_pos"])) == w.positions
    assert sorted(set(long_rows["query_pos"])) == list(range(n))
    # overlapping content positions appear in two windows; the specials in every window
    shared = long_rows.groupby("query_pos")["window"].nunique()
    assert shared[0] == shared[n - 1] == len(expected)
    assert (shared.drop([0, n - 1]) <= 2).all() and (shared == 2).sum() >= 4 * (len(expected) - 1)


# -- storage modes --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def storage_runs(tiny: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three documents stored as: topk k ≥ n (every pair, float32), topk k=3, dense, threshold, summary."""
    folder = tmp_path_factory.mktemp("storage")
    corpus = write_lines(folder / "c.txt", SAMPLE[:3])
    settings = {
        "all": ["--top-k", "64"],
        "all_zstd": ["--top-k", "64", "--set", "compression=zstd"],
        "top3": ["--top-k", "3"],
        "dense": ["--storage", "dense"],
        "threshold": ["--storage", "threshold", "--set", "threshold=0.1"],
        "summary": ["--storage", "summary"],
    }
    outputs = {}
    for name, flags in settings.items():
        outputs[name] = folder / name
        run_ok(tiny, corpus, outputs[name], "--measures", ",".join(MEASURES), *flags)
    return outputs


def test_topk_with_k_at_least_n_keeps_every_pair(storage_runs: dict[str, Path]) -> None:
    ref = associations(storage_runs["all"])
    n = table(storage_runs["all"], "documents").set_index("doc_id")["n_tokens"]
    heads = ref[ref["head"] >= 0]
    assert heads.groupby("doc_id").size().to_dict() == {d: 2 * 4 * n[d] ** 2 for d in n.index}
    row_sums = heads.groupby(["doc_id", "layer", "head", "query_pos"])["attention"].sum()
    assert ((row_sums - 1).abs() < 1e-5).all()  # softmax rows
    assert (ref["kept_mass"].sub(1).abs() < 1e-5).all()


def codecs(run: Path) -> set[tuple[str, str]]:
    """(column, Parquet codec) of every column chunk of the run's association parts, as DuckDB reads them
    (pyarrow names LZ4_RAW "LZ4")."""
    import duckdb

    parts = [str(part) for part in (run / "associations").glob("part-*.parquet")]
    assert parts
    rows = duckdb.sql(f"SELECT DISTINCT path_in_schema, compression FROM parquet_metadata({parts!r})").fetchall()
    return {(column, codec) for column, codec in rows}


def test_association_parts_are_lz4_by_default_and_zstd_on_request(storage_runs: dict[str, Path]) -> None:
    """The codec changes the bytes, not the table: doc_id is left uncompressed (run-length encoded indices)."""
    assert {codec for column, codec in codecs(storage_runs["all"]) if column != "doc_id"} == {"LZ4_RAW"}
    assert {codec for column, codec in codecs(storage_runs["all_zstd"]) if column != "doc_id"} == {"ZSTD"}
    assert {codec for column, codec in codecs(storage_runs["all"]) if column == "doc_id"} == {"UNCOMPRESSED"}
    pd.testing.assert_frame_equal(associations(storage_runs["all_zstd"]), associations(storage_runs["all"]))


def test_dense_is_float16_and_every_pair(storage_runs: dict[str, Path]) -> None:
    dense = associations(storage_runs["dense"])
    schema = ds.dataset(storage_runs["dense"] / "associations").schema  # stored as matrices (corpus.matrices)
    for measure in ("attention", "value_norm", "layer_value_norm", "rollout"):
        assert schema.field(measure).type == pa.list_(pa.float16())
    assert "kept_mass" not in schema.names and schema.field("positions").type == pa.list_(pa.int32())
    n = table(storage_runs["dense"], "documents")["n_tokens"]
    assert ds.dataset(storage_runs["dense"] / "associations").count_rows() == len(n) * (2 * 4 + 2)  # (L·H + L) per doc
    manifest = json.loads((storage_runs["dense"] / "manifest.json").read_text())
    assert manifest["counts"]["association_rows"] == len(dense)  # the long format's rows, as the view shows them
    assert manifest["dense_layout"] == "matrices"  # `--resume` refuses dense runs of the older layout
    ref = associations(storage_runs["all"])
    assert dense[KEYS].equals(ref[KEYS])  # (layers × heads + layers) × n² rows per document
    for measure in ("attention", "rollout"):
        got = dense[measure].astype("float64").fillna(-1).to_numpy()
        want = ref[measure].astype("float64").fillna(-1).to_numpy()
        assert abs(got - want).max() < 2e-3  # float16 rounding only


def test_threshold_keeps_exactly_the_cells_at_or_above_it(storage_runs: dict[str, Path]) -> None:
    kept = associations(storage_runs["threshold"])
    ref = associations(storage_runs["all"])
    heads, layers = ref[ref["head"] >= 0], ref[ref["head"] < 0]
    want = pd.concat([heads[heads["attention"] >= 0.1], layers[layers["rollout"] >= 0.1]])
    assert 0 < len(kept) < len(ref)
    assert kept[KEYS].equals(want.sort_values(KEYS)[KEYS].reset_index(drop=True))
    assert (kept.loc[kept["head"] >= 0, "attention"] >= 0.1).all()
    assert (kept.loc[kept["head"] < 0, "rollout"] >= 0.1).all()


def test_topk_keeps_the_strongest_keys_and_their_mass(storage_runs: dict[str, Path]) -> None:
    top = associations(storage_runs["top3"])
    ref = associations(storage_runs["all"])
    heads = ref[ref["head"] >= 0]
    row = ["doc_id", "layer", "head", "query_pos"]
    strongest = heads.sort_values(row + ["attention"], ascending=[True] * 4 + [False]).groupby(row).head(3)
    top_heads = top[top["head"] >= 0].reset_index(drop=True)
    assert top_heads[KEYS].equals(strongest.sort_values(KEYS)[KEYS].reset_index(drop=True))
    mass = top_heads.groupby(row)["attention"].sum()
    assert ((top_heads.groupby(row)["kept_mass"].first() - mass).abs() < 1e-5).all()


def test_run_folder_reads_its_parts_from_any_folder_name(storage_runs: dict[str, Path], tmp_path: Path) -> None:
    """`RunFolder.associations` scans the parts with DuckDB: a folder whose name holds a quote and spaces reads
    the same rows as the SQL view, in stored order, filtered by document, layer and head."""
    import shutil

    moved = tmp_path / "it's a run's folder"
    shutil.copytree(storage_runs["top3"], moved)
    run = open_run(moved)
    rows = run.associations([0, 2])
    view = run.sql("SELECT * FROM associations WHERE doc_id IN (0, 2)").df()
    assert len(rows) == len(view) > 0 and set(rows["doc_id"]) == {0, 2}
    pd.testing.assert_frame_equal(rows.reset_index(drop=True), view[rows.columns].reset_index(drop=True),
                                  check_dtype=False)
    one_head = run.associations([2], layer=1, head=3)
    assert len(one_head) and set(zip(one_head["layer"], one_head["head"], strict=True)) == {(1, 3)}
    assert run.associations([]).empty and (run.associations([0], heads_only=True)["head"] >= 0).all()


def test_part_states_round_trip_through_numpy_and_keep_odd_dtypes() -> None:
    """A part's accumulators are written with tensors as NumPy arrays (`state_bytes`) and read back by plain
    pickle as tensors of the same dtype and values; bfloat16, which NumPy lacks, keeps torch's pickling."""
    import pickle

    from extractor.corpus.storage import state_bytes
    from extractor.heads.metrics import HeadStats

    stats = HeadStats(2, 3, False, "[CLS]", "[SEP]")
    stats.totals["entropy"] += torch.arange(6, dtype=torch.float64).view(2, 3) / 7
    state = {"heads": stats, "odd": torch.tensor([1.5, -2.25], dtype=torch.bfloat16), "n_tokens": 12}
    loaded = pickle.loads(state_bytes(state))
    assert loaded["n_tokens"] == 12
    for name, tensor in stats.totals.items():
        assert torch.equal(loaded["heads"].totals[name], tensor) and loaded["heads"].totals[name].dtype == torch.float64
    pd.testing.assert_frame_equal(loaded["heads"].table(), stats.table())
    assert loaded["odd"].dtype == torch.bfloat16 and torch.equal(loaded["odd"], state["odd"])


def test_summary_writes_no_pair_tables(storage_runs: dict[str, Path]) -> None:
    out = storage_runs["summary"]
    assert list((out / "associations").glob("*.parquet")) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["association_rows"] == 0
    assert len(table(out, "documents")) == 3 and len(table(out, "tokens")) > 0
    assert table(out, "verification")["passed"].all()


def test_word_level_positions_are_words(tiny: str, tmp_path: Path) -> None:
    corpus = write_lines(tmp_path / "c.txt", ["Unbelievably, the councilmen refused.", "Cats."])
    out = tmp_path / "out"
    run_ok(tiny, corpus, out, "--level", "word", "--top-k", "64")
    words = table(out, "words")
    assoc = associations(out)
    n_words = words.groupby("doc_id").size()
    assert (assoc["query_pos"] < assoc["doc_id"].map(n_words)).all()
    heads = assoc[assoc["head"] >= 0]
    assert len(heads) == sum(2 * 4 * n**2 for n in n_words)
    sums = heads.groupby(["doc_id", "layer", "head", "query_pos"])["attention"].sum()
    assert ((sums - 1).abs() < 1e-5).all()  # sum over key pieces keeps rows summing to 1
    assert "Unbelievably," in words["word"].tolist()  # a word is what was typed between spaces
    # per-head metrics and head similarity are token-level statistics whatever level the tables are stored at
    run_ok(tiny, corpus, tmp_path / "tokens", "--top-k", "64")
    for name in ("heads", "head_similarity"):
        pd.testing.assert_frame_equal(table(out, name), table(tmp_path / "tokens", name))


# -- verification settings ------------------------------------------------------------------------------


def test_verify_off_and_every_n(tiny: str, tmp_path: Path) -> None:
    corpus = write_lines(tmp_path / "c.txt", SAMPLE[:5])
    off = run_ok(tiny, corpus, tmp_path / "off", "--verify", "off")
    assert not (tmp_path / "off" / "verification.parquet").exists()
    assert off["verification"] == {"passed": None, "note": "verification was off"}
    every = run_ok(tiny, corpus, tmp_path / "every", "--verify", "every:2", "--batch-size", "1")
    assert every["verification"]["documents_verified"] == 3  # batches 0, 2 and 4 of 5
    assert table(tmp_path / "every", "verification")["n_docs"].eq(3).all()


# -- input formats through the CLI ----------------------------------------------------------------------


def write_corpus(folder: Path, fmt: str) -> Path:
    """Four records: ok, empty, ok (spanning two lines in csv/tsv), ok; the text under 'body'."""
    texts = ["First document.", "", "Second\ndocument.", "Third one."]
    if fmt == "jsonl":
        return write_lines(folder / "c.jsonl", [json.dumps({"body": t, "n": i}) for i, t in enumerate(texts)])
    if fmt == "parquet":
        pq.write_table(pa.table({"n": [0, 1, 2, 3], "body": texts}), folder / "c.parquet")
        return folder / "c.parquet"
    d = "," if fmt == "csv" else "\t"
    quoted = [t if "\n" not in t else f'"{t}"' for t in texts]
    return write_lines(folder / f"c.{fmt}", [f"n{d}body", *(f"{i}{d}{t}" for i, t in enumerate(quoted))])


@pytest.mark.parametrize(
    "fmt, lines",
    [("jsonl", [1, 2, 3, 4]), ("csv", [2, 3, 4, 6]), ("tsv", [2, 3, 4, 6]), ("parquet", [1, 2, 3, 4])],
)
def test_formats_end_to_end(tiny: str, tmp_path: Path, fmt: str, lines: list[int]) -> None:
    corpus = write_corpus(tmp_path, fmt)
    option = "text_field" if fmt == "jsonl" else "text_column"
    run_ok(tiny, corpus, tmp_path / "out", "--set", f"{option}=body")
    docs = table(tmp_path / "out", "documents")
    assert docs["doc_id"].tolist() == [0, 1, 2, 3]
    assert docs["line"].tolist() == lines
    assert docs["status"].tolist() == ["ok", "skipped", "ok", "ok"]
    assert set(docs["source"]) == {str(corpus)}


def test_stdin(tiny: str, tmp_path: Path) -> None:
    manifest = run_ok(
        tiny, "-", tmp_path / "out", "--limit", "3", input=b"\xef\xbb\xbfOne.\r\n\r\nTwo.\r\nThree.\n"
    )
    docs = table(tmp_path / "out", "documents")
    assert docs["source"].tolist() == ["<stdin>"] * 3
    assert docs["status"].tolist() == ["ok", "skipped", "ok"]  # --limit counts records, skipped ones included
    assert manifest["counts"]["records"] == 3


# -- bad inputs: one line, exit 2 -----------------------------------------------------------------------


def test_missing_input_file(tiny: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    line = user_error(["run", "--model", tiny, "-i", str(missing), "-o", str(tmp_path / "out"), *NO_EXTRAS])
    assert line == f"error: input file '{missing}' does not exist"
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("name, content", [("empty.txt", b""), ("header-only.csv", b"text\r\n")])
def test_input_without_records(tiny: str, tmp_path: Path, name: str, content: bytes) -> None:
    corpus = tmp_path / name
    corpus.write_bytes(content)
    line = user_error(["run", "--model", tiny, "-i", str(corpus), "-o", str(tmp_path / "out"), *NO_EXTRAS])
    assert line == f"error: input '{corpus}' has no records"
    assert not (tmp_path / "out").exists()


def test_missing_jsonl_field(tiny: str, tmp_path: Path) -> None:
    corpus = write_lines(tmp_path / "c.jsonl", [json.dumps({"body": "x"})])
    line = user_error(["run", "--model", tiny, "-i", str(corpus), "-o", str(tmp_path / "out"), *NO_EXTRAS])
    assert line == f"error: {corpus} line 1: no field 'text' (fields: body); set text_field"
    assert not (tmp_path / "out").exists()


def test_missing_csv_column(tiny: str, tmp_path: Path) -> None:
    corpus = write_lines(tmp_path / "c.csv", ["id,body", "1,x"])
    args = ["run", "--model", tiny, "-i", str(corpus), "-o", str(tmp_path / "out"), *NO_EXTRAS]
    line = user_error([*args, "--set", "text_column=content"])
    assert line == f"error: {corpus} line 1: no column 'content' (columns: id, body); set text_column"


def test_unwritable_output_folder(tiny: str, tmp_path: Path) -> None:
    corpus = write_lines(tmp_path / "c.txt", ["x"])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # a path under a regular file cannot be created, even by root (chmod would not stop root)
    line = user_error(["run", "--model", tiny, "-i", str(corpus), "-o", str(blocker / "sub"), *NO_EXTRAS])
    assert line.startswith(f"error: output folder '{blocker / 'sub'}' is not writable")
    line = user_error(["run", "--model", tiny, "-i", str(corpus), "-o", str(blocker), *NO_EXTRAS])
    assert line == f"error: output '{blocker}' exists and is not a folder"


def test_unknown_model_is_one_line_and_the_same_output_can_be_used_again(tiny: str, tmp_path: Path) -> None:
    corpus = write_lines(tmp_path / "c.txt", ["x"])
    out = tmp_path / "out"
    line = user_error(["run", "--model", str(tmp_path / "no-model"), "-i", str(corpus), "-o", str(out)])
    assert "no-model" in line
    run_ok(tiny, corpus, out)  # the failed run left nothing that needs --overwrite
    assert len(table(out, "documents")) == 1


def test_non_empty_output_needs_resume_or_overwrite(tiny: str, tmp_path: Path) -> None:
    corpus = write_lines(tmp_path / "c.txt", SAMPLE[:2])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["run", "--model", tiny, "-i", str(corpus), "-o", str(out), *NO_EXTRAS]
    line = user_error(args)
    assert line == (
        f"error: output folder '{out}' is not empty; pass --resume to finish that run or "
        f"--overwrite to replace it"
    )
    assert (out / "notes.txt").read_text() == "mine"  # untouched
    run_ok(tiny, corpus, out, "--overwrite")
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite deletes only what a run writes
    assert len(table(out, "documents")) == 2
    again = invoke([*args, "--resume"])
    assert again.exit_code == 0 and "is complete; nothing to do" in again.stderr


# -- progress -------------------------------------------------------------------------------------------


def test_progress_lines_without_a_terminal(tiny: str, tmp_path: Path) -> None:
    corpus = write_lines(tmp_path / "c.txt", SAMPLE[:6])
    args = ["run", "--model", tiny, "-i", str(corpus), "-o", str(tmp_path / "out"), "--batch-size", "2"]
    args += NO_EXTRAS
    result = invoke(args, env={"EXTRACTOR_PROGRESS_SECONDS": "0"})  # the runner's stderr is not a TTY
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    progress = [line for line in lines if line.startswith("progress: ")]
    assert len(progress) == 3  # one per batch of 2
    assert progress[-1].startswith("progress: 6/6 documents") and "tokens/s" in progress[-1]
    assert lines[-1].startswith("done: 6 records (6 ok, 0 truncated, 0 skipped)")
    assert "\r" not in result.stderr  # no progress bar
    quiet = invoke([*args, "--overwrite", "--quiet"], env={"EXTRACTOR_PROGRESS_SECONDS": "0"})
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""


# -- the real model -------------------------------------------------------------------------------------


def test_minilm_run_verifies_every_head(minilm: LoadedModel, tmp_path: Path) -> None:
    corpus = write_lines(tmp_path / "c.txt", SAMPLE[:3])
    config = RunConfig(
        model="minilm", input=str(corpus), output=str(tmp_path / "out"), plots=False, report=False
    )
    manifest = run_extraction(config, quiet=True, loaded=minilm)
    verification = table(tmp_path / "out", "verification")
    assert len(verification) == 6 * 12 and verification["passed"].all()
    assert (
        manifest["verification"]["passed"] is True and manifest["verification"]["max_pattern_abs_err"] < 1e-5
    )
    assert manifest["provenance"]["model_class"] == "BertModel"
    assoc = associations(tmp_path / "out")
    assert set(assoc["layer"]) == set(range(6)) and set(assoc["head"]) == set(range(-1, 12))


# -- kill -9 and --resume -------------------------------------------------------------------------------


PYTHON_M = [sys.executable, "-m", "extractor"]


def resumable_args(model: str, corpus: Path, out: Path) -> list[str]:
    """Small batches and buffers, so that the run writes many parts."""
    small = "--batch-size 4 --set buffer_size=16 --set threads=1".split()
    return ["run", "--model", model, "-i", str(corpus), "-o", str(out), *small, *NO_EXTRAS]


def offline_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_kill_9_then_resume_equals_an_uninterrupted_run(tiny: str, tmp_path: Path, one_thread: None) -> None:
    # 160 distinct documents (a numeric suffix), a few skipped, in 40+ small parts
    lines = [f"{SAMPLE[i % len(SAMPLE)]} {i}" if i % 37 else "" for i in range(160)]
    corpus = write_lines(tmp_path / "corpus.txt", lines)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    process = subprocess.Popen(
        [*PYTHON_M, *resumable_args(tiny, corpus, killed), "--quiet"],
        env=offline_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while len(list((killed / "associations").glob("part-*.parquet"))) < 2:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        assert time.time() < deadline, "the run wrote no parts"
        time.sleep(0.002)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["status"] == "running"
    assert not (killed / "documents.parquet").exists()
    committed = {d for m in (killed / "_parts").glob("*.done") for d in json.loads(m.read_text())["doc_ids"]}
    assert 0 < len(committed) < len(lines)

    refused = user_error(resumable_args(tiny, corpus, killed))  # the same run without --resume
    assert "pass --resume" in refused

    resumed = subprocess.run(
        [*PYTHON_M, *resumable_args(tiny, corpus, killed), "--resume", "--quiet"],
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr == ""

    reference = invoke([*resumable_args(tiny, corpus, whole), "--quiet"])  # uninterrupted, in-process
    assert reference.exit_code == 0, reference.output

    for name in ("documents", "tokens", "verification"):
        pd.testing.assert_frame_equal(table(killed, name), table(whole, name), check_exact=True)
    docs = table(killed, "documents")
    assert docs["doc_id"].tolist() == list(range(len(lines)))  # none missing, none twice
    assert (docs["status"] == "skipped").sum() == sum(1 for line in lines if not line)
    assert not table(killed, "tokens").duplicated(["doc_id", "position"]).any()
    got, want = associations(killed), associations(whole)
    assert not got.duplicated(KEYS).any()
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    counts = [json.loads((out / "manifest.json").read_text())["counts"] for out in (killed, whole)]
    assert counts[0] == counts[1]


# -- bounded memory -------------------------------------------------------------------------------------

MEMORY_PROBE = """
import json, resource, sys
from extractor.corpus.config import RunConfig
from extractor.api import run_extraction

corpus, out, model, first = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
peaks, seen = {}, [0]

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

def after_part(part):
    seen[0] += len(part.documents)
    if seen[0] >= first and "first" not in peaks:
        peaks["first"] = peak_mb()

config = RunConfig(model=model, input=corpus, output=out, storage="dense", batch_size=4, buffer_size=8,
                   threads=1, plots=False, report=False)
run_extraction(config, quiet=True, after_part=after_part)
print(json.dumps({"first": peaks["first"], "final": peak_mb(), "documents": seen[0]}))
"""


def test_peak_memory_does_not_grow_with_the_corpus(tiny: str, tmp_path: Path) -> None:
    """Peak RSS after the first quarter of the corpus vs after all of it (and the final consolidation).

    Documents of ~110 tokens stored dense make each document's output ~3 MB, so keeping what was written
    (or the attention tensors) would add >100 MB over the last three quarters; a bounded run adds ~10 MB.
    glibc and Arrow are told to return freed blocks at once, so that RSS follows live memory rather than
    allocator caches.
    """
    lines = [" ".join(SAMPLE[(7 * i + j) % len(SAMPLE)] for j in range(7)) + f" {i}" for i in range(48)]
    corpus = write_lines(tmp_path / "corpus.txt", lines)
    env = {
        **offline_env(),
        "MALLOC_ARENA_MAX": "2",
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "ARROW_DEFAULT_MEMORY_POOL": "system",
    }
    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(corpus), str(tmp_path / "out"), tiny, "12"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.returncode == 0, probe.stderr
    peaks = json.loads(probe.stdout.strip().splitlines()[-1])
    assert peaks["documents"] == 48
    growth = peaks["final"] - peaks["first"]
    assert growth < 0.05 * peaks["first"] + 30, peaks


def test_missing_jsonl_field_after_a_bad_first_line_writes_nothing(tiny: str, tmp_path: Path) -> None:
    """The field check happens on the first readable object, before the output folder is created."""
    corpus = write_lines(tmp_path / "c.jsonl", ["{not json", '{"body": "no text field here"}', '{"text": "x"}'])
    out = tmp_path / "out"
    message = user_error(["run", "--model", tiny, "-i", str(corpus), "-o", str(out), *NO_EXTRAS])
    assert "line 2" in message and "'text'" in message
    assert not out.exists()


def test_a_forward_that_no_longer_matches_its_weights_fails_the_run(
    tiny: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control for `extractor run`: a hook scales layer 1's query projection by 1.05, so the model's
    forward no longer matches its weights there. The run exits 1 and names exactly layer 1's heads."""
    import extractor.corpus.engines.local as local

    real_load = local.load_model

    def hooked_load(*args: Any, **kwargs: Any) -> LoadedModel:
        loaded = real_load(*args, **kwargs)
        query = loaded.model.encoder.layer[1].attention.self.query
        query.register_forward_hook(lambda module, inputs, output: output * 1.05)
        return loaded

    monkeypatch.setattr(local, "load_model", hooked_load)
    corpus = write_lines(tmp_path / "c.txt", SAMPLE[:4])
    result = invoke(["run", "--model", tiny, "-i", str(corpus), "-o", str(tmp_path / "out"), "--quiet", *NO_EXTRAS])
    assert result.exit_code == 1, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line == "error: verification failed for L1H0, L1H1, L1H2, L1H3 (see verification.parquet)"
    verification = table(tmp_path / "out", "verification")
    assert verification.loc[verification["layer"] == 0, "passed"].all()
    assert not verification.loc[verification["layer"] == 1, "passed"].any()


def test_a_forward_changed_only_on_the_sdpa_kernel_fails_the_run_through_the_probes(
    tiny: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batches between two eager comparisons run the sdpa kernel and are probed: a hook that scales layer 1's
    query projection only there (the eager batch 0 never sees it) still fails the run, naming layer 1."""
    import extractor.corpus.engines.local as local
    from extractor.core.sdpa_capture import SDPA_RECORDING

    real_load = local.load_model

    def hooked_load(*args: Any, **kwargs: Any) -> LoadedModel:
        loaded = real_load(*args, **kwargs)
        model = loaded.model

        def on_sdpa_only(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            return output * 1.05 if model.config._attn_implementation == SDPA_RECORDING else output

        model.encoder.layer[1].attention.self.query.register_forward_hook(on_sdpa_only)
        return loaded

    monkeypatch.setattr(local, "load_model", hooked_load)
    corpus = write_lines(tmp_path / "c.txt", SAMPLE[:4])
    out = tmp_path / "out"
    result = invoke(["run", "--model", tiny, "-i", str(corpus), "-o", str(out), "--quiet", "--batch-size", "1",
                     "--hf-compare-every", "10", *NO_EXTRAS])
    assert result.exit_code == 1, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line == "error: verification failed for L1H0, L1H1, L1H2, L1H3 (see verification.parquet)"
    verification = table(out, "verification")
    assert (verification["n_docs"] == 4).all() and (verification["n_docs_compared"] == 1).all()
    assert (verification["pattern_max_abs_err"] <= 1e-5).all()  # batch 0, compared with eager: clean
    assert (verification.loc[verification["layer"] == 1, "projection_rel_err"] > 1e-3).all()


def test_probed_batches_write_the_tables_of_eager_batches(tmp_path: Path) -> None:
    """The same corpus, every batch on the eager kernel (hf_compare_every 1) or all but the first on the sdpa
    kernel with the pattern computed once (the default): tables equal value for value, within float tolerance."""
    corpus = write_lines(tmp_path / "c.txt", SAMPLE[:24])
    runs = {}
    for name, every in (("eager", "1"), ("probed", "10")):
        runs[name] = tmp_path / name
        manifest = run_ok("minilm", corpus, runs[name], "--batch-size", "4", "--hf-compare-every", every)
        assert manifest["verification"]["passed"] is True
    verification = table(runs["probed"], "verification")
    assert (verification["n_docs"] == 24).all() and (verification["n_docs_compared"] == 4).all()
    assert (table(runs["eager"], "verification")["n_docs_compared"] == 24).all()
    eager, probed = associations(runs["eager"]), associations(runs["probed"])
    assert eager[KEYS].equals(probed[KEYS])  # top-k picked the same keys
    for measure in ("attention", "value_norm", "rollout", "kept_mass"):
        difference = (eager[measure] - probed[measure]).abs().max()
        scale = eager[measure].abs().max()
        assert difference <= 1e-5 * max(1.0, scale), (measure, difference)
    heads_eager, heads_probed = table(runs["eager"], "heads"), table(runs["probed"], "heads")
    numeric = heads_eager.select_dtypes("number").columns
    pd.testing.assert_frame_equal(heads_eager[numeric], heads_probed[numeric], rtol=1e-4, atol=1e-6)


def test_a_document_longer_than_the_model_was_trained_for_is_warned_about(tmp_path: Path) -> None:
    """MiniLM's position embeddings reach 512 but it was trained on 256 tokens (sentence_bert_config.json): a
    longer document runs, with one warning line that says so and how to avoid it."""
    long_text = " ".join([LONG] * 9)  # ~300 tokens
    corpus = write_lines(tmp_path / "c.txt", [SAMPLE[0], long_text])
    result = invoke(["run", "--model", "minilm", "-i", str(corpus), "-o", str(tmp_path / "out"), *NO_EXTRAS])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, result.stderr
    assert "longer than the 256 tokens model 'minilm' was trained on" in warnings[0]
    assert "set max_length: 256" in warnings[0]
    short = invoke(["run", "--model", "minilm", "-i", str(corpus), "-o", str(tmp_path / "short"), "--max-length",
                    "256", *NO_EXTRAS])
    assert short.exit_code == 0 and "warning:" not in short.stderr
