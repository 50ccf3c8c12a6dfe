"""Corpus readers: every input line or row becomes exactly one record, skipped ones with a reason.

Each reader runs on small files written here; bad inputs that must stop the run raise `UserError`
with a message naming the file, the line and the fix.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from extractor.corpus.readers import count_records, detect_format, read_documents
from extractor.errors import UserError


def records(path: Path | str, **options: str) -> list[tuple[int, int, str | None, str | None]]:
    """(doc_id, line, text, reason) of every record."""
    return [(r.doc_id, r.line, r.text, r.reason) for r in read_documents(str(path), **options)]


def test_txt_bom_crlf_invalid_bytes_empty_and_blank_lines(tmp_path: Path) -> None:
    file = tmp_path / "corpus.txt"
    file.write_bytes(
        b"\xef\xbb\xbfFirst line.\r\n"  # BOM + CRLF
        b"caf\xc3\xa9 au lait\r\n"  # valid UTF-8 (é)
        b"bad \xff\xfe bytes\n"  # invalid UTF-8
        b"\n"  # empty
        b"   \t \r\n"  # whitespace only
        b"Last line without newline"
    )
    got = records(file)
    assert got == [
        (0, 1, "First line.", None),
        (1, 2, "café au lait", None),
        (2, 3, None, "invalid UTF-8"),
        (3, 4, None, "empty"),
        (4, 5, None, "empty"),
        (5, 6, "Last line without newline", None),
    ]
    assert {r.source for r in read_documents(str(file))} == {str(file)}
    assert count_records(str(file)) == 6


def test_jsonl_text_field_bad_json_and_non_string_values(tmp_path: Path) -> None:
    file = tmp_path / "corpus.jsonl"
    lines = [
        json.dumps({"id": 1, "body": "A sentence."}),
        "{not json",
        json.dumps({"id": 3, "body": 42}),
        json.dumps(["a", "list"]),
        "",
        json.dumps({"id": 6, "other": "no body here"}),
        json.dumps({"id": 7, "body": "  "}),
        json.dumps({"id": 8, "body": "Ünïcode ✓"}),
    ]
    file.write_bytes("\ufeff".encode() + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    got = records(file, text_field="body")
    assert [g[:2] for g in got] == [(i, i + 1) for i in range(8)]
    assert got[0][2:] == ("A sentence.", None)
    assert got[1][2] is None and got[1][3].startswith("invalid JSON")
    assert got[2][2:] == (None, "field 'body' is not a string")
    assert got[3][2:] == (None, "not a JSON object")
    assert got[4][2:] == (None, "empty")
    assert got[5][2:] == (None, "missing field 'body'")
    assert got[6][2:] == (None, "empty")
    assert got[7][2:] == ("Ünïcode ✓", None)


def test_jsonl_field_missing_from_the_first_object_is_a_user_error(tmp_path: Path) -> None:
    file = tmp_path / "corpus.jsonl"
    file.write_text(json.dumps({"content": "x", "id": 1}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"line 1: no field 'text' \(fields: content, id\); set text_field"):
        records(file)


@pytest.mark.parametrize("fmt, delimiter", [("csv", ","), ("tsv", "\t")])
def test_delimited_quoted_multiline_fields_and_custom_column(
    tmp_path: Path, fmt: str, delimiter: str
) -> None:
    d = delimiter
    file = tmp_path / f"corpus.{fmt}"
    file.write_bytes(
        "\ufeff".encode()
        + (
            f"id{d}body{d}note\r\n"
            f'1{d}"A quoted field{d} with the delimiter"{d}x\r\n'
            f'2{d}"Spans\r\ntwo lines"{d}y\r\n'
            f"3{d}{d}empty body\r\n"
            f"4{d}   {d}blank body\r\n"
            f"5\r\n"  # too few columns
            f'6{d}"He said ""hi"""{d}z\r\n'
        ).encode()
        + f"7{d}bad \xff byte{d}w\r\n".encode("latin-1")
    )
    got = records(file, text_column="body")
    assert got == [
        (0, 2, f"A quoted field{d} with the delimiter", None),
        (1, 3, "Spans\r\ntwo lines", None),  # starts on line 3, ends on line 4
        (2, 5, None, "empty"),
        (3, 6, None, "empty"),
        (4, 7, None, "missing column 'body'"),
        (5, 8, 'He said "hi"', None),
        (6, 9, None, "invalid UTF-8"),
    ]


def test_delimited_missing_column_names_the_columns(tmp_path: Path) -> None:
    file = tmp_path / "corpus.csv"
    file.write_text("id,body\n1,hello\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"line 1: no column 'text' \(columns: id, body\); set text_column"):
        records(file)


def test_parquet_nulls_empty_and_non_text(tmp_path: Path) -> None:
    file = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "body": ["First.", None, " ", "Fourth."]}), file)
    assert records(file, text_column="body") == [
        (0, 1, "First.", None),
        (1, 2, None, "null"),
        (2, 3, None, "empty"),
        (3, 4, "Fourth.", None),
    ]
    assert records(file, text_column="id")[0] == (0, 1, None, "column 'id' is not text")
    with pytest.raises(UserError, match=r"no column 'text' \(columns: id, body\)"):
        records(file)
    assert count_records(str(file)) == 4


def test_stdin_is_read_as_txt(monkeypatch: pytest.MonkeyPatch) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbfone\r\n\r\ntwo\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    got = [(r.doc_id, r.source, r.line, r.text, r.reason) for r in read_documents("-")]
    assert got == [
        (0, "<stdin>", 1, "one", None),
        (1, "<stdin>", 2, None, "empty"),
        (2, "<stdin>", 3, "two", None),
    ]
    assert count_records("-") is None


def test_stdin_cannot_be_parquet() -> None:
    with pytest.raises(UserError, match="parquet input cannot come from stdin"):
        records("-", input_format="parquet")


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet"])
def test_missing_file_is_a_user_error(tmp_path: Path, fmt: str) -> None:
    missing = tmp_path / f"nowhere.{fmt}"
    with pytest.raises(UserError, match=f"input file '{missing}' does not exist"):
        records(missing)


def test_a_folder_is_not_an_input(tmp_path: Path) -> None:
    folder = tmp_path / "corpus.txt"
    folder.mkdir()
    with pytest.raises(UserError, match="is not a file"):
        records(folder)


def test_format_from_extension_or_option() -> None:
    assert detect_format("a.TXT") == "txt"
    assert detect_format("a.ndjson") == "jsonl"
    assert detect_format("a.tsv") == "tsv"
    assert detect_format("-") == "txt"
    assert detect_format("corpus.dat", "csv") == "csv"
    with pytest.raises(
        UserError, match=r"cannot tell the format from '\.dat'.*set input_format \(txt, jsonl"
    ):
        detect_format("corpus.dat")


def test_empty_csv_has_no_header(tmp_path: Path) -> None:
    file = tmp_path / "empty.csv"
    file.write_bytes(b"")
    with pytest.raises(UserError, match="the file is empty"):
        records(file)
