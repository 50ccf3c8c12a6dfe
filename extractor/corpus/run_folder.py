"""Reading a run's output folder back: the one place that knows its files and how to read them.

    OUTPUT/manifest.json            {"config", "provenance": {"model", "n_layers", "n_heads", ...}, ...}
    OUTPUT/documents.parquet        doc_id, source, line, n_tokens, n_windows, status, reason, text
    OUTPUT/tokens.parquet           doc_id, position, token, word_index, is_special, char_start, char_end
    OUTPUT/words.parquet            doc_id, word_index, word, is_special, n_tokens, char_start, char_end (level word)
    OUTPUT/verification.parquet     max errors per (layer, head) vs Hugging Face
    OUTPUT/heads.parquet            per-head metrics (extractor.heads.metrics)
    OUTPUT/head_similarity.parquet  JS divergence of every pair of heads (extractor.heads.similarity)
    OUTPUT/associations/            Parquet dataset: doc_id, layer, head, query_pos, key_pos, <measures>
                                    [, kept_mass] [, window]

    run = open_run(OUTPUT)          # a UserError unless OUTPUT is a run folder
    run.doc_matrix(0, layer=3, head=7), run.labels(0), run.texts([0]), run.sql("SELECT ...").df()

Reading rules that hold for every reader (plots, report, query, compare):
- Overlapping windows (`long_documents: window`) store a (query, key) cell once per window that holds it;
  a cell's value is the mean over those windows (`merge_windows`), and a query row's kept mass the mean over
  the windows that hold the row.
- A position's label is the slice of the document's original text its characters span (surrounding
  whitespace dropped; a whitespace-only piece made visible); special tokens, whose span is empty, show their
  token string (`position_label`).

Every mistake (not a run folder, unknown document, layer, head or measure) is a `UserError` that says how to
fix it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from extractor.corpus.matrices import CELLS_METADATA, MATRIX_KEYS, POSITIONS, expand, is_matrix_schema, long_view_sql
from extractor.corpus.query import fetch, read_only_connection, stream
from extractor.errors import UserError, first_line

MANIFEST = "manifest.json"
ASSOCIATIONS = "associations"
MATRICES_VIEW = "association_matrices"  # a dense run's stored rows, one per (doc_id, layer, head) with its matrix
# view name (in `extractor query` and `RunFolder.sql`) → the table's file at the top of the run folder
TABLES = {
    "documents": "documents.parquet",
    "tokens": "tokens.parquet",
    "words": "words.parquet",
    "verification": "verification.parquet",
    "heads": "heads.parquet",
    "head_similarity": "head_similarity.parquet",
    "agreement": "agreement.parquet",
}
# Everything a run writes at the top of its folder: `--overwrite` deletes these and nothing else.
RUN_FILES = (MANIFEST, *TABLES.values(), "report.html", ASSOCIATIONS, "_parts", "plots")
CELL_KEYS = ("doc_id", "layer", "head", "query_pos", "key_pos")  # one association cell
ASSOCIATION_KEYS = (*CELL_KEYS, "kept_mass", "window")  # the association columns that are not measures
USABLE_STATUSES = ("ok", "truncated")


# -- rules ------------------------------------------------------------------------------------------------
def merge_windows(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: the windows of a long document that share a (query, key) cell are averaged.

    rows: association rows, with a `window` column when the run split long documents into windows. Each
    measure becomes its mean over the windows that stored the cell (nulls, e.g. layer measures on head rows,
    stay null); `kept_mass` (constant along a window's query row) becomes its mean over the windows that
    stored the row. Rows without a `window` column, or without repeated cells, come back as they are (less
    the `window` column).
    """
    if "window" not in rows:
        return rows
    cell = [c for c in CELL_KEYS if c in rows]
    if not rows.duplicated(cell).any():
        return rows.drop(columns="window")
    measures = [c for c in rows.columns if c not in ASSOCIATION_KEYS]
    merged = rows.groupby(cell, as_index=False, sort=False)[measures].mean()
    if "kept_mass" in rows:
        row_keys = [c for c in cell if c != "key_pos"]
        per_window = rows.drop_duplicates([*row_keys, "window"])
        kept = per_window.groupby(row_keys, as_index=False, sort=False)["kept_mass"].mean()
        merged = merged.merge(kept, on=row_keys, how="left")
    return merged


