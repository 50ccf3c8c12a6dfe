"""`extractor run`: batch extraction over a corpus, streamed to Parquet, resumable, in bounded memory.

read records → tokenize a buffer → truncate/window → bucket by length → batches by token budget
→ analyse_batch (forward, recompute, verify, measures) → tables → commit part (background thread)
→ at the end: consolidate documents/tokens/verification/heads, manifest, figures, report.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import runtime
from .analysis import BatchAnalysis, analyse_batch
from .batching import chunks, plan_batches
from .config import RunConfig
from .encode import TokenizedDoc, collate, model_max_length, tokenize, truncate, windows
from .errors import UserError
from .faults import checkpoint
from .heads import HeadStats
from .measures import HEAD_MEASURES
from .models import LoadedModel, load_model
from .outputs import association_files
from .readers import SourceRecord, count_records, read_documents
from .similarity import HeadSimilarity
from .storage import OutputFolder, Part
from .tables import association_table, batch_association_table, tokens_table, words_table
from .verify import VerificationReport, fold


@dataclass
class Document:
    """A readable record, tokenised, with the units (one, or several windows) the model will see."""

    record: SourceRecord
    full: TokenizedDoc
    units: list[TokenizedDoc]

    @property
    def stored(self) -> TokenizedDoc:
        """The tokens the tables describe: a truncated document is its truncation (positions renumbered)."""
        return self.units[0] if self.units[0].truncated else self.full


def corpus_statistics(loaded: LoadedModel, config: RunConfig) -> dict[str, Any]:
    """Fresh per-part accumulators of corpus-wide per-head statistics (merged at the end)."""
    adapter, tok = loaded.adapter, loaded.tokenizer
    return {
        "heads": HeadStats(adapter.n_layers, adapter.n_heads, adapter.causal, tok.cls_token, tok.sep_token),
        "similarity": HeadSimilarity(adapter.n_layers, adapter.n_heads, max_rows_per_doc=config.similarity_rows),
    }


class Progress:
    """A tqdm bar on a terminal; plain log lines every `every` seconds otherwise; nothing with quiet.

    `every` defaults to $EXTRACTOR_PROGRESS_SECONDS, else 10 seconds.
    """

    def __init__(self, total: int | None, quiet: bool, every: float | None = None) -> None:
        if every is None:
            every = float(os.environ.get("EXTRACTOR_PROGRESS_SECONDS") or 10.0)
        self.quiet, self.every, self.total = quiet, every, total
        self.docs, self.tokens = 0, 0
        self.start = self.last = time.time()
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="doc", dynamic_ncols=True, file=sys.stderr)

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        elapsed = max(time.time() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(docs)
            self.bar.set_postfix(tokens_per_s=f"{self.tokens / elapsed:,.0f}", refresh=False)
        elif not self.quiet and time.time() - self.last >= self.every:
            self.last = time.time()
            rate = self.docs / elapsed
            eta = f", ETA {((self.total - self.docs) / rate):.0f}s" if self.total and rate > 0 else ""
            print(
                f"progress: {self.docs}/{self.total or '?'} documents, {rate:.1f} docs/s, "
                f"{self.tokens / elapsed:,.0f} tokens/s{eta}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def prepare_documents(records: list[SourceRecord], loaded: LoadedModel, config: RunConfig) -> list[Document]:
    """Tokenise a buffer of readable records and cut each into the units the model sees."""
    limit = min(config.max_length or 10**9, model_max_length(loaded.tokenizer, loaded.model.config))
    full_docs = tokenize(loaded.tokenizer, [r.text for r in records])  # type: ignore[misc]
    documents = []
    for record, full in zip(records, full_docs, strict=True):
        if config.long_documents == "window":
            units = windows(full, limit, min(config.window_stride, max(limit - 3, 0)))
        else:
            units = [truncate(full, limit)]
        documents.append(Document(record, full, units))
    return documents


def record_fingerprint(record: SourceRecord) -> str:
    """A short hash of what a record holds (its text, or why it was skipped): `--resume` compares them."""
    content = record.text if record.text is not None else f"\0skipped: {record.reason}"
    return hashlib.blake2b(content.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def document_row(record: SourceRecord, document: Document | None) -> dict[str, Any]:
    if document is None:
        return {"doc_id": record.doc_id, "source": record.source, "line": record.line, "n_tokens": 0,
                "n_windows": 0, "status": "skipped", "reason": record.reason}
    truncated = document.units[0].truncated
    n_tokens = document.units[0].n_tokens if truncated else document.full.n_tokens
    return {"doc_id": record.doc_id, "source": record.source, "line": record.line, "n_tokens": n_tokens,
            "n_windows": len(document.units), "status": "truncated" if truncated else "ok",
            "reason": f"truncated from {document.full.n_tokens} tokens" if truncated else None}


class Extraction:
    """One run of the local engine over an iterator of records (also what each Ray worker runs)."""

    def __init__(self, config: RunConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.loaded = loaded
        self.causal = loaded.adapter.causal
        self.batch_counter = 0
        self.value_type = pa.float16() if config.storage == "dense" else pa.float32()
        # storage summary keeps no pair tables: compute only what the per-head metrics read
        self.measures = [m for m in config.measures if m in HEAD_MEASURES] if config.storage == "summary" \
            else list(config.measures)
        # Dense parts hold (layers·heads + layers) rows per attention cell until written: a smaller budget keeps
        # a part near 10 million rows (≈ 300 MB) instead of letting it grow with the batch.
        self.attention_budget = min(config.attention_budget, DENSE_ATTENTION_BUDGET) if config.storage == "dense" \
            else config.attention_budget

    def parts(
        self, records: Iterable[SourceRecord], first_part_id: int, done: Collection[int] = frozenset()
    ) -> Iterator[Part]:
        """Turn records into committed-ready parts, one per batch (skipped records ride on the next part).

        `done`: doc_ids committed by an interrupted run. They still fill the read-ahead buffer, so every batch
        is planned exactly as in an uninterrupted run (same neighbours, same padding, bit-identical values);
        only the documents already committed are left out of the batches.
        """
        part_id = first_part_id
        skipped: list[SourceRecord] = []
        buffer: list[SourceRecord] = []

        def drain(buffer: list[SourceRecord]) -> Iterator[Part]:
            nonlocal part_id, skipped
            documents = prepare_documents(buffer, self.loaded, self.config)
            plan = plan_batches([[u.n_tokens for u in d.units] for d in documents], self.config.token_budget,
                                self.config.batch_size, self.config.bucketing, self.attention_budget)
            for group in plan:
                batch = [documents[g] for g in group if documents[g].record.doc_id not in done]
                if not batch:  # committed before the interruption; still counts for verify every:N
                    self.batch_counter += 1
                    continue
                part = self.process(batch, part_id, skipped)
                skipped = []
                part_id += 1
                yield part

        for record in records:
            if record.text is None:
                if record.doc_id not in done:
                    skipped.append(record)
                continue
            buffer.append(record)
            if len(buffer) >= self.config.buffer_size:
                yield from drain(buffer)
                buffer = []
        if buffer:
            yield from drain(buffer)
        if skipped:
            yield Part(part_id, [document_row(r, None) for r in skipped], state={},
                       fingerprints=[record_fingerprint(r) for r in skipped])

    def process(self, documents: list[Document], part_id: int, skipped: list[SourceRecord]) -> Part:
        """Analyse one batch of documents (all their units) into a Part."""
        config, loaded = self.config, self.loaded
        verify_every = config.verify_every
        verify = verify_every > 0 and self.batch_counter % verify_every == 0
        self.batch_counter += 1
        units = [(d_index, unit) for d_index, d in enumerate(documents) for unit in d.units]
        stats = corpus_statistics(loaded, config)
        report: VerificationReport | None = None
        per_doc_tables: list[pa.Table] = []
        longest = max(u.n_tokens for _, u in units)
        per_pass = max(1, min(config.batch_size, self.attention_budget // longest**2))  # a long document's windows
        for chunk in chunks(units, per_pass):
            batch = collate([u for _, u in chunk], loaded.tokenizer.pad_token_id, loaded.device)
            # token level always: per-head metrics and similarity are token-level statistics; word-level tables
            # are aggregated from the token matrices in `associations`
            analysis = analyse_batch(loaded, batch, self.measures, verify=verify, atol=config.atol)
            report = fold(report, analysis.verification)
            if "attention" in analysis.per_layer:
                for accumulator in stats.values():
                    accumulator.update_batch(analysis)
            if config.storage != "summary":
                doc_ids = [documents[d_index].record.doc_id for d_index, _ in chunk]
                per_doc_tables.append(self.associations(analysis, doc_ids))
        rows = [document_row(r, None) for r in skipped] + [document_row(d.record, d) for d in documents]
        tokens = pa.concat_tables([tokens_table(d.record.doc_id, d.stored) for d in documents])
        words = None
        if config.level == "word":
            words = pa.concat_tables([words_table(d.record.doc_id, d.stored, d.record.text) for d in documents])  # type: ignore[arg-type]
        associations = pa.concat_tables(per_doc_tables) if per_doc_tables else None
        return Part(part_id, rows, tokens, words, associations,
                    state={"verification": report, **stats, "n_tokens": sum(u.n_tokens for _, u in units)},
                    # one token-level pass over documents in reading order comes out in (layer, head, doc_id) order
                    associations_ordered=config.level == "token" and len(per_doc_tables) == 1,
                    fingerprints=[record_fingerprint(r) for r in [*skipped, *(d.record for d in documents)]])

    def associations(self, analysis: BatchAnalysis, doc_ids: list[int]) -> pa.Table:
        """One pass's association rows: straight from the batch's tensors at token level, per document for words."""
        config = self.config
        top_k = config.top_k if config.storage == "topk" else None
        threshold = config.threshold if config.storage == "threshold" else None
        windows = [u.window for u in analysis.batch.docs] if config.long_documents == "window" else None
        if config.level == "token":
            return batch_association_table(analysis, doc_ids, self.causal, top_k, threshold, self.value_type, windows)
        tables = [association_table(doc_id, doc.to_word_level(), self.causal, top_k, threshold, self.value_type)
                  for doc_id, doc in zip(doc_ids, analysis.docs, strict=True)]
        if windows is not None:
            counts = [t.num_rows for t in tables]
            tables = [pa.concat_tables(tables).append_column(
                "window", pa.array(np.repeat(np.asarray(windows, dtype=np.int16), counts), pa.int16()))]
        return pa.concat_tables(tables)


# Settings that change what a run writes: a resumed run must keep them, or its parts would not fit together.
RESULT_SETTINGS = ("model", "input", "input_format", "text_field", "text_column", "batch_size", "token_budget",
                   "attention_budget",
                   "buffer_size", "bucketing", "max_length", "long_documents", "window_stride", "storage", "top_k",
                   "threshold", "level", "measures", "similarity_rows", "limit", "verify", "atol", "dtype")


def check_resumable(previous: dict[str, Any], config: RunConfig) -> None:
    """Refuse `--resume` with settings that differ from the interrupted run's (naming each one)."""
    before = previous.get("config", {})
    now = config.model_dump()
    changed = [f"{key} ({before.get(key)!r} → {now[key]!r})" for key in RESULT_SETTINGS if before.get(key) != now[key]]
    if changed:
        raise UserError(
            f"cannot resume '{config.output}' with different settings: {', '.join(changed)}; "
            "use the interrupted run's settings, or --overwrite to start again"
        )


