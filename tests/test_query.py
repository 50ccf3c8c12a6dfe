"""`extractor query OUTPUT_DIR "SQL"`: DuckDB views over a run's Parquet files, and its errors."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner, Result

from extractor.cli import app
from extractor.corpus.run_folder import open_run
from extractor.errors import UserError

SAMPLE = (
    (Path(__file__).resolve().parent.parent / "data" / "sample.txt").read_text(encoding="utf-8").splitlines()
)


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of the tiny BERT over four sample lines and one empty line (top-k 3)."""
    folder = tmp_path_factory.mktemp("query")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join([*SAMPLE[:2], "", *SAMPLE[2:4]]) + "\n", encoding="utf-8")
    out = folder / "out"
    result = invoke(
        [
            "run",
            "--model",
            str(tiny_model_dir("bert")),
            "-i",
            str(corpus),
            "-o",
            str(out),
            "--top-k",
            "3",
            "--batch-size",
            "2",
            "--set",
            "plots=false",
            "--set",
            "report=false",
            "--quiet",
        ]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    return out


def nulls_as_none(frame: pd.DataFrame) -> pd.DataFrame:
    """Nulls as None: DuckDB gives None and pyarrow NaN for an all-null text column (text_pair of single texts)."""
    return frame.astype(object).where(frame.notna(), None)


def test_views_read_the_run_tables(run_dir: Path) -> None:
    con = open_run(run_dir).connect()
    try:
        views = {
            row[0]
            for row in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
        }
        assert {"associations", "tokens", "documents", "verification"} <= views
        for view, file in [
            ("documents", "documents.parquet"),
            ("tokens", "tokens.parquet"),
            ("verification", "verification.parquet"),
        ]:
            got = con.execute(f"SELECT * FROM {view}").fetchdf()
            expected = pq.read_table(run_dir / file).to_pandas()
            pd.testing.assert_frame_equal(nulls_as_none(got), nulls_as_none(expected), check_dtype=False)
        n_assoc = con.execute("SELECT count(*) FROM associations").fetchone()[0]
        assert n_assoc == ds.dataset(run_dir / "associations").count_rows() > 0
    finally:
        con.close()


def test_sql_joins_associations_to_tokens(run_dir: Path) -> None:
    frame = open_run(run_dir).fetch(
        """
        SELECT a.doc_id, a.layer, a.head, q.token AS query, k.token AS key, a.attention
        FROM associations a
        JOIN tokens q ON q.doc_id = a.doc_id AND q.position = a.query_pos
        JOIN tokens k ON k.doc_id = a.doc_id AND k.position = a.key_pos
        WHERE a.layer = 1 AND a.head = 2
        """,
    )
    n_tokens = open_run(run_dir).fetch("SELECT sum(n_tokens) AS n FROM documents WHERE status = 'ok'")["n"].item()
    assert len(frame) == 3 * n_tokens  # top-3 keys per query token, every query joined to its tokens
    assert set(frame["layer"]) == {1} and set(frame["head"]) == {2}
    assert frame["attention"].between(0, 1).all()
    statuses = open_run(run_dir).fetch(
        "SELECT status, count(*) AS n FROM documents GROUP BY status ORDER BY status"
    )
    assert statuses.to_dict("list") == {"status": ["ok", "skipped"], "n": [4, 1]}


def test_notebook_relations(run_dir: Path) -> None:
    with open_run(run_dir) as run:
        documents = run.relation("documents").df()
        pd.testing.assert_frame_equal(nulls_as_none(documents),
                                      nulls_as_none(pq.read_table(run_dir / "documents.parquet").to_pandas()),
                                      check_dtype=False)
        per_head = run.sql("SELECT layer, head, count(*) AS n FROM associations GROUP BY ALL ORDER BY ALL").df()
        stored = ds.dataset(run_dir / "associations").to_table().to_pandas()
        expected = stored.groupby(["layer", "head"]).size().reset_index(name="n")
        assert per_head.to_dict("list") == expected.to_dict("list")
        with pytest.raises(UserError, match="has no table 'nope'; it has: associations, documents"):
            run.relation("nope")
        with pytest.raises(UserError, match="query failed"):
            run.sql("SELECT * FROM read_csv('/etc/passwd')")


def test_cli_formats(run_dir: Path) -> None:
    sql = "SELECT doc_id, line, status FROM documents ORDER BY doc_id"
    csv = invoke(["query", str(run_dir), sql, "--format", "csv"])
    assert csv.exit_code == 0, csv.output
    frame = pd.read_csv(io.StringIO(csv.stdout))
    assert frame["doc_id"].tolist() == [0, 1, 2, 3, 4] and frame["line"].tolist() == [1, 2, 3, 4, 5]
    as_jsonl = invoke(["query", str(run_dir), sql, "--format", "jsonl"])
    rows = [json.loads(line) for line in as_jsonl.stdout.splitlines()]
    assert rows[2] == {"doc_id": 2, "line": 3, "status": "skipped"}
    as_json = invoke(["query", str(run_dir), sql, "--format", "json"])
    assert json.loads(as_json.stdout) == rows  # one JSON array of the same rows
    shown = invoke(["query", str(run_dir), "SELECT count(*) AS n FROM verification WHERE passed"])
    assert shown.exit_code == 0 and shown.stdout.split() == ["n", "8"]
    empty = invoke(["query", str(run_dir), "SELECT * FROM documents WHERE doc_id < 0"])
    assert empty.stdout.strip() == "(no rows)"


def one_line_error(args: list[str]) -> str:
    result = invoke(args)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


def test_bad_sql_is_one_line(run_dir: Path) -> None:
    line = one_line_error(["query", str(run_dir), "SELEC * FROM documents"])
    assert line.startswith("error: query failed: Parser Error")
    line = one_line_error(["query", str(run_dir), "SELECT * FROM no_such_view"])
    assert line.startswith("error: query failed:") and "no_such_view" in line


def test_not_a_run_folder(tmp_path: Path) -> None:
    line = one_line_error(["query", str(tmp_path), "SELECT 1"])
    assert (
        line
        == f"error: '{tmp_path}' is not a run output folder (no manifest.json); run `extractor run` first"
    )
    with pytest.raises(UserError):
        open_run(tmp_path / "missing").fetch("SELECT 1")


def test_unknown_format(run_dir: Path) -> None:
    line = one_line_error(["query", str(run_dir), "SELECT 1", "--format", "xml"])
    assert line == "error: --format 'xml' is not supported; choose table, csv, json or jsonl"


def test_query_streams_and_counts_rows(run_dir: Path) -> None:
    """The result arrives batch by batch (8 rows a batch here) and prints the same rows as one fetch; the table
    format keeps its first --max-rows rows and says on stderr how many rows there were."""
    run = open_run(run_dir)
    sql = "SELECT doc_id, layer, head, query_pos, key_pos FROM associations ORDER BY ALL"
    batches = list(run.stream(sql, rows=8))
    assert len(batches) > 2 and all(b.num_rows <= 8 for b in batches)
    streamed = pd.concat([b.to_pandas() for b in batches], ignore_index=True)
    pd.testing.assert_frame_equal(streamed, run.fetch(sql))
    as_jsonl = invoke(["query", str(run_dir), sql, "--format", "jsonl"])
    assert len(as_jsonl.stdout.splitlines()) == len(streamed)
    as_json = invoke(["query", str(run_dir), sql, "--format", "json"])
    assert len(json.loads(as_json.stdout)) == len(streamed)
    table = invoke(["query", str(run_dir), sql, "--max-rows", "3"])
    assert table.exit_code == 0 and len(table.stdout.strip().splitlines()) == 1 + 3
    assert table.stderr.strip() == f"({len(streamed):,} rows, first 3 shown: raise --max-rows)"


def test_a_summary_run_explains_why_it_has_no_associations(tmp_path: Path, tiny_model_dir) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("Cats sleep.\nDogs bark.\n")
    out = tmp_path / "summary"
    result = invoke(["run", "--model", str(tiny_model_dir("bert")), "-i", str(corpus), "-o", str(out),
                     "--storage", "summary", "--quiet", "--no-plots", "--no-report"])
    assert result.exit_code == 0, result.output
    line = one_line_error(["query", str(out), "SELECT count(*) FROM associations"])
    assert "stored no associations (storage: summary)" in line and "heads" in line
    line = one_line_error(["query", str(out), "SELECT * FROM agreement"])
    assert "has no agreement.parquet (set agreement: true)" in line