_VISIBLE = {"\n": "\\n", "\r": "\\r", "\t": "\\t", " ": "␣"}


def position_label(text: str | None, start: int, end: int, token: str) -> str:
    """A position (token or word) as shown: the text its span [start, end) covers, else its token string.

    The span is empty for special tokens ([CLS], <s>), and `text` is None for runs written before documents
    kept their text. Surrounding whitespace is dropped (byte-level tokens span their leading space); a piece
    that is whitespace only (a newline token) is shown with visible marks.
    """
    piece = text[start:end] if text is not None and 0 <= start < end <= len(text) else token
    shown = piece.strip()
    return shown or "".join(_VISIBLE.get(c, c) for c in piece) or "␣"


def text_from_tokens(tokens: pd.DataFrame) -> str:
    """A document's text for runs that did not store it: its non-special tokens placed at their character
    spans (a gap between spans becomes one space). The token strings keep their tokenizer's marks."""
    pieces: list[str] = []
    end = None
    for token, special, start, stop in zip(
        tokens["token"], tokens["is_special"], tokens["char_start"], tokens["char_end"], strict=True
    ):
        if special:
            continue
        if end is not None and start > end:
            pieces.append(" ")
        pieces.append(str(token))
        end = stop
    return "".join(pieces)


def _check_index(name: str, value: int | None, size: int) -> None:
    if value is not None and not 0 <= value < size:
        raise UserError(f"--{name} {value} is out of range; this run has {name}s 0..{size - 1}")


# -- files, without a manifest (the writer checks its own folder with these) ------------------------------
def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """manifest.json of a run; a UserError when `run_dir` is not a run's output folder."""
    file = Path(run_dir) / MANIFEST
    if not file.is_file():
        raise UserError(f"'{run_dir}' is not a run output folder (no manifest.json); run `extractor run` first")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise UserError(f"'{file}' is not valid JSON ({reason}); rerun `extractor run`") from None
    if not isinstance(manifest, dict):
        raise UserError(f"'{file}' is not a run manifest (not a JSON object); rerun `extractor run`")
    return manifest


def measure_columns(names: Sequence[str]) -> list[str]:
    """The measure columns among an associations dataset's column names (cells or matrices)."""
    return [name for name in names if name not in (*ASSOCIATION_KEYS, *MATRIX_KEYS)]


def association_files(run_dir: str | Path) -> list[Path]:
    """The run's committed association parts (`associations/part-*.parquet`), in part order."""
    return sorted((Path(run_dir) / ASSOCIATIONS).glob("part-*.parquet"))


def association_rows(run_dir: str | Path) -> int:
    """How many association rows (long format: one per stored cell) the run's parts hold."""
    total = 0
    for file in association_files(run_dir):
        parquet = pq.ParquetFile(file)
        metadata = parquet.schema_arrow.metadata or {}
        total += int(metadata[CELLS_METADATA]) if CELLS_METADATA in metadata else parquet.metadata.num_rows
    return total


def damaged_files(run_dir: str | Path) -> list[Path]:
    """The run folder's Parquet files whose footer cannot be read (truncated or overwritten)."""
    folder = Path(run_dir)
    damaged = []
    for file in [*sorted(folder.glob("*.parquet")), *association_files(folder)]:
        try:
            pq.ParquetFile(file).metadata  # noqa: B018 - reads and checks the footer
        except (OSError, pa.ArrowException):
            damaged.append(file)
    return damaged