DENSE_ATTENTION_BUDGET = 1 << 17


def peeked(records: Iterator[SourceRecord], config: RunConfig) -> Iterator[SourceRecord]:
    """Read up to the first readable record now, so that format errors (a missing field or column, checked on
    the first readable record) and an empty input surface before anything is written; give back the stream."""
    head: list[SourceRecord] = []
    for record in records:
        head.append(record)
        if record.text is not None:
            break
    if not head:
        raise_empty(config)
    return chain(head, records)


def expected_records(config: RunConfig) -> int | None:
    """How many records the run will read (for the progress ETA), when that can be known cheaply."""
    total = count_records(config.input, config.input_format)
    return min(total, config.limit) if total is not None and config.limit else total


def limited(records: Iterable[SourceRecord], limit: int | None) -> Iterable[SourceRecord]:
    return islice(records, limit) if limit else records


def input_fingerprint(config: RunConfig) -> dict[str, Any] | None:
    """Size and SHA-256 of the input file (None for stdin, which cannot be read twice)."""
    if config.input == "-":
        return None
    digest = hashlib.sha256()
    with open(config.input, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(config.input), "bytes": os.path.getsize(config.input), "sha256": digest.hexdigest()}


def check_input_unchanged(previous: dict[str, Any], config: RunConfig, folder: OutputFolder) -> None:
    """Refuse `--resume` when the input differs from the one the run started on, naming the first record
    that differs (or saying that records were added or removed)."""
    before = previous.get("input")
    if before is None or input_fingerprint(config) == before:
        return
    committed = folder.committed_fingerprints()
    seen = 0
    for record in read_documents(config.input, config.input_format, config.text_field, config.text_column):
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


