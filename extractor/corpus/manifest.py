"""A run's manifest: what it was asked, on which input, and the checks that make `--resume` safe.

Also `finish`: fold the committed parts into the final tables and write the manifest that says `complete`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from typing import Any

import pyarrow.parquet as pq

from extractor.core.verify import VerificationReport, fold
from extractor.corpus.config import RunConfig
from extractor.corpus.extraction import STATISTICS_FILES, raise_empty, record_fingerprint
from extractor.corpus.faults import checkpoint
from extractor.corpus.readers import read_documents
from extractor.corpus.run_folder import TABLES
from extractor.corpus.run_folder import association_rows as count_association_rows
from extractor.corpus.storage import OutputFolder
from extractor.errors import UserError

# Settings that change what a run writes: a resumed run must keep them, or its parts would not fit together.
RESULT_SETTINGS = ("model", "input", "input_format", "text_field", "text_column", "text_pair_field", "id_field",
                   "keep_fields", "batch_size", "token_budget",
                   "attention_budget",
                   "buffer_size", "bucketing", "max_length", "long_documents", "window_stride", "storage", "top_k",
                   "threshold", "level", "measures", "value_zeroing_layers", "value_zeroing_every",
                   "similarity_rows", "agreement", "limit", "verify", "hf_compare_every", "atol", "dtype")


DENSE_LAYOUT = "matrices"


def check_resumable(previous: dict[str, Any], config: RunConfig) -> None:
    """Refuse `--resume` with settings that differ from the interrupted run's (naming each one). A setting the
    interrupted run's manifest lacks (added since) had its default there."""
    defaults = RunConfig().model_dump()
    before = {**{key: defaults[key] for key in RESULT_SETTINGS}, **previous.get("config", {})}
    now = config.model_dump()
    changed = [f"{key} ({before.get(key)!r} → {now[key]!r})" for key in RESULT_SETTINGS if before.get(key) != now[key]]
    if changed:
        raise UserError(
            f"cannot resume '{config.output}' with different settings: {', '.join(changed)}; "
            "use the interrupted run's settings, or --overwrite to start again"
        )
    if config.storage == "dense" and previous.get("dense_layout") != DENSE_LAYOUT:
        raise UserError(
            f"cannot resume '{config.output}': its dense parts were written by an earlier version, one row per "
            "cell, and this version stores one matrix per row; finish it with that version, or --overwrite to "
            "start again"
        )


def input_fingerprint(config: RunConfig) -> dict[str, Any] | None:
    """Size and SHA-256 of the input file (None for stdin, which cannot be read twice). `--resume` checks it and
    then records it: the file is read once for both (the digest is kept per path, size and modification time)."""
    if config.input == "-":
        return None
    status = os.stat(config.input)
    return {"path": str(config.input), "bytes": status.st_size,
            "sha256": file_sha256(str(config.input), status.st_size, status.st_mtime_ns)}


@functools.lru_cache(maxsize=8)
def file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file; `size` and `mtime_ns` are part of the cache key, so a changed file is read again."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_input_unchanged(previous: dict[str, Any], config: RunConfig, folder: OutputFolder) -> None:
    """Refuse `--resume` when the input differs from the one the run started on, naming the first record
    that differs (or saying that records were added or removed)."""
    before = previous.get("input")
    if before is None or input_fingerprint(config) == before:
        return
    committed = folder.committed_fingerprints()
    seen = 0
    for record in read_documents(config.input, config.input_format, config.text_field, config.text_column, config.record_keys):
        seen += 1
        if record.doc_id in committed and committed[record.doc_id] != record_fingerprint(record):
            raise UserError(
                f"cannot resume '{config.output}': input '{config.input}' changed since the run started "
                f"(record {record.doc_id}, line {record.line}, differs); resume with the original input, "
                "or --overwrite to start again"
            )
    raise UserError(
        f"cannot resume '{config.output}': input '{config.input}' changed since the run started "
        f"(it now has {seen} records; records were added, removed or changed after the last committed one); "
        "resume with the original input, or --overwrite to start again"
    )


def base_manifest(config: RunConfig, provenance: dict[str, Any], started: float) -> dict[str, Any]:
    return {
        "run": config.run_name,
        "status": "running",
        "config": config.model_dump(),
        # how dense association parts are laid out (`corpus.matrices`); older runs stored one row per cell
        **({"dense_layout": DENSE_LAYOUT} if config.storage == "dense" else {}),
        "input": input_fingerprint(config),
        "provenance": provenance,
        "timings": {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))},
    }


VERDICT = {True: "passed", False: "FAILED", None: "off"}


def verification_summary(verification: VerificationReport | None) -> dict[str, Any]:
    """The manifest's verification entry: verdict, tolerance, worst errors and failing heads (or that it was off)."""
    if verification is None:
        return {"passed": None, "note": "verification was off"}
    return {"passed": verification.passed, "atol": verification.atol, "rtol": verification.rtol,
            "documents_verified": verification.n_docs, "documents_compared_with_eager": verification.n_docs_compared,
            "max_pattern_abs_err": float(verification.pattern_err.max()), "max_z_abs_err": float(verification.z_err.max()),
            "failing_heads": [f"L{l}H{h}" for l, h in verification.failing_heads()]}


def finish(folder: OutputFolder, manifest: dict[str, Any], started: float, load_seconds: float) -> dict[str, Any]:
    """Fold the committed parts into the final tables and write the manifest that says `complete`."""
    config = RunConfig(**manifest["config"])
    if not folder.consolidate("documents", "doc_id"):
        raise_empty(config)
    checkpoint("folding")
    folder.consolidate("tokens", "doc_id, position")
    folder.consolidate("words", "doc_id, word_index")
    documents = pq.read_table(folder.path / "documents.parquet", columns=["status"])
    merged: dict[str, Any] = {}
    n_tokens = n_parts = 0
    for state in folder.part_states():  # one at a time: memory does not grow with the number of parts
        n_parts += 1
        n_tokens += state.get("n_tokens", 0)
        for key, value in state.items():
            if key != "n_tokens":
                merged[key] = fold(merged.get(key), value)
    verification = merged.get("verification")
    if verification is not None:
        folder.write_table(TABLES["verification"], verification.table())
    for key, name in STATISTICS_FILES.items():
        if merged.get(key) is not None:
            folder.write_table(name, merged[key].table())
    status = documents.column("status").to_pylist()
    association_rows = count_association_rows(folder.path)
    seconds = time.time() - started
    manifest["status"] = "complete"
    manifest["counts"] = {
        "records": len(status),
        "ok": status.count("ok"),
        "truncated": status.count("truncated"),
        "skipped": status.count("skipped"),
        "tokens_processed": n_tokens,
        "association_rows": association_rows,
        "parts": n_parts,
    }
    manifest["verification"] = verification_summary(verification)
    manifest["timings"].update({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 3),
                                "model_load_seconds": round(load_seconds, 3),
                                "tokens_per_second": round(n_tokens / seconds, 1) if seconds else None})
    folder.write_manifest(manifest)
    checkpoint("complete")
    folder.remove_parts()
    return manifest
