"""The run's output folder, written part by part so that a crash loses nothing already committed.

    OUTPUT/
      manifest.json            config, provenance, counts, status, timings
      documents.parquet        one row per input line or row (doc_id, source, line, n_tokens, status, reason,
                               text: the record's original text)
      tokens.parquet           one row per token
      words.parquet            one row per word (level: word)
      associations/part-*.parquet   pair tables; each part sorted by (layer, head, doc_id, query_pos) with
                               one row group per layer, so filters on layer/head skip most of the data
                               (storage dense: one row per (layer, head, doc_id) holding the matrix,
                               `extractor.corpus.matrices`)
      verification.parquet     max errors per (layer, head) vs Hugging Face
      heads.parquet, head_similarity.parquet   per-head metrics over the corpus

A part is committed in this order: every file under a temporary name then renamed into place, then the
commit record `_parts/NNNNNN.done` (its doc ids, a fingerprint of each record's text, and the files it
commits). On `--resume` of an unfinished run, parts whose commit record is missing or damaged, or whose files
are unreadable, are deleted and their documents processed again; the committed documents are skipped, so the
finished outputs equal an uninterrupted run's. A run whose manifest says `complete` has folded its parts: its
association files are final and nothing of them is ever deleted by `--resume`.
"""

from __future__ import annotations

import copyreg
import errno
import io
import json
import os
import pickle
import shutil
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from extractor.corpus.faults import checkpoint
from extractor.corpus.lock import FolderLock
from extractor.corpus.matrices import CELLS_METADATA, is_matrix_schema, visible_cell_count
from extractor.corpus.run_folder import RUN_FILES
from extractor.errors import UserError

DOCUMENT_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.int64()),
        pa.field("source", pa.string()),
        pa.field("line", pa.int64()),
        pa.field("n_tokens", pa.int32()),
        pa.field("n_windows", pa.int16()),
        pa.field("status", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("text", pa.string()),  # the record's original text (token char spans index into it)
        pa.field("text_pair", pa.string()),  # a sentence pair's second text (spans of segment-1 tokens index into it)
        pa.field("source_id", pa.string()),  # the record's own id (id_field), as text
    ]
)


def document_schema(kept_fields: list[str]) -> pa.Schema:
    """documents.parquet's columns: DOCUMENT_SCHEMA, then one text column per kept input field (keep_fields)."""
    return pa.schema([*DOCUMENT_SCHEMA, *(pa.field(name, pa.string()) for name in kept_fields)])


Compression = Literal["lz4", "zstd"]  # the association parts' codecs (`RunConfig.compression`)
DEFAULT_COMPRESSION: Compression = "lz4"


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
    compression: Compression = DEFAULT_COMPRESSION  # the association part's codec (`RunConfig.compression`)
    fingerprints: list[str] = field(default_factory=list)  # per document row: `record_fingerprint` of its record

    @property
    def doc_ids(self) -> list[int]:
        return [int(d["doc_id"]) for d in self.documents]


def _read_marker(path: Path) -> dict[str, Any] | None:
    """A part's commit record, or None when it is unreadable (then the part counts as uncommitted)."""
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(marker, dict) and isinstance(marker.get("doc_ids"), list) \
                and all(isinstance(d, int) for d in marker["doc_ids"]):
            return marker
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    return None


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary name in the same folder, then rename (atomic on POSIX)."""
    # The process id keeps two writers of the same part (a Ray retry beside a worker thought dead) apart.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def state_bytes(state: dict[str, Any]) -> bytes:
    """A part's accumulators (verification, head statistics) pickled with torch tensors as NumPy arrays, which
    `pickle.loads` turns back into (CPU) tensors: for MiniLM's head statistics 0.4 ms to write and 0.4 ms to read
    back, against 3.5 and 6.4 ms through torch's own pickling, once per part each way."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    torch = sys.modules.get("torch")  # no torch loaded: no tensor to write
    if torch is not None:
        pickler.dispatch_table = {**copyreg.dispatch_table, torch.Tensor: _tensor_as_array}
    pickler.dump(state)
    return buffer.getvalue()


def _tensor_as_array(tensor: Any) -> tuple[Any, ...]:
    """pickle's reduction of a tensor: torch.from_numpy of its values on the CPU (dtypes NumPy lacks, such as
    bfloat16, keep torch's own)."""
    import torch

    try:
        return torch.from_numpy, (tensor.detach().cpu().numpy(),)
    except TypeError:
        return tensor.__reduce_ex__(pickle.HIGHEST_PROTOCOL)