def run_extraction(
    config: RunConfig, resume: bool = False, overwrite: bool = False, quiet: bool = False,
    loaded: LoadedModel | None = None, after_part: Callable[[Part], None] | None = None,
) -> dict[str, Any]:
    """Run (or finish) an extraction; returns the manifest.

    The output folder is locked for the whole run. Before anything in it is deleted, `--resume` checks the
    settings and the input against the interrupted run's; a complete run's data are never deleted.
    """
    runtime.configure(config.threads)
    # Open the input first: a missing file, field or column, or no records, fails before anything is written.
    records = peeked(read_documents(config.input, config.input_format, config.text_field, config.text_column),
                     config)
    if config.engine == "ray":
        from .engines.ray_engine import require_ray

        require_ray()  # without Ray, say how to install it before anything is written
    protect = None if config.input == "-" else Path(config.input)
    folder = OutputFolder.open(config.output, resume=resume, overwrite=overwrite, protect=protect)
    try:
        previous = folder.read_manifest() if resume else None
        if previous:
            check_resumable(previous, config)
            check_input_unchanged(previous, config, folder)
            if previous.get("status") == "complete":
                return complete_run(folder, previous, config, quiet)
        if resume:
            folder.discard_uncommitted(quiet)
        if config.engine == "ray":
            from .engines.ray_engine import run_on_ray

            return run_on_ray(config, folder, records, quiet=quiet)
        return run_locally(config, folder, records, quiet, loaded, after_part)
    except OSError as exc:
        raise write_failure(exc, config) from None
    finally:
        folder.close()