@contextmanager
def reading(run_dir: str | Path) -> Iterator[None]:
    """Turn a failed read of a damaged run folder into one UserError naming the file (a command's wrapper)."""
    try:
        yield
    except Exception as exc:
        duckdb = sys.modules.get("duckdb")  # loaded by whoever queried the folder through it
        if not (isinstance(exc, pa.ArrowException) or (duckdb is not None and isinstance(exc, duckdb.Error))):
            raise
        damaged = damaged_files(run_dir)
        if not damaged:
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"'{damaged[0]}' is damaged and cannot be read ({reason[:200]}); rerun `extractor run` "
                        "with --overwrite to rebuild the run") from None


def model_name(manifest: dict[str, Any]) -> str:
    return str(
        manifest.get("provenance", {}).get("model") or manifest.get("config", {}).get("model") or "model"
    )


def run_level(manifest: dict[str, Any]) -> str:
    """'token' or 'word': the positions the associations are indexed by."""
    return str(manifest.get("config", {}).get("level") or "token")


# -- the folder -------------------------------------------------------------------------------------------
class RunFolder:
    """A finished (or interrupted) run's output folder, read back: tables, matrices, labels, SQL.

    Open it with `open_run(path)`. The manifest is read once; tables are read when asked for. Close it (or use
    it as a context manager) to release the DuckDB connection `sql` and `relation` keep open.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._labels: dict[int, tuple[list[str], list[int]]] = {}
        self._connection: Any = None

    def __repr__(self) -> str:
        return f"RunFolder('{self.path}')"

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    # -- what the manifest says -------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.get("config") or {}

    @property
    def name(self) -> str:
        """The run's name (config `name`, else the folder's name)."""
        return str(self.config.get("name") or self.path.resolve().name)

    @property
    def model(self) -> str:
        return model_name(self.manifest)

    @property
    def level(self) -> str:
        return run_level(self.manifest)

    @property
    def shape(self) -> tuple[int, int]:
        """(n_layers, n_heads) from the manifest's provenance, else from heads.parquet."""
        provenance = self.manifest.get("provenance") or {}
        if provenance.get("n_layers") and provenance.get("n_heads"):
            return int(provenance["n_layers"]), int(provenance["n_heads"])
        heads = self.heads()
        return int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1

    # -- tables -------------------------------------------------------------------------------------------
    def file(self, table: str) -> Path:
        """The file of a table (`documents`, `tokens`, `words`, `verification`, `heads`, `head_similarity`)."""
        return self.path / TABLES[table]

    def has(self, table: str) -> bool:
        return self.file(table).is_file()

    def table(
        self, table: str, doc_ids: Sequence[int] | None = None, columns: Sequence[str] | None = None
    ) -> pd.DataFrame:
        """A table as a DataFrame (only `doc_ids`' rows, only `columns` when given); a UserError if the run
        did not write it."""
        file = self.file(table)
        if not file.is_file():
            status = self.manifest.get("status", "unknown")
            raise UserError(
                f"run '{self.path}' has no {file.name} (status: {status}); finish it with `extractor run ... --resume`"
            )
        dataset = ds.dataset(file, format="parquet")
        wanted = None if columns is None else [c for c in columns if c in dataset.schema.names]
        condition = None if doc_ids is None else ds.field("doc_id").isin([int(d) for d in doc_ids])
        return dataset.to_table(columns=wanted, filter=condition).to_pandas()

    def optional(self, table: str) -> pd.DataFrame | None:
        """A table, or None when the run did not write it (heads.parquet of an unfinished run, words at level
        token)."""
        return self.table(table) if self.has(table) else None

    def documents(self) -> pd.DataFrame:
        return self.table("documents")

    def tokens(self, doc_ids: Sequence[int] | None = None) -> pd.DataFrame:
        return self.table("tokens", doc_ids)

    def words(self, doc_ids: Sequence[int] | None = None) -> pd.DataFrame:
        return self.table("words", doc_ids)

    def heads(self) -> pd.DataFrame:
        """heads.parquet: one row per (layer, head) with one column per metric."""
        return self.table("heads")

    def head_similarity(self) -> pd.DataFrame:
        """head_similarity.parquet: layer_a, head_a, layer_b, head_b, js_divergence, n_rows."""
        return self.table("head_similarity")

    def verification(self) -> pd.DataFrame:
        return self.table("verification")

    def usable_doc_ids(self) -> list[int]:
        """Documents with status ok by doc_id, then truncated ones (what readers show first)."""
        documents = self.table("documents", columns=["doc_id", "status"])
        usable = documents[documents["status"].isin(USABLE_STATUSES)]
        usable = usable.assign(_rank=(usable["status"] != "ok").astype(int)).sort_values(["_rank", "doc_id"])
        return [int(d) for d in usable["doc_id"]]

    def first_ok_doc(self) -> int:
        """The first document with status ok (or truncated) in documents.parquet, else tokens.parquet's first."""
        if self.has("documents"):
            documents = self.table("documents", columns=["doc_id", "status"])
            usable = documents[documents["status"].isin(USABLE_STATUSES)]
            if not usable.empty:
                return int(usable["doc_id"].min())
        tokens = self.table("tokens", columns=["doc_id"])
        if tokens.empty:
            raise UserError(f"run '{self.path}' has no documents")
        return int(tokens["doc_id"].min())

    # -- text and labels ------------------------------------------------------------------------------------
    def stored_texts(self, doc_ids: Sequence[int]) -> dict[int, str] | None:
        """doc_id → the document's original text (documents.parquet `text`); None for runs written before
        documents kept their text."""
        documents = self.table("documents", doc_ids, columns=["doc_id", "text"]) if self.has("documents") else None
        if documents is None or "text" not in documents:
            return None
        return {int(d): t for d, t in zip(documents["doc_id"], documents["text"], strict=True) if t is not None}

    def pair_texts(self, doc_ids: Sequence[int]) -> dict[int, str]:
        """doc_id → a sentence pair's second text (documents.parquet `text_pair`), for the pairs among `doc_ids`."""
        documents = self.table("documents", doc_ids) if self.has("documents") else None
        if documents is None or "text_pair" not in documents:
            return {}
        return {int(d): t for d, t in zip(documents["doc_id"], documents["text_pair"], strict=True) if isinstance(t, str)}

    def texts(self, doc_ids: Sequence[int]) -> dict[int, str]:
        """doc_id → the document's original text; runs written before documents kept their text get it
        rebuilt from their tokens (`text_from_tokens`)."""
        stored = self.stored_texts(doc_ids)
        if stored is not None:
            return stored
        tokens = self.tokens(doc_ids).sort_values(["doc_id", "position"])
        return {int(d): text_from_tokens(rows) for d, rows in tokens.groupby("doc_id", sort=False)}

    def position_labels(self, doc_ids: Sequence[int]) -> dict[int, tuple[list[str], list[int]]]:
        """doc_id → (labels of its positions, the positions that are special): tokens at level token, words at
        level word, in position order (`position_label`)."""
        wanted = [int(d) for d in doc_ids if int(d) not in self._labels]
        if wanted:
            if self.level == "word":
                units, position, token = self.words(wanted), "word_index", "word"
            else:
                units, position, token = self.tokens(wanted), "position", "token"
            texts = self.stored_texts(wanted) or {}  # spans index the original text only
            pairs = self.pair_texts(wanted)  # a sentence pair's segment-1 spans index its second text
            for doc_id, rows in units.groupby("doc_id", sort=False):
                rows = rows.drop_duplicates(position).sort_values(position)
                own = (texts.get(int(doc_id)), pairs.get(int(doc_id)))
                segments = rows["segment"] if "segment" in rows else [0] * len(rows)
                labels = [""] * (int(rows[position].max()) + 1)
                for pos, unit, start, end, segment in zip(
                    rows[position], rows[token], rows["char_start"], rows["char_end"], segments, strict=True
                ):
                    labels[int(pos)] = position_label(own[int(segment)], int(start), int(end), str(unit))
                special = [int(p) for p, s in zip(rows[position], rows["is_special"], strict=True) if s]
                self._labels[int(doc_id)] = (labels, special)
        return {int(d): self._labels[int(d)] for d in doc_ids if int(d) in self._labels}

    def labels(self, doc_id: int) -> list[str]:
        """One document's position labels; a UserError listing the run's doc ids if it is not in the run."""
        found = self.position_labels([doc_id]).get(int(doc_id))
        if found is None:
            table = "words" if self.level == "word" else "tokens"
            known = sorted(int(d) for d in self.table(table, columns=["doc_id"])["doc_id"].unique())
            shown = ", ".join(map(str, known[:10])) + (", ..." if len(known) > 10 else "")
            raise UserError(f"document {doc_id} is not in run '{self.path}'; its doc ids are: {shown}")
        return found[0]

    # -- associations ---------------------------------------------------------------------------------------
    def association_files(self) -> list[Path]:
        return association_files(self.path)

    def has_associations(self) -> bool:
        """Whether the run stored associations (storage: summary stores none)."""
        return bool(self.association_files())

    def _dataset(self) -> ds.Dataset:
        files = self.association_files()
        if not files:
            storage = self.config.get("storage", "unknown")
            raise UserError(
                f"run '{self.path}' stored no associations (storage: {storage}); "
                "rerun with storage dense, topk or threshold to draw a document's attention"
            )
        return ds.dataset(files, format="parquet")

    def stored_measures(self) -> list[str]:
        """Measure columns present in the associations dataset (e.g. attention, value_norm, rollout)."""
        return measure_columns(self._dataset().schema.names)

    def is_top_k(self) -> bool:
        """Whether only the top-k keys per row were stored (absent cells read as 0)."""
        return "kept_mass" in self._dataset().schema.names

    def associations(
        self,
        doc_ids: Sequence[int],
        measures: Sequence[str] | None = None,
        layer: int | None = None,
        head: int | None = None,
        heads_only: bool = False,
    ) -> pd.DataFrame:
        """The stored association rows of `doc_ids`, one row per cell (windows merged: `merge_windows`).

        measures: the measure columns to read (default every stored one; those not stored are left out);
        layer, head: only that layer's / head's rows (head -1: the layer-level rows); heads_only: no
        layer-level rows.
        """
        dataset = self._dataset()
        names = dataset.schema.names
        stored = measure_columns(names)
        wanted = [m for m in (measures if measures is not None else names) if m in stored]
        matrices = is_matrix_schema(dataset.schema)
        index = ["doc_id", "layer", "head", POSITIONS] if matrices else list(CELL_KEYS)
        columns = [*index, *wanted, *(c for c in ("kept_mass", "window") if c in names)]
        ids = [int(d) for d in doc_ids]
        conditions = [f"doc_id IN ({', '.join(map(str, ids))})" if ids else "false"]
        if layer is not None:
            conditions.append(f"layer = {int(layer)}")
        if head is not None:
            conditions.append(f"head = {int(head)}")
        if heads_only:
            conditions.append("head >= 0")
        rows = self._scan(columns, " AND ".join(conditions))
        return merge_windows(expand(rows) if matrices else rows.to_pandas())

    def _scan(self, columns: list[str], where: str) -> pa.Table:
        """The association parts' `columns` on the rows `where` (SQL over integer columns), in stored order.

        DuckDB scans the parts in parallel and prunes by each row group's statistics: 4× faster than a pyarrow
        dataset filter on the report's 50 documents of a 400-document run (0.12 against 0.5 s). It reads dense
        parts' float16 matrices as float32."""
        import duckdb

        files = ", ".join("'" + str(f).replace("'", "''") + "'" for f in self.association_files())
        select = ", ".join(f'"{c}"' for c in columns)
        with duckdb.connect() as connection:
            return connection.sql(f"SELECT {select} FROM read_parquet([{files}]) WHERE {where}").to_arrow_table()

    def _dense(self, doc_id: int, measure: str, layer: int | None, head: int | None) -> tuple[np.ndarray, list[str]]:
        """Stored cells of one document → ([layers read, heads read, query, key] float32, labels [position])."""
        n_layers, n_heads = self.shape
        _check_index("layer", layer, n_layers)
        _check_index("head", head, n_heads)
        if measure not in self.stored_measures():
            raise UserError(
                f"measure '{measure}' was not stored in run '{self.path}'; "
                f"stored: {', '.join(self.stored_measures())}"
            )
        labels = self.labels(doc_id)
        cells = self.associations([doc_id], [measure], layer, head, heads_only=True).dropna(subset=[measure])
        shape = (1 if layer is not None else n_layers, 1 if head is not None else n_heads, len(labels), len(labels))
        dense = np.zeros(shape, dtype=np.float32)  # [layer, head, query, key]
        index = (
            cells["layer"].to_numpy(dtype=np.int64) - (layer or 0),
            cells["head"].to_numpy(dtype=np.int64) - (head or 0),
            cells["query_pos"].to_numpy(dtype=np.int64),
            cells["key_pos"].to_numpy(dtype=np.int64),
        )
        dense[index] = cells[measure].to_numpy(dtype=np.float32)
        return dense, labels

    def doc_matrices(self, doc_id: int, measure: str = "attention") -> tuple[np.ndarray, list[str]]:
        """One document, every head → ([layer, head, query, key] float32, labels [position]).

        Cells that were not stored (top-k, threshold, causal upper triangle) are 0; cells of overlapping
        windows are averaged (`merge_windows`).
        """
        return self._dense(doc_id, measure, layer=None, head=None)

    def doc_matrix(
        self, doc_id: int, layer: int, head: int, measure: str = "attention"
    ) -> tuple[np.ndarray, list[str]]:
        """One head's matrix for one document → ([query, key] float32, labels [position]); see `doc_matrices`."""
        dense, labels = self._dense(doc_id, measure, layer=layer, head=head)
        return dense[0, 0], labels

    # -- SQL --------------------------------------------------------------------------------------------------
    def views(self) -> dict[str, list[Path]]:
        """view name → the Parquet files it reads (`associations` and every table the run wrote)."""
        views = {"associations": self.association_files()} if self.has_associations() else {}
        if views and self.stores_matrices():
            views = {MATRICES_VIEW: views["associations"]}
        views.update({name: [self.file(name)] for name in TABLES if self.has(name)})
        return views

    def stores_matrices(self) -> bool:
        """Whether the associations are stored as matrices (storage dense, `extractor.corpus.matrices`)."""
        return self.has_associations() and is_matrix_schema(self._dataset().schema)

    def derived_views(self) -> dict[str, str]:
        """view name → SQL over `views()`: a dense run's `associations` in the long format, from its matrices."""
        if not self.stores_matrices():
            return {}
        names = self._dataset().schema.names
        return {"associations": long_view_sql(MATRICES_VIEW, measure_columns(names), "window" in names)}

    def connect(self) -> Any:  # duckdb.DuckDBPyConnection
        """A new read-only DuckDB connection with one view per table (extractor.corpus.query); the caller
        closes it."""
        return read_only_connection(self.views(), self.derived_views())

    def _shared_connection(self) -> Any:
        if self._connection is None:
            self._connection = self.connect()
        return self._connection

    def sql(self, query: str) -> Any:  # duckdb.DuckDBPyRelation
        """A DuckDB relation over the run's views (lazy: `.df()`, `.arrow()`, `.fetchall()` read it)."""
        import duckdb

        try:
            return self._shared_connection().sql(query)
        except duckdb.Error as exc:
            raise UserError(f"query failed: {first_line(exc)}") from None

    def relation(self, name: str) -> Any:  # duckdb.DuckDBPyRelation
        """One view (`associations`, `documents`, `tokens`, ...) as a DuckDB relation."""
        views = {**self.views(), **self.derived_views()}
        if name not in views:
            raise UserError(f"run '{self.path}' has no table '{name}'; it has: {', '.join(views)}")
        return self._shared_connection().view(name)

    def fetch(self, query: str) -> pd.DataFrame:
        """Run `query` on a fresh read-only connection → its rows."""
        con = self.connect()
        try:
            return fetch(con, query, damaged=lambda: bool(damaged_files(self.path)), missing=self.why_missing)
        finally:
            con.close()

    def stream(self, query: str, rows: int = 1 << 16) -> Iterator[pa.RecordBatch]:
        """Run `query` (what `extractor query` prints) on a fresh read-only connection and yield its rows `rows`
        at a time: a result larger than memory is never held whole."""
        con = self.connect()
        try:
            yield from stream(con, query, damaged=lambda: bool(damaged_files(self.path)), missing=self.why_missing,
                              rows=rows)
        finally:
            con.close()

    def why_missing(self, view: str) -> str | None:
        """Why this run has no view `view`, when it is one a run can have but this one did not write."""
        if view == "associations" and not self.has_associations():
            storage = self.config.get("storage", "unknown")
            return (f"run '{self.path}' stored no associations (storage: {storage}): its per-head metrics are in "
                    "heads; rerun with storage topk, dense or threshold for pair tables")
        if view in TABLES and not self.has(view):
            return f"run '{self.path}' has no {TABLES[view]}" + (" (set agreement: true)" if view == "agreement" else "")
        return None


