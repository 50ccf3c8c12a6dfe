"""Corpus readers: every input line or row becomes exactly one `SourceRecord`, skipped ones included.

Formats: .txt (one document per line), .jsonl (`text_field`), .csv/.tsv (`text_column`), .parquet
(`text_column`), and '-' for stdin (txt unless `input_format` says otherwise). UTF-8 with or without BOM, or
UTF-16/UTF-32 with a BOM; LF or CRLF. Invalid bytes, lone surrogates, documents with no visible character
(empty, whitespace, control, zero-width or combining characters only) and a CSV quote left open to the end of
the file are skipped with a reason, never a crash.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import sys
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

from extractor.errors import UserError, shortened

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


# (byte-order mark, codec, name); UTF-32-LE's mark starts with UTF-16-LE's, so it is tried first.
BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8-sig", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"),
)
# Categories of characters that show nothing on their own: control (NUL, ESC ...), format (zero-width space and
# joiners, BOM, word joiner), surrogate, separators (spaces, line and paragraph), combining marks.
INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp", "Mn", "Mc", "Me"})
INVALID_BYTES = "extractor.invalid-bytes"


def _mark_invalid_bytes(error: UnicodeError) -> tuple[str, int]:
    """Decode each invalid byte to a lone surrogate U+DC00+byte, like 'surrogateescape' (which refuses bytes
    below 0x80, and so fails on invalid UTF-16): a record holding one is then skipped as invalid."""
    assert isinstance(error, UnicodeDecodeError)
    return "".join(chr(0xDC00 + byte) for byte in error.object[error.start : error.end]), error.end


codecs.register_error(INVALID_BYTES, _mark_invalid_bytes)


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _check_text(text: str) -> tuple[str | None, str | None]:
    """(text, None) for a document to analyse, or (None, reason) for one to skip."""
    if _has_surrogate(text):  # e.g. JSON's "\ud800": no tokenizer accepts it
        return None, "lone surrogate (not valid Unicode)"
    if not text.strip():
        return None, "empty"
    if all(unicodedata.category(ch) in INVISIBLE for ch in text):
        return None, "no visible characters"
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


def _encoding(start: bytes) -> tuple[str, str]:
    """(codec, name) of a file from its first bytes: the encoding its byte-order mark names, else UTF-8."""
    return next(((c, n) for bom, c, n in BYTE_ORDER_MARKS if start.startswith(bom)), ("utf-8", "UTF-8"))


@contextmanager
def _open_text(path: str, newline: str) -> Iterator[tuple[TextIO, str]]:
    """`path` (or stdin) as text, in the encoding its byte-order mark names (UTF-8 without one), and that
    encoding's name. Invalid bytes become lone surrogates, so one record is skipped instead of the file failing."""
    handle = _open_binary(path)
    # peek() reads the byte-order mark without consuming it; a stdin that is not a BufferedReader lacks it
    buffered = handle if isinstance(handle, io.BufferedReader) else io.BufferedReader(handle)  # type: ignore[type-var]
    codec, name = _encoding(buffered.peek(4))
    stream = io.TextIOWrapper(buffered, encoding=codec, errors=INVALID_BYTES, newline=newline)
    try:
        yield stream, name
    finally:
        if path == "-":
            stream.detach()  # leave stdin open
        else:
            stream.close()


def _read_lines(path: str) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, None) for each line (CR/LF stripped), or (line number, None, reason) for one with
    invalid bytes."""
    with _open_text(path, newline="\n") as (stream, encoding):
        for number, line in enumerate(stream, start=1):
            text = line.rstrip("\r\n")
            if _has_surrogate(text):
                yield number, None, f"invalid {encoding}"
            else:
                yield number, text, None


def read_txt(path: str, source: str) -> Iterator[SourceRecord]:
    for doc_id, (number, line, invalid) in enumerate(_read_lines(path)):
        text, reason = (None, invalid) if line is None else _check_text(line)
        yield SourceRecord(doc_id, source, number, text, reason)


def read_jsonl(path: str, source: str, text_field: str) -> Iterator[SourceRecord]:
    seen_field = False
    for doc_id, (number, line, invalid) in enumerate(_read_lines(path)):
        text, reason = None, invalid
        if line is not None and not line.strip():
            reason = "empty"
        elif line is not None:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                record, reason = None, f"invalid JSON ({exc.msg})"
            if reason is None and not isinstance(record, dict):
                reason = "not a JSON object"
            elif reason is None and text_field not in record:
                if not seen_field:
                    fields = shortened(", ".join(record)) or "none"
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


class _PhysicalLines:
    """The lines csv.reader reads, noting whether it asked for one past the last: it does that only while inside
    a quoted field, so a record read then had its quote left open to the end of the file."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.past_the_end = False

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line = self.stream.readline()
        if not line:
            self.past_the_end = True
            raise StopIteration
        return line


def read_delimited(path: str, source: str, text_column: str, delimiter: str) -> Iterator[SourceRecord]:
    with _open_text(path, newline="") as (stream, encoding):
        lines = _PhysicalLines(stream)
        reader = csv.reader(lines, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise UserError(f"{source}: the file is empty (no header row)") from None
        except csv.Error as exc:
            raise UserError(f"{source} line 1: unreadable header ({exc})") from None
        if lines.past_the_end:
            raise UserError(f"{source} line 1: the header opens a quote that is never closed")
        if text_column not in header:
            raise UserError(
                f"{source} line 1: no column '{text_column}' (columns: {shortened(', '.join(header))}); set text_column"
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
            text: str | None = None
            if lines.past_the_end:
                reason: str | None = (
                    f"unclosed quote: the record runs from line {number} to the end of the file (line "
                    f"{reader.line_num}); close the quote"
                )
            elif not row:
                reason = "empty"
            elif column >= len(row):
                reason = f"missing column '{text_column}'"
            elif _has_surrogate(row[column]):
                reason = f"invalid {encoding}"
            else:
                text, reason = _check_text(row[column])
            yield SourceRecord(doc_id, source, number, text, reason)
            doc_id += 1


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
        raise UserError(f"{source}: no column '{text_column}' (columns: {shortened(', '.join(names))}); set text_column")
    doc_id = 0
    text: str | None
    reason: str | None
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
        if _encoding(handle.peek(4))[1] != "UTF-8":
            return None  # in UTF-16/32 a newline byte can be half of another character
        return sum(1 for _ in handle)
