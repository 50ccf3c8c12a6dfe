"""Corpus readers: every input line or row becomes exactly one `SourceRecord`, skipped ones included.

Formats: .txt (one document per line), .jsonl (`text_field`), .csv/.tsv (`text_column`), .parquet
(`text_column`), and '-' for stdin (txt unless `input_format` says otherwise). UTF-8 with or without BOM,
LF or CRLF. Invalid bytes, empty or whitespace-only documents are skipped with a reason, never a crash.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import UserError

FORMATS = ("txt", "jsonl", "csv", "tsv", "parquet")
EXTENSIONS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class SourceRecord:
    """One input line or row. `text` is None when the record is skipped; `reason` says why."""

    doc_id: int  # 0-based, in input order
    source: str  # file path, or '<stdin>'
    line: int  # 1-based line (txt, jsonl; csv/tsv: the record's first physical line) or row number (parquet)
    text: str | None
    reason: str | None = None


def detect_format(path: str, input_format: str = "auto") -> str:
    if input_format != "auto":
        return input_format
    if path == "-":
        return "txt"
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSIONS:
        raise UserError(
            f"input '{path}': cannot tell the format from '{suffix or 'no extension'}'; "
            f"use one of {', '.join(sorted(EXTENSIONS))} or set input_format ({', '.join(FORMATS)})"
        )
    return EXTENSIONS[suffix]


def _decode(raw: bytes, first: bool) -> str | None:
    """UTF-8 (BOM stripped on the first line, CR/LF stripped); None for invalid bytes."""
    if first and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        return None


def _check_text(text: str | None) -> tuple[str | None, str | None]:
    if text is None:
        return None, "invalid UTF-8"
    if not text.strip():
        return None, "empty"
    return text, None


def _open_binary(path: str) -> BinaryIO:
    if path == "-":
        return sys.stdin.buffer
    file = Path(path)
    if not file.exists():
        raise UserError(f"input file '{path}' does not exist")
    if not file.is_file():
        raise UserError(f"input '{path}' is not a file")
    return open(file, "rb")  # noqa: SIM115 - closed by the caller's generator


def _read_lines(path: str) -> Iterator[tuple[int, str | None]]:
    handle = _open_binary(path)
    try:
        for number, raw in enumerate(handle, start=1):
            yield number, _decode(raw, first=number == 1)
    finally:
        if handle is not sys.stdin.buffer:
            handle.close()


def read_txt(path: str, source: str) -> Iterator[SourceRecord]:
    for doc_id, (number, text) in enumerate(_read_lines(path)):
        checked, reason = _check_text(text)
        yield SourceRecord(doc_id, source, number, checked, reason)


def read_jsonl(path: str, source: str, text_field: str) -> Iterator[SourceRecord]:
    seen_field = False
    for doc_id, (number, line) in enumerate(_read_lines(path)):
        text, reason = None, None
        if line is None:
            reason = "invalid UTF-8"
        elif not line.strip():
            reason = "empty"
        else:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                record, reason = None, f"invalid JSON ({exc.msg})"
            if reason is None and not isinstance(record, dict):
                reason = "not a JSON object"
            elif reason is None and text_field not in record:
                if not seen_field:
                    fields = ", ".join(record) or "none"
                    raise UserError(
                        f"{source} line {number}: no field '{text_field}' (fields: {fields}); set text_field"
                    )
                reason = f"missing field '{text_field}'"
            elif reason is None:
                seen_field = True
                value = record[text_field]
                if not isinstance(value, str):
                    reason = f"field '{text_field}' is not a string"
                else:
                    text, reason = _check_text(value)
        yield SourceRecord(doc_id, source, number, text, reason)


def read_delimited(path: str, source: str, text_column: str, delimiter: str) -> Iterator[SourceRecord]:
    handle = _open_binary(path)
    try:
        # surrogateescape keeps invalid bytes visible per row instead of failing the whole file
        stream = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.reader(stream, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise UserError(f"{source}: the file is empty (no header row)") from None
        except csv.Error as exc:
            raise UserError(f"{source} line 1: unreadable header ({exc})") from None
        if text_column not in header:
            raise UserError(
                f"{source} line 1: no column '{text_column}' (columns: {', '.join(header)}); set text_column"
            )
        column = header.index(text_column)
        doc_id = 0
        while True:
            number = reader.line_num + 1  # the record's first physical line (quoted fields may span lines)
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                yield SourceRecord(doc_id, source, number, None, f"malformed row ({exc})")
                doc_id += 1
                continue
            if not row:
                reason: str | None = "empty"
                text = None
            elif column >= len(row):
                text, reason = None, f"missing column '{text_column}'"
            else:
                value = row[column]
                if any("\udc80" <= ch <= "\udcff" for ch in value):
                    text, reason = None, "invalid UTF-8"
                else:
                    text, reason = _check_text(value)
            yield SourceRecord(doc_id, source, number, text, reason)
            doc_id += 1
    finally:
        if handle is not sys.stdin.buffer:
            handle.close()


def read_parquet(path: str, source: str, text_column: str) -> Iterator[SourceRecord]:
    import pyarrow.parquet as pq

    if path == "-":
        raise UserError("parquet input cannot come from stdin; give a file path")
    if not Path(path).is_file():
        raise UserError(f"input file '{path}' does not exist")
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise UserError(f"{source}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    names = parquet.schema_arrow.names
    if text_column not in names:
        raise UserError(f"{source}: no column '{text_column}' (columns: {', '.join(names)}); set text_column")
    doc_id = 0
    for batch in parquet.iter_batches(columns=[text_column], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if value is None:
                text, reason = None, "null"
            elif not isinstance(value, str):
                text, reason = None, f"column '{text_column}' is not text"
            else:
                text, reason = _check_text(value)
            yield SourceRecord(doc_id, source, doc_id + 1, text, reason)
            doc_id += 1


def read_documents(path: str, input_format: str = "auto", text_field: str = "text", text_column: str = "text") -> Iterator[SourceRecord]:
    """Every record of `path`, in order, each with a doc_id; format errors raise `UserError` before any record."""
    fmt = detect_format(path, input_format)
    source = "<stdin>" if path == "-" else path
    if fmt == "txt":
        return read_txt(path, source)
    if fmt == "jsonl":
        return read_jsonl(path, source, text_field)
    if fmt in ("csv", "tsv"):
        return read_delimited(path, source, text_column, "," if fmt == "csv" else "\t")
    return read_parquet(path, source, text_column)


def count_records(path: str, input_format: str = "auto") -> int | None:
    """Number of records (for progress ETA) without parsing them; None when it cannot be known cheaply."""
    fmt = detect_format(path, input_format)
    if path == "-" or not Path(path).is_file():
        return None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception:  # noqa: BLE001
            return None
    if fmt in ("csv", "tsv"):
        return None  # quoted fields may span lines
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)
