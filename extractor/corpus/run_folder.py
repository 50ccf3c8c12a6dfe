"""Reading a run's output folder back (what `extractor plot` and `extractor compare` need).

    OUTPUT/manifest.json            {"config", "provenance": {"model", "n_layers", "n_heads", ...}, ...}
    OUTPUT/heads.parquet            per-head metrics (extractor.heads.metrics)
    OUTPUT/head_similarity.parquet  JS divergence of every pair of heads (extractor.heads.similarity)
    OUTPUT/documents.parquet        doc_id, status, ...
    OUTPUT/tokens.parquet, words.parquet (level: word)
    OUTPUT/associations/            Parquet dataset: doc_id, layer, head, query_pos, key_pos, <measures>
                                    [, kept_mass]

Every mistake (not a run folder, unknown document, layer, head or measure) is a `UserError` that says how to
fix it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from extractor.errors import UserError

ASSOCIATION_KEYS = ("doc_id", "layer", "head", "query_pos", "key_pos", "kept_mass")


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """manifest.json of a run; a UserError when `run_dir` is not a run's output folder."""
    folder = Path(run_dir)
    file = folder / "manifest.json"
    if not file.is_file():
        raise UserError(f"'{run_dir}' is not a run output folder (no manifest.json); run `extractor run` first")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"'{file}' is not valid JSON ({exc.msg}); rerun `extractor run`") from None


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


def run_name(run_dir: str | Path, manifest: dict[str, Any] | None = None) -> str:
    """The run's name (config `name`, else the folder's name)."""
    manifest = read_manifest(run_dir) if manifest is None else manifest
    return str(manifest.get("config", {}).get("name") or Path(run_dir).resolve().name)


def model_name(manifest: dict[str, Any]) -> str:
    return str(
        manifest.get("provenance", {}).get("model") or manifest.get("config", {}).get("model") or "model"
    )


def run_level(manifest: dict[str, Any]) -> str:
    """'token' or 'word': the positions the associations are indexed by."""
    return str(manifest.get("config", {}).get("level") or "token")


def _read_run_table(run_dir: str | Path, name: str) -> pd.DataFrame:
    manifest = read_manifest(run_dir)
    file = Path(run_dir) / name
    if not file.is_file():
        status = manifest.get("status", "unknown")
        raise UserError(
            f"run '{run_dir}' has no {name} (status: {status}); finish it with `extractor run ... --resume`"
        )
    return pq.read_table(file).to_pandas()


def read_heads(run_dir: str | Path) -> pd.DataFrame:
    """heads.parquet: one row per (layer, head) with one column per metric."""
    return _read_run_table(run_dir, "heads.parquet")


def read_similarity(run_dir: str | Path) -> pd.DataFrame:
    """head_similarity.parquet: layer_a, head_a, layer_b, head_b, js_divergence, n_rows."""
    return _read_run_table(run_dir, "head_similarity.parquet")


def heads_shape(run_dir: str | Path) -> tuple[int, int]:
    """(n_layers, n_heads) from the manifest's provenance, else from heads.parquet."""
    provenance = read_manifest(run_dir).get("provenance", {})
    if "n_layers" in provenance and "n_heads" in provenance:
        return int(provenance["n_layers"]), int(provenance["n_heads"])
    heads = read_heads(run_dir)
    return int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1


def association_files(run_dir: str | Path) -> list[Path]:
    """The run's committed association parts (`associations/part-*.parquet`), in part order."""
    return sorted((Path(run_dir) / "associations").glob("part-*.parquet"))


def has_associations(run_dir: str | Path) -> bool:
    """Whether the run stored associations (storage: summary stores none)."""
    return bool(association_files(run_dir))


def _associations(run_dir: str | Path) -> ds.Dataset:
    if not has_associations(run_dir):
        storage = read_manifest(run_dir).get("config", {}).get("storage", "unknown")
        raise UserError(
            f"run '{run_dir}' stored no associations (storage: {storage}); "
            "rerun with storage dense, topk or threshold to draw a document's attention"
        )
    return ds.dataset(association_files(run_dir), format="parquet")


def stored_measures(run_dir: str | Path) -> list[str]:
    """Measure columns present in the associations dataset (e.g. attention, value_norm, rollout)."""
    return [name for name in _associations(run_dir).schema.names if name not in ASSOCIATION_KEYS]


def is_top_k(run_dir: str | Path) -> bool:
    """Whether only the top-k keys per row were stored (absent cells read as 0)."""
    return "kept_mass" in _associations(run_dir).schema.names


