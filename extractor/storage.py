"""The run's output folder, written part by part so that a crash loses nothing already committed.

    OUTPUT/
      manifest.json            config, provenance, counts, status, timings
      documents.parquet        one row per input line or row (doc_id, source, line, n_tokens, status, reason)
      tokens.parquet           one row per token
      words.parquet            one row per word (level: word)
      associations/part-*.parquet   pair tables; each part sorted by (layer, head, doc_id, query_pos) with
                               one row group per layer, so filters on layer/head skip most of the data
      verification.parquet     max errors per (layer, head) vs Hugging Face
      heads.parquet, head_similarity.parquet   per-head metrics over the corpus

A part is committed in this order: every file under a temporary name then renamed into place, then the
commit record `_parts/NNNNNN.done`. On `--resume`, files of parts without a commit record are deleted and
the committed documents are skipped, so the finished outputs equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError

DOCUMENT_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.int64()),
        pa.field("source", pa.string()),
        pa.field("line", pa.int64()),
        pa.field("n_tokens", pa.int32()),
        pa.field("n_windows", pa.int16()),
        pa.field("status", pa.string()),
        pa.field("reason", pa.string()),
    ]
)


@dataclass
class Part:
    """Everything one batch adds to the outputs."""

    part_id: int
    documents: list[dict[str, Any]]
    tokens: pa.Table | None = None
    words: pa.Table | None = None
    associations: pa.Table | None = None
    state: dict[str, Any] = field(default_factory=dict)  # picklable accumulators (verification, head stats)
    associations_ordered: bool = False  # rows already in (layer, head, doc_id) order: the writer skips its sort

    @property
    def doc_ids(self) -> list[int]:
        return [int(d["doc_id"]) for d in self.documents]


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary name in the same folder, then rename (atomic on POSIX)."""
    # The process id keeps two writers of the same part (a Ray retry beside a worker thought dead) apart.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_table(table: pa.Table, path: Path) -> None:
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def write_associations(table: pa.Table, path: Path, ordered: bool = False) -> None:
    """One file, sorted by (layer, head, doc_id) with one row group per layer, so layer/head filters skip data.

    `ordered`: the rows already come in that order (a token-level batch's table does), so only the layer
    boundaries are looked up. Otherwise rows of one document arrive in (layer, head, query_pos, key_pos)
    order, and a stable sort on a single integer key keeps query/key order within each (layer, head, doc) at a
    fraction of a multi-key sort's cost.
    """
    layer = table["layer"].to_numpy()
    if ordered:
        layers = layer
    else:
        layer = layer.astype(np.int64)
        head = table["head"].to_numpy().astype(np.int64) + 1  # head -1 (layer-level rows) sorts first
        doc = table["doc_id"].to_numpy()
        doc_rank = doc - doc.min() if len(doc) else doc
        key = (layer * (int(head.max(initial=0)) + 1) + head) * (int(doc_rank.max(initial=0)) + 1) + doc_rank
        order = np.argsort(key, kind="stable")
        table = table.take(pa.array(order))
        layers = layer[order]
    starts = np.flatnonzero(layers[1:] != layers[:-1]) + 1 if len(layers) else np.array([], dtype=np.int64)
    bounds = [0, *starts.tolist(), len(layers)] if len(layers) else [0]

    def write(tmp: Path) -> None:
        # Dictionary encoding and statistics only where they pay: the index columns. On the float measures a
        # dictionary never fits (it is tried, then abandoned), which cost ~40% of the write time and bytes.
        index = [c for c in ("doc_id", "layer", "head", "query_pos", "key_pos", "window") if c in table.column_names]
        with pq.ParquetWriter(tmp, table.schema, compression="zstd", use_dictionary=index,
                              write_statistics=index) as writer:
            for start, end in zip(bounds[:-1], bounds[1:], strict=True):
                writer.write_table(table.slice(start, end - start), row_group_size=1 << 22)

    _atomic_write(path, write)