def open_run(path: str | Path | RunFolder) -> RunFolder:
    """Open a run's output folder for reading (an open RunFolder is returned as it is); a UserError when
    `path` is not one."""
    return path if isinstance(path, RunFolder) else RunFolder(path)


# -- the same rules for one call (commands and tests that read one thing) -----------------------------------
def run_name(run_dir: str | Path, manifest: dict[str, Any] | None = None) -> str:
    """The run's name (config `name`, else the folder's name)."""
    manifest = read_manifest(run_dir) if manifest is None else manifest
    return str(manifest.get("config", {}).get("name") or Path(run_dir).resolve().name)


def read_heads(run_dir: str | Path) -> pd.DataFrame:
    return open_run(run_dir).heads()


def read_similarity(run_dir: str | Path) -> pd.DataFrame:
    return open_run(run_dir).head_similarity()


def heads_shape(run_dir: str | Path) -> tuple[int, int]:
    return open_run(run_dir).shape


def has_associations(run_dir: str | Path) -> bool:
    return bool(association_files(run_dir))


def stored_measures(run_dir: str | Path) -> list[str]:
    return open_run(run_dir).stored_measures()


def is_top_k(run_dir: str | Path) -> bool:
    return open_run(run_dir).is_top_k()


def first_ok_doc(run_dir: str | Path) -> int:
    return open_run(run_dir).first_ok_doc()


def doc_labels(run_dir: str | Path, doc_id: int) -> list[str]:
    return open_run(run_dir).labels(doc_id)


def doc_matrices(run_dir: str | Path, doc_id: int, measure: str = "attention") -> tuple[np.ndarray, list[str]]:
    return open_run(run_dir).doc_matrices(doc_id, measure)


def doc_matrix(
    run_dir: str | Path, doc_id: int, layer: int, head: int, measure: str = "attention"
) -> tuple[np.ndarray, list[str]]:
    return open_run(run_dir).doc_matrix(doc_id, layer, head, measure)