def first_ok_doc(run_dir: str | Path) -> int:
    """The first document with status ok (or truncated) in documents.parquet, else tokens.parquet's first."""
    documents = Path(run_dir) / "documents.parquet"
    if documents.is_file():
        frame = pq.read_table(documents, columns=["doc_id", "status"]).to_pandas()
        usable = frame[frame["status"].isin(["ok", "truncated"])]
        if not usable.empty:
            return int(usable["doc_id"].min())
    tokens = _read_run_table(run_dir, "tokens.parquet")
    if tokens.empty:
        raise UserError(f"run '{run_dir}' has no documents")
    return int(tokens["doc_id"].min())


def display_label(token: str) -> str:
    """A token as a plot label: GPT-2's 'Ġ' (a leading space) and 'Ċ' (newline) made readable."""
    return token.replace("Ġ", "").replace("Ċ", "\\n") or "␣"


def doc_labels(run_dir: str | Path, doc_id: int) -> list[str]:
    """Labels of a document's positions: tokens (level token) or words (level word), in position order."""
    if run_level(read_manifest(run_dir)) == "word":
        frame = _read_run_table(run_dir, "words.parquet")
        position, text = "word_index", "word"
    else:
        frame = _read_run_table(run_dir, "tokens.parquet")
        position, text = "position", "token"
    rows = frame[frame["doc_id"] == doc_id].drop_duplicates(position).sort_values(position)
    if rows.empty:
        known = sorted(int(d) for d in frame["doc_id"].unique())
        shown = ", ".join(map(str, known[:10])) + (", ..." if len(known) > 10 else "")
        raise UserError(f"document {doc_id} is not in run '{run_dir}'; its doc ids are: {shown}")
    labels = [""] * (int(rows[position].max()) + 1)
    for pos, label in zip(rows[position], rows[text], strict=True):
        labels[int(pos)] = display_label(str(label))
    return labels


def _check_index(name: str, value: int | None, size: int, allow_layer_level: bool = False) -> None:
    low = -1 if allow_layer_level else 0
    if value is not None and not low <= value < size:
        raise UserError(f"--{name} {value} is out of range; this run has {name}s 0..{size - 1}")


def _read_dense(
    run_dir: str | Path, doc_id: int, measure: str, layer: int | None, head: int | None
) -> tuple[np.ndarray, list[str]]:
    """Stored cells of one document → ([layers read, heads read, query, key] float32, labels [position])."""
    n_layers, n_heads = heads_shape(run_dir)
    _check_index("layer", layer, n_layers)
    _check_index("head", head, n_heads)
    dataset = _associations(run_dir)
    if measure not in dataset.schema.names or measure in ASSOCIATION_KEYS:
        raise UserError(
            f"measure '{measure}' was not stored in run '{run_dir}'; "
            f"stored: {', '.join(stored_measures(run_dir))}"
        )
    labels = doc_labels(run_dir, doc_id)
    condition = (ds.field("doc_id") == doc_id) & (ds.field("head") >= 0)
    if layer is not None:
        condition &= ds.field("layer") == layer
    if head is not None:
        condition &= ds.field("head") == head
    keys = ["layer", "head", "query_pos", "key_pos"]
    cells = dataset.to_table(columns=[*keys, measure], filter=condition).to_pandas().dropna(subset=[measure])
    if cells.duplicated(keys).any():  # windows of a long document that share (query, key) cells
        cells = cells.groupby(keys, as_index=False)[measure].mean()
    first_layer, first_head = layer or 0, head or 0
    shape = (
        1 if layer is not None else n_layers,
        1 if head is not None else n_heads,
        len(labels),
        len(labels),
    )
    dense = np.zeros(shape, dtype=np.float32)  # [layer, head, query, key]
    index = (
        cells["layer"].to_numpy(dtype=np.int64) - first_layer,
        cells["head"].to_numpy(dtype=np.int64) - first_head,
        cells["query_pos"].to_numpy(dtype=np.int64),
        cells["key_pos"].to_numpy(dtype=np.int64),
    )
    dense[index] = cells[measure].to_numpy(dtype=np.float32)
    return dense, labels


def doc_matrices(
    run_dir: str | Path, doc_id: int, measure: str = "attention"
) -> tuple[np.ndarray, list[str]]:
    """One document, every head → ([layer, head, query, key] float32, labels [position]).

    Cells that were not stored (top-k, threshold, causal upper triangle) are 0. If windows of a long
    document repeat a (query, key) cell, the windows' values are averaged.
    """
    return _read_dense(run_dir, doc_id, measure, layer=None, head=None)


def doc_matrix(
    run_dir: str | Path, doc_id: int, layer: int, head: int, measure: str = "attention"
) -> tuple[np.ndarray, list[str]]:
    """One head's matrix for one document → ([query, key] float32, labels [position]); see `doc_matrices`."""
    dense, labels = _read_dense(run_dir, doc_id, measure, layer=layer, head=head)
    return dense[0, 0], labels