def _write_table(table: pa.Table, path: Path) -> None:
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def write_associations(table: pa.Table, path: Path, ordered: bool = False,
                       compression: Compression = DEFAULT_COMPRESSION) -> None:
    """One file, sorted by (layer, head, doc_id) with one row group per layer, so layer/head filters skip data.

    compression: the codec of every column but doc_id, "lz4" (Parquet's LZ4_RAW) or "zstd". On top-k parts of
    32 and 128 tokens lz4 wrote 25–30% faster than zstd, for 15–19% more bytes on the sample corpus's top-k and
    threshold tables (zstd's fastest negative levels sat in between, nearer zstd's time than lz4's).

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
    if is_matrix_schema(table.schema):  # dense: the long-format row count, for the manifest (`association_rows`)
        table = table.replace_schema_metadata({CELLS_METADATA: str(visible_cell_count(table))})
    starts = np.flatnonzero(layers[1:] != layers[:-1]) + 1 if len(layers) else np.array([], dtype=np.int64)
    bounds = [0, *starts.tolist(), len(layers)] if len(layers) else [0]

    def write(tmp: Path) -> None:
        # Per column, the cheapest encoding that keeps the bytes (a 128-token top-k part with zstd: 210 → 182 ms,
        # 1% more bytes): doc_id a dictionary, not compressed (its indices are run-length encoded, a few bytes a
        # run); key_pos a dictionary; every other column plain (a dictionary hashes every value: on layer and head
        # it cost more than the codec does on their runs, and on the float measures it never fits). Statistics on
        # the index columns, which filters read.
        names = table.column_names
        index = [c for c in ("doc_id", "layer", "head", "query_pos", "key_pos", "window") if c in names]
        codecs = {c: "none" if c == "doc_id" else compression for c in names}
        dictionary = [c for c in ("doc_id", "key_pos") if c in names]
        with pq.ParquetWriter(tmp, table.schema, compression=codecs, use_dictionary=dictionary,
                              write_statistics=index) as writer:
            for start, end in zip(bounds[:-1], bounds[1:], strict=True):
                writer.write_table(table.slice(start, end - start), row_group_size=1 << 22)

    _atomic_write(path, write)


class OutputFolder:
    """Owns OUTPUT/: refuses to clobber, locks, resumes, commits parts (in a background thread), consolidates."""

    def __init__(self, path: str | Path, attach: bool = False) -> None:
        """`attach`: write parts into a folder another process prepared, locked and owns (a Ray worker): no
        checks and no clean-up, which would delete the parts other workers are writing."""
        self.path = Path(path)
        self.parts_dir = self.path / "_parts"
        self.associations_dir = self.path / "associations"
        self.lock = FolderLock(self.path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        self._pending: list[Future[None]] = []
        self._committed = 0  # parts this process committed (for the fault-injection checkpoints)

    @classmethod
    def open(cls, path: str | Path, resume: bool = False, overwrite: bool = False,
             protect: Path | None = None) -> OutputFolder:
        """Lock OUTPUT/ for this process and prepare it; the caller releases it with `close()`.

        `protect`: the input file; an output folder that holds it is refused (`--overwrite` would delete it).
        """
        folder = cls(path)
        if folder.path.exists() and not folder.path.is_dir():
            raise UserError(f"output '{folder.path}' exists and is not a folder")
        if protect is not None and folder.path.resolve() in protect.resolve().parents:
            raise UserError(f"input '{protect}' is inside the output folder '{folder.path}'; choose another output folder")
        folder.lock.acquire()
        try:
            folder._prepare(resume, overwrite)
        except BaseException:
            folder.close()
            raise
        return folder

    # -- set-up -----------------------------------------------------------------------------------
    def _prepare(self, resume: bool, overwrite: bool) -> None:
        occupied = [child for child in self.path.iterdir() if not self._skeleton(child)]
        if occupied and not (resume or overwrite):
            raise UserError(
                f"output folder '{self.path}' is not empty; pass --resume to finish that run or --overwrite to replace it"
            )
        written = [child for child in occupied if self._is_run_file(child)]
        if overwrite and not resume:
            for child in written:  # only what a run writes: the user's other files stay
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        try:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            self.associations_dir.mkdir(exist_ok=True)
            probe = self.parts_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"output folder '{self.path}' is not writable ({exc.strerror})") from None

    @staticmethod
    def _is_run_file(child: Path) -> bool:
        """A file or folder a run writes (its final outputs, or what a crash left half-written)."""
        name = child.name
        return name in RUN_FILES or name.endswith(".tmp") or name.startswith("plots.")

    def _skeleton(self, child: Path) -> bool:
        """True for what an empty output holds: .gitkeep, the lock, or the empty folders a run that failed early
        created."""
        if child.name in (".gitkeep", self.lock.path.name):
            return True
        return child in (self.parts_dir, self.associations_dir) and child.is_dir() and not any(child.iterdir())

    def committed_markers(self) -> dict[int, dict[str, Any]]:
        """part → its commit record, for the parts whose record is readable, in part order (each read once)."""
        markers = {int(p.name.split(".")[0]): _read_marker(p) for p in self.parts_dir.glob("*.done")}
        return {part: marker for part, marker in sorted(markers.items()) if marker is not None}

    def committed_parts(self) -> list[int]:
        """Parts with a readable commit record, in order."""
        return list(self.committed_markers())

    def committed_doc_ids(self) -> set[int]:
        return {doc_id for marker in self.committed_markers().values() for doc_id in marker["doc_ids"]}

    def committed_fingerprints(self) -> dict[int, str]:
        """doc_id → fingerprint of the record's text when it was committed (parts that recorded one)."""
        prints: dict[int, str] = {}
        for marker in self.committed_markers().values():
            prints.update(zip(marker["doc_ids"], marker.get("fingerprints", []), strict=False))
        return prints

    def next_part_id(self) -> int:
        parts = self.committed_parts()
        return parts[-1] + 1 if parts else 0

    def damaged_parts(self) -> list[tuple[int, str]]:
        """Committed parts whose state or files cannot be read back: (part, what is wrong)."""
        damaged = []
        for part, marker in self.committed_markers().items():
            files = marker.get("files") or [f"_parts/{part:06d}.documents.parquet"]
            try:
                pickle.loads((self.parts_dir / f"{part:06d}.state.pkl").read_bytes())
                for name in files:
                    pq.ParquetFile(self.path / name).metadata  # noqa: B018 - reads and checks the footer
            except Exception as exc:  # any unreadable file: the part is redone, never trusted
                damaged.append((part, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
        return damaged

    def discard_uncommitted(self, quiet: bool = False) -> None:
        """Before resuming an unfinished run: delete what a crash left half-written (temporary files, parts
        without a readable commit record, parts whose files are damaged). Never call it on a complete run."""
        for part, problem in self.damaged_parts():
            if not quiet:
                print(f"warning: part {part} is damaged ({problem}); its documents will be processed again",
                      file=sys.stderr)
            (self.parts_dir / f"{part:06d}.done").unlink()
        committed = {f"{p:06d}" for p in self.committed_parts()}
        for file in [*self.parts_dir.iterdir(), *self.associations_dir.iterdir()]:
            stem = file.name.removeprefix("part-").split(".")[0]
            if file.name.endswith(".tmp") or stem not in committed:
                shutil.rmtree(file) if file.is_dir() else file.unlink()

    def discard_leftovers(self) -> None:
        """After a complete run was interrupted while tidying up: remove its folded parts and temporary files
        (the final files, associations included, are kept)."""
        self.remove_parts()
        for file in [*self.path.iterdir(), *self.associations_dir.iterdir()]:
            if file.name.endswith(".tmp") or file.name.startswith("plots."):
                shutil.rmtree(file) if file.is_dir() else file.unlink()

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
        """Wait for the writer, stop it and release the folder's lock."""
        try:
            self.flush()
        finally:
            self._executor.shutdown(wait=True)
            self.lock.release()

    def _commit(self, part: Part) -> None:
        name = f"{part.part_id:06d}"
        files = []
        if part.associations is not None and part.associations.num_rows:
            files.append(f"associations/part-{name}.parquet")
            write_associations(part.associations, self.path / files[-1], part.associations_ordered, part.compression)
        kept = [name for name in part.documents[0] if name not in DOCUMENT_SCHEMA.names] if part.documents else []
        documents = pa.Table.from_pylist(part.documents, schema=document_schema(kept))
        files.append(f"_parts/{name}.documents.parquet")
        _write_table(documents, self.path / files[-1])
        for label, table in (("tokens", part.tokens), ("words", part.words)):
            if table is not None:
                files.append(f"_parts/{name}.{label}.parquet")
                _write_table(table, self.path / files[-1])
        _atomic_write(self.parts_dir / f"{name}.state.pkl", lambda tmp: tmp.write_bytes(state_bytes(part.state)))
        marker = json.dumps({"doc_ids": part.doc_ids, "fingerprints": part.fingerprints, "files": files})
        _atomic_write(self.parts_dir / f"{name}.done", lambda tmp: tmp.write_text(marker))
        self._committed += 1
        checkpoint(f"part:{self._committed - 1}")

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

        try:
            _atomic_write(target, write)
        except duckdb.Error as exc:  # out of disk while folding, most often: DuckDB raises its own errors
            raise OSError(errno.EIO, f"could not fold the parts into {target.name} ({str(exc).splitlines()[0]})",
                          str(target)) from None
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
        """manifest.json, None before a run wrote one; a UserError when it is damaged (nothing is touched)."""
        file = self.path / "manifest.json"
        if not file.exists():
            return None
        try:
            manifest = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            manifest = exc
        if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
            raise UserError(
                f"'{file}' is damaged, so whether the run finished and with which settings is unknown; "
                "nothing was changed: rerun with --overwrite to start again"
            )
        return manifest

    def remove_parts(self) -> None:
        """After consolidation the per-part documents/tokens/states are folded into the final files."""
        if not self.parts_dir.is_dir():
            return
        files = sorted(self.parts_dir.iterdir())
        for i, file in enumerate(files):
            if i == len(files) // 2:
                checkpoint("removing-parts")
            shutil.rmtree(file) if file.is_dir() else file.unlink()
        self.parts_dir.rmdir()
