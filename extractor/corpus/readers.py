"""Corpus readers: every input line or row becomes exactly one `SourceRecord`, skipped ones included.

Formats: .txt (one document per line), .jsonl (`text_field`), .csv/.tsv (`text_column`), .parquet
(`text_column`), and '-' for stdin (txt unless `input_format` says otherwise). UTF-8 with or without BOM, or
UTF-16/UTF-32 with a BOM; LF or CRLF. Invalid bytes, lone surrogates, documents with no visible character
(empty, whitespace, control, zero-width or combining characters only) and a CSV quote left open to the end of
the file are skipped with a reason, never a crash.

What the user gave besides the text rides along (`RecordKeys`; .jsonl fields, .csv/.tsv/.parquet columns):
the record's own id (`id_field` → documents.parquet `source_id`), label columns (`keep_fields`, one
documents.parquet column each, as text: JSON text for a non-string JSON or Parquet value) and the second
text of a sentence pair (`text_pair_field`). A record without its id or a kept field keeps the record with a
null there; a record without its pair text (or with one that is empty or invalid) is skipped with a reason; a
.csv/.tsv header or a Parquet file that lacks a named column is a one-line error naming the file and column.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import sys
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, TextIO

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
    text_pair: str | None = None  # the pair's second text (text_pair_field), None for a single text
    source_id: str | None = None  # the record's own id (id_field), None when not asked or absent
    fields: dict[str, str | None] = field(default_factory=dict)  # kept field → its value as text (keep_fields)


@dataclass(frozen=True)
class RecordKeys:
    """The fields (.jsonl) or columns (.csv/.tsv/.parquet) read besides the text."""

    text_pair: str | None = None
    id: str | None = None
    keep: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        """Every field named, once, in order."""
        return list(dict.fromkeys([*(k for k in (self.text_pair, self.id) if k), *self.keep]))


MISSING = object()  # what a lookup returns for a field or column the record lacks


def _as_text(value: Any) -> str | None:
    """A kept value as text: strings as they are, null/absent as None, anything else as its JSON text."""
    if value is MISSING or value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _with_keys(record: SourceRecord, lookup: Callable[[str], Any], keys: RecordKeys) -> SourceRecord:
    """`record` with its id, kept fields and pair text read through `lookup` (name → value, or MISSING); a
    readable record whose pair text is missing, not text, empty or invalid is skipped with a reason."""
    source_id = _as_text(lookup(keys.id)) if keys.id else None
    kept = {name: _as_text(lookup(name)) for name in keys.keep}
    text, text_pair, reason = record.text, None, record.reason
    if keys.text_pair and text is not None:
        value = lookup(keys.text_pair)
        if value is MISSING or value is None:
            reason = f"missing text_pair field '{keys.text_pair}'"
        elif not isinstance(value, str):
            reason = f"text_pair field '{keys.text_pair}' is not a string"
        else:
            text_pair, why = _check_text(value)
            reason = None if why is None else f"text_pair field '{keys.text_pair}': {why}"
        if text_pair is None:
            text = None
    return replace(record, text=text, reason=reason, text_pair=text_pair, source_id=source_id, fields=kept)


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


def read_jsonl(path: str, source: str, text_field: str, keys: RecordKeys = RecordKeys()) -> Iterator[SourceRecord]:
    seen_field = False
    for doc_id, (number, line, invalid) in enumerate(_read_lines(path)):
        text, reason = None, invalid
        record: Any = None
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
        found = SourceRecord(doc_id, source, number, text, reason)
        if isinstance(record, dict):
            found = _with_keys(found, partial(_json_value, record), keys)
        yield found


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


def read_delimited(
    path: str, source: str, text_column: str, delimiter: str, keys: RecordKeys = RecordKeys()
) -> Iterator[SourceRecord]:
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
        for name, key in [(text_column, "text_column"), *((n, _key_of(n, keys)) for n in keys.names)]:
            if name not in header:
                raise UserError(
                    f"{source} line 1: no column '{name}' (columns: {shortened(', '.join(header))}); set {key}"
                )
        column = header.index(text_column)
        columns = {name: header.index(name) for name in keys.names}
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
            found = SourceRecord(doc_id, source, number, text, reason)
            if row and not lines.past_the_end:
                found = _with_keys(found, partial(_cell, row, columns), keys)
            yield found
            doc_id += 1


def _json_value(record: dict[str, Any], name: str) -> Any:
    return record.get(name, MISSING)


def _column_value(values: dict[str, list[Any]], row: int, name: str) -> Any:
    return values[name][row]


def _cell(row: list[str], columns: dict[str, int], name: str) -> Any:
    """A .csv/.tsv row's cell in column `name`, MISSING when the row is too short or the cell has invalid bytes."""
    column = columns[name]
    if column >= len(row) or _has_surrogate(row[column]):
        return MISSING
    return row[column]


def _key_of(name: str, keys: RecordKeys) -> str:
    """The config key that named field `name` (for the fix in an error message)."""
    return "text_pair_field" if name == keys.text_pair else "id_field" if name == keys.id else "keep_fields"


def read_parquet(path: str, source: str, text_column: str, keys: RecordKeys = RecordKeys()) -> Iterator[SourceRecord]:
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
    for name, key in [(text_column, "text_column"), *((n, _key_of(n, keys)) for n in keys.names)]:
        if name not in names:
            raise UserError(f"{source}: no column '{name}' (columns: {shortened(', '.join(names))}); set {key}")
    doc_id = 0
    text: str | None
    reason: str | None
    wanted = list(dict.fromkeys([text_column, *keys.names]))
    for batch in parquet.iter_batches(columns=wanted, batch_size=4096):
        values = {name: batch.column(name).to_pylist() for name in wanted}
        for row, value in enumerate(values[text_column]):
            if value is None:
                text, reason = None, "null"
            elif not isinstance(value, str):
                text, reason = None, f"column '{text_column}' is not text"
            else:
                text, reason = _check_text(value)
            found = SourceRecord(doc_id, source, doc_id + 1, text, reason)
            yield _with_keys(found, partial(_column_value, values, row), keys) if keys.names else found
            doc_id += 1


def read_documents(
    path: str, input_format: str = "auto", text_field: str = "text", text_column: str = "text",
    keys: RecordKeys = RecordKeys(),
) -> Iterator[SourceRecord]:
    """Every record of `path`, in order, each with a doc_id; format errors raise `UserError` before any record.

    `keys`: the pair text, id and kept fields to read too (not for .txt input, which has none)."""
    fmt = detect_format(path, input_format)
    source = "<stdin>" if path == "-" else path
    if fmt == "txt":
        if keys.names:
            raise UserError(f"input '{source}' is plain text: it has no field '{keys.names[0]}'; give a .jsonl, .csv, "
                            f".tsv or .parquet input, or unset {_key_of(keys.names[0], keys)}")
        return read_txt(path, source)
    if fmt == "jsonl":
        return read_jsonl(path, source, text_field, keys)
    if fmt in ("csv", "tsv"):
        return read_delimited(path, source, text_column, "," if fmt == "csv" else "\t", keys)
    return read_parquet(path, source, text_column, keys)


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