def write_failure(exc: OSError, config: RunConfig) -> UserError:
    """A failed write (disk full, permission, I/O) as one line that says what happened and how to finish."""
    where = f" '{exc.filename}'" if exc.filename else ""
    what = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
    return UserError(
        f"could not write{where} ({what}); every committed part is kept: fix this, then run the same command "
        f"with --resume to finish the run in '{config.output}'"
    )


def run_locally(
    config: RunConfig, folder: OutputFolder, records: Iterator[SourceRecord], quiet: bool,
    loaded: LoadedModel | None, after_part: Callable[[Part], None] | None,
) -> dict[str, Any]:
    """The local engine: parts committed in the background while the next batch is analysed."""
    started = time.time()
    records = iter(limited(records, config.limit))
    loaded = loaded or load_model(config.model, config.device, config.dtype, config.atol)
    load_seconds = time.time() - started
    manifest = base_manifest(config, loaded.provenance, started)
    folder.write_manifest(manifest)
    done = folder.committed_doc_ids()
    total = expected_records(config)
    progress = Progress(None if total is None else max(total - len(done), 0), quiet)
    extraction = Extraction(config, loaded)
    try:
        for part in extraction.parts(records, folder.next_part_id(), done):
            folder.submit(part)
            progress.update(len(part.documents), part.state.get("n_tokens", 0))
            if after_part is not None:
                after_part(part)
        folder.flush()
    finally:
        progress.close()
    return finish(folder, manifest, started, load_seconds, quiet)