class OutputFolder:
    """Owns OUTPUT/: refuses to clobber, resumes, commits parts (in a background thread), consolidates."""

    def __init__(
        self, path: str | Path, resume: bool = False, overwrite: bool = False, attach: bool = False
    ) -> None:
        """`attach`: write parts into a folder another process prepared and owns (a Ray worker): no checks and
        no clean-up, which would delete the parts other workers are writing."""
        self.path = Path(path)
        self.parts_dir = self.path / "_parts"
        self.associations_dir = self.path / "associations"
        if not attach:
            self._prepare(resume, overwrite)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        self._pending: list[Future[None]] = []

    # -- set-up -----------------------------------------------------------------------------------
    def _prepare(self, resume: bool, overwrite: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"output '{self.path}' exists and is not a folder")
        occupied = self.path.is_dir() and any(not self._skeleton(p) for p in self.path.iterdir())
        if occupied and not (resume or overwrite):
            raise UserError(
                f"output folder '{self.path}' is not empty; pass --resume to finish that run or --overwrite to replace it"
            )
        if occupied and overwrite and not resume:
            for child in self.path.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        try:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            self.associations_dir.mkdir(exist_ok=True)
            probe = self.parts_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"output folder '{self.path}' is not writable ({exc.strerror})") from None
        if resume:
            self._drop_uncommitted()

    def _skeleton(self, child: Path) -> bool:
        """True for what an empty output holds: .gitkeep, or the empty folders a run that failed early created."""
        if child.name == ".gitkeep":
            return True
        return child in (self.parts_dir, self.associations_dir) and child.is_dir() and not any(child.iterdir())

    def committed_parts(self) -> list[int]:
        return sorted(int(p.name.split(".")[0]) for p in self.parts_dir.glob("*.done"))

    def committed_doc_ids(self) -> set[int]:
        done: set[int] = set()
        for marker in self.parts_dir.glob("*.done"):
            done.update(json.loads(marker.read_text())["doc_ids"])
        return done

    def next_part_id(self) -> int:
        parts = self.committed_parts()
        return parts[-1] + 1 if parts else 0

    def _drop_uncommitted(self) -> None:
        """Delete what a crash left half-written: temporary files and parts without a commit record."""
        committed = {f"{p:06d}" for p in self.committed_parts()}
        for file in [*self.parts_dir.iterdir(), *self.associations_dir.iterdir()]:
            stem = file.name.removeprefix("part-").split(".")[0]
            if file.name.endswith(".tmp") or stem not in committed:
                file.unlink()

    # -- parts --------------------------------------------------------------------------------------
    def submit(self, part: Part) -> None:
        """Commit `part` in the background; at most two parts wait in memory (bounded memory)."""
        while len(self._pending) >= 2:
            self._pending.pop(0).result()
        self._pending.append(self._executor.submit(self._commit, part))

    def flush(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._executor.shutdown(wait=True)

    def _commit(self, part: Part) -> None:
        name = f"{part.part_id:06d}"
        if part.associations is not None and part.associations.num_rows:
            write_associations(part.associations, self.associations_dir / f"part-{name}.parquet",
                               part.associations_ordered)
        documents = pa.Table.from_pylist(part.documents, schema=DOCUMENT_SCHEMA)
        _write_table(documents, self.parts_dir / f"{name}.documents.parquet")
        for label, table in (("tokens", part.tokens), ("words", part.words)):
            if table is not None:
                _write_table(table, self.parts_dir / f"{name}.{label}.parquet")
        _atomic_write(self.parts_dir / f"{name}.state.pkl", lambda tmp: tmp.write_bytes(pickle.dumps(part.state)))
        marker = json.dumps({"doc_ids": part.doc_ids})
        _atomic_write(self.parts_dir / f"{name}.done", lambda tmp: tmp.write_text(marker))

    # -- reading back -------------------------------------------------------------------------------
    def part_files(self, label: str) -> list[Path]:
        files = [self.parts_dir / f"{p:06d}.{label}.parquet" for p in self.committed_parts()]
        return [f for f in files if f.exists()]

    def consolidate(self, label: str, order_by: str) -> bool:
        """Fold every committed part's `label` table into OUTPUT/label.parquet, sorted by `order_by`.

        DuckDB sorts out of core (spilling to disk), so memory stays bounded however large the corpus.
        Returns False when no part has such a table.
        """
        import duckdb

        files = self.part_files(label)
        if not files:
            return False
        target = self.path / f"{label}.parquet"
        listing = ", ".join(f"'{f.as_posix()}'" for f in files)

        def write(tmp: Path) -> None:
            with duckdb.connect() as con:
                con.execute(f"SET temp_directory = '{(self.parts_dir / 'duckdb.tmp').as_posix()}'")
                con.execute(
                    f"COPY (SELECT * FROM read_parquet([{listing}]) ORDER BY {order_by}) "
                    f"TO '{tmp.as_posix()}' (FORMAT parquet, COMPRESSION zstd)"
                )

        _atomic_write(target, write)
        return True

    def part_states(self) -> Iterator[dict[str, Any]]:
        """Each committed part's accumulators, in part order, loaded one at a time."""
        for p in self.committed_parts():
            yield pickle.loads((self.parts_dir / f"{p:06d}.state.pkl").read_bytes())

    def write_table(self, name: str, table: pa.Table | pd.DataFrame) -> None:
        if isinstance(table, pd.DataFrame):
            table = pa.Table.from_pandas(table, preserve_index=False)
        _write_table(table, self.path / name)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        text = json.dumps(manifest, indent=2, default=str)
        _atomic_write(self.path / "manifest.json", lambda tmp: tmp.write_text(text))

    def read_manifest(self) -> dict[str, Any] | None:
        file = self.path / "manifest.json"
        return json.loads(file.read_text()) if file.exists() else None

    def remove_parts(self) -> None:
        """After consolidation the per-part documents/tokens/states are folded into the final files."""
        shutil.rmtree(self.parts_dir, ignore_errors=True)