def complete_run(folder: OutputFolder, manifest: dict[str, Any], config: RunConfig, quiet: bool) -> dict[str, Any]:
    """`--resume` of a run whose data are complete: tidy what an interruption left and write the report and
    figures that are missing. The association files and tables are kept as they are."""
    folder.discard_leftovers()
    missing = write_extras(folder, config, quiet, only_missing=True)
    if not quiet:
        print(f"run in '{config.output}' is complete; "
              + (f"wrote the missing {' and '.join(missing)}" if missing else "nothing to do"), file=sys.stderr)
    return manifest


def base_manifest(config: RunConfig, provenance: dict[str, Any], started: float) -> dict[str, Any]:
    return {
        "run": config.run_name,
        "status": "running",
        "config": config.model_dump(),
        "input": input_fingerprint(config),
        "provenance": provenance,
        "timings": {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))},
    }


VERDICT = {True: "passed", False: "FAILED", None: "off"}


def finish(folder: OutputFolder, manifest: dict[str, Any], started: float, load_seconds: float, quiet: bool) -> dict[str, Any]:
    """Fold the committed parts into the final files, write the manifest, figures and report."""
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
        folder.write_table("verification.parquet", verification.table())
    if merged.get("heads") is not None:
        folder.write_table("heads.parquet", merged["heads"].table())
        folder.write_table("head_similarity.parquet", merged["similarity"].table())
    status = documents.column("status").to_pylist()
    association_rows = sum(
        pq.ParquetFile(f).metadata.num_rows for f in association_files(folder.path)
    )
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
    manifest["verification"] = (
        {"passed": verification.passed, "atol": verification.atol, "documents_verified": verification.n_docs,
         "max_pattern_abs_err": float(verification.pattern_err.max()), "max_z_abs_err": float(verification.z_err.max()),
         "failing_heads": [f"L{l}H{h}" for l, h in verification.failing_heads()]}
        if verification is not None else {"passed": None, "note": "verification was off"}
    )
    manifest["timings"].update({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 3),
                                "model_load_seconds": round(load_seconds, 3),
                                "tokens_per_second": round(n_tokens / seconds, 1) if seconds else None})
    folder.write_manifest(manifest)
    checkpoint("complete")
    folder.remove_parts()
    write_extras(folder, config, quiet)
    if not quiet:
        counts = manifest["counts"]
        print(
            f"done: {counts['records']} records ({counts['ok']} ok, {counts['truncated']} truncated, "
            f"{counts['skipped']} skipped), {counts['association_rows']} association rows, "
            f"verification {VERDICT[manifest['verification']['passed']]}"
            f" → {folder.path}",
            file=sys.stderr,
        )
    return manifest


def write_extras(folder: OutputFolder, config: RunConfig, quiet: bool, only_missing: bool = False) -> list[str]:
    """The HTML report (OUTPUT/report.html), then the default figures (OUTPUT/plots/); returns what was written.

    The report comes first, so that a problem with a figure cannot lose it. Each is moved into place whole,
    so an interrupted run leaves either the finished report or figures, or none (then `--resume` draws them).
    """
    written = []
    if config.report and not (only_missing and (folder.path / "report.html").is_file()):
        from .report import write_report

        write_report(folder.path)
        written.append("report")
    if config.plots and not (only_missing and (folder.path / "plots").is_dir()):
        from .plots import write_default_plots

        write_default_plots(folder.path)
        written.append("figures")
    return written


def raise_empty(config: RunConfig) -> NoReturn:
    raise UserError(f"input '{config.input}' has no records")
