"""One corpus run's computation, shared by every engine: records → documents → batches → analysed parts.

read records → tokenize a buffer → truncate/window → bucket by length → batches by token budget
→ analyse_batch (forward, recompute, verify, measures) → tables → a `Part` ready to commit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any, NoReturn

import numpy as np
import pyarrow as pa
import torch

from extractor.attribution.agreement import MeasureAgreement
from extractor.attribution.analysis import BatchAnalysis, analyse_batch
from extractor.attribution.layer_pass import ZeroingScope, layers_out_of_range
from extractor.attribution.measures import HEAD_MEASURES
from extractor.core.encode import Text, TokenizedDoc, collate, model_max_length, tokenize, truncate, windows
from extractor.core.models import LoadedModel, length_warning
from extractor.core.tolerance import default_rtol
from extractor.core.verify import VerificationReport, fold
from extractor.corpus.batching import chunks, plan_batches
from extractor.corpus.config import RunConfig
from extractor.corpus.matrices import matrices_table
from extractor.corpus.readers import SourceRecord, count_records
from extractor.corpus.run_folder import TABLES
from extractor.corpus.storage import Part
from extractor.corpus.tables import (
    association_table,
    batch_association_table,
    batch_inputs,
    document_inputs,
    tokens_table,
    words_table,
)
from extractor.errors import UserError
from extractor.heads.metrics import HeadStats
from extractor.heads.similarity import HeadSimilarity

DENSE_ATTENTION_BUDGET = 1 << 18  # attention cells per head in one dense part: ≈ 40 MB of float16 per measure


@dataclass
class Document:
    """A readable record, tokenised, with the units (one, or several windows) the model will see."""

    record: SourceRecord
    full: TokenizedDoc
    units: list[TokenizedDoc]

    @property
    def text(self) -> Text:
        """The record's text, or its (text, text_pair) sentence pair."""
        return record_text(self.record)

    @property
    def stored(self) -> TokenizedDoc:
        """The tokens the tables describe: a truncated document is its truncation (positions renumbered)."""
        return self.units[0] if self.units[0].truncated else self.full


# Each corpus-wide accumulator of a part's state, and the file its merged `table()` becomes at the end of a run.
STATISTICS_FILES = {"heads": TABLES["heads"], "similarity": TABLES["head_similarity"], "agreement": TABLES["agreement"]}


def corpus_statistics(loaded: LoadedModel, config: RunConfig) -> dict[str, Any]:
    """Fresh per-part accumulators of corpus-wide statistics (merged at the end): per-head metrics, head
    similarity, and (with `agreement: true`) the measures' rank agreement."""
    adapter, tok = loaded.adapter, loaded.tokenizer
    stats: dict[str, Any] = {
        "heads": HeadStats(adapter.n_layers, adapter.n_heads, adapter.causal, tok.cls_token, tok.sep_token),
        "similarity": HeadSimilarity(adapter.n_layers, adapter.n_heads, max_rows_per_doc=config.similarity_rows),
    }
    if config.agreement:
        stats["agreement"] = MeasureAgreement(adapter.causal)
    return stats


def record_text(record: SourceRecord) -> Text:
    """What the model reads from a readable record: its text, or its (text, text_pair) sentence pair."""
    assert record.text is not None, "only readable records are tokenised"
    return record.text if record.text_pair is None else (record.text, record.text_pair)


def check_pairs(loaded: LoadedModel, config: RunConfig) -> None:
    """Sentence pairs are an encoder's input ([CLS] A [SEP] B [SEP]); a decoder's tokenizer would only glue the
    two texts together, so a run that asks for pairs on a decoder is refused."""
    if config.text_pair_field and loaded.adapter.causal:
        raise UserError(f"text_pair_field: model '{config.model}' is a decoder, which reads one text, not a sentence "
                        "pair; join the two texts into one field, or use an encoder (minilm)")


def check_zeroing_layers(loaded: LoadedModel, config: RunConfig) -> None:
    """value_zeroing_layers must name layers the model has (known once it is loaded)."""
    n_layers = loaded.adapter.n_layers
    bad = layers_out_of_range(config.value_zeroing_layers, n_layers)
    if bad:
        raise UserError(f"value_zeroing_layers: {', '.join(map(str, bad))} out of range; model '{config.model}' has "
                        f"{n_layers} layers, 0 to {n_layers - 1}")


def zeroing_scope(config: RunConfig, doc_ids: list[int]) -> ZeroingScope:
    """Where a batch of documents `doc_ids` gets value zeroing: the configured layers, every Nth doc_id."""
    every = config.value_zeroing_every
    return ZeroingScope(layers=config.value_zeroing_layers, documents=[doc_id % every == 0 for doc_id in doc_ids])


def prepare_documents(records: list[SourceRecord], loaded: LoadedModel, config: RunConfig) -> list[Document]:
    """Tokenise a buffer of readable records and cut each into the units the model sees."""
    limit = min(config.max_length or 10**9, model_max_length(loaded.tokenizer, loaded.model.config))
    full_docs = tokenize(loaded.tokenizer, [record_text(r) for r in records])
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
    if record.text_pair is not None:
        content += f"\0pair: {record.text_pair}"
    if record.source_id is not None or record.fields:
        content += f"\0id: {record.source_id}\0fields: {sorted(record.fields.items())}"
    return hashlib.blake2b(content.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def document_row(record: SourceRecord, document: Document | None) -> dict[str, Any]:
    """A documents.parquet row (storage.document_schema): a skipped record keeps its id and kept fields."""
    given = {"text_pair": record.text_pair, "source_id": record.source_id, **record.fields}
    if document is None:
        return {"doc_id": record.doc_id, "source": record.source, "line": record.line, "n_tokens": 0,
                "n_windows": 0, "status": "skipped", "reason": record.reason, "text": None, **given}
    truncated = document.units[0].truncated
    n_tokens = document.units[0].n_tokens if truncated else document.full.n_tokens
    return {"doc_id": record.doc_id, "source": record.source, "line": record.line, "n_tokens": n_tokens,
            "n_windows": len(document.units), "status": "truncated" if truncated else "ok",
            "reason": f"truncated from {document.full.n_tokens} tokens" if truncated else None,
            "text": record.text, **given}


class Extraction:
    """One run of the local engine over an iterator of records (also what each Ray worker runs)."""

    def __init__(self, config: RunConfig, loaded: LoadedModel, warn: Callable[[str], None] | None = None) -> None:
        """`warn`: where one-line warnings go (each said once per run), e.g. a document longer than the model
        was trained for."""
        check_pairs(loaded, config)
        check_zeroing_layers(loaded, config)
        self.config = config
        self.loaded = loaded
        self.warn = warn
        self.warned_length = False
        self.causal = loaded.adapter.causal
        self.batch_counter = 0
        self.value_type = pa.float16() if config.storage == "dense" else pa.float32()
        # storage summary keeps no pair tables: compute only what the per-head metrics read
        self.measures = [m for m in config.measures if m in HEAD_MEASURES] if config.storage == "summary" \
            else list(config.measures)
        # Dense parts hold every cell of every head until written: a smaller budget bounds a part's memory.
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
            self.check_lengths(documents)
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

    def check_lengths(self, documents: list[Document]) -> None:
        if self.warn is None or self.warned_length or not documents:
            return
        warning = length_warning(self.loaded, max(u.n_tokens for d in documents for u in d.units))
        if warning is not None:
            self.warn(warning)
            self.warned_length = True

    def process(self, documents: list[Document], part_id: int, skipped: list[SourceRecord]) -> Part:
        """Analyse one batch of documents (all their units) into a Part."""
        config, loaded = self.config, self.loaded
        verify_every = config.verify_every
        verify = verify_every > 0 and self.batch_counter % verify_every == 0
        # the first verified batch and every hf_compare_every-th after it: Hugging Face's eager kernel, compared
        # with its output_attentions; the others (and unverified batches) run the sdpa kernel (see analyse_batch)
        eager = verify and (self.batch_counter // verify_every) % config.hf_compare_every == 0
        self.batch_counter += 1
        units = [(d_index, unit) for d_index, d in enumerate(documents) for unit in d.units]
        stats = corpus_statistics(loaded, config)
        report: VerificationReport | None = None
        per_doc_tables: list[pa.Table] = []
        longest = max(u.n_tokens for _, u in units)
        per_pass = max(1, min(config.batch_size, self.attention_budget // longest**2))  # a long document's windows
        for chunk in chunks(units, per_pass):
            batch = collate([u for _, u in chunk], loaded.tokenizer.pad_token_id, loaded.device)
            doc_ids = [documents[d_index].record.doc_id for d_index, _ in chunk]
            # token level always: per-head metrics and similarity are token-level statistics; word-level tables
            # are aggregated from the token matrices in `associations`
            analysis = analyse_batch(loaded, batch, self.measures, verify=verify, atol=config.atol, eager=eager,
                                     rtol=default_rtol(config.dtype), zeroing=zeroing_scope(config, doc_ids))
            report = fold(report, analysis.verification)
            if "attention" in analysis.per_layer:
                for accumulator in stats.values():
                    accumulator.update_batch(analysis)
            if config.storage != "summary":
                per_doc_tables.append(self.associations(analysis, doc_ids))
        rows = [document_row(r, None) for r in skipped] + [document_row(d.record, d) for d in documents]
        tokens = pa.concat_tables([tokens_table(d.record.doc_id, d.stored) for d in documents])
        words = None
        if config.level == "word":
            words = pa.concat_tables([words_table(d.record.doc_id, d.stored, d.text) for d in documents])
        associations = pa.concat_tables(per_doc_tables) if per_doc_tables else None
        return Part(part_id, rows, tokens, words, associations,
                    state={"verification": report, **stats, "n_tokens": sum(u.n_tokens for _, u in units)},
                    # one token-level pass over documents in reading order comes out in (layer, head, doc_id) order
                    associations_ordered=config.level == "token" and len(per_doc_tables) == 1,
                    compression=config.compression,
                    fingerprints=[record_fingerprint(r) for r in [*skipped, *(d.record for d in documents)]])

    def associations(self, analysis: BatchAnalysis, doc_ids: list[int]) -> pa.Table:
        """One pass's association rows: straight from the batch's tensors at token level, per document for words."""
        config = self.config
        top_k = config.top_k if config.storage == "topk" else None
        threshold = config.threshold if config.storage == "threshold" else None
        windows = [u.window for u in analysis.batch.docs] if config.long_documents == "window" else None
        if config.storage == "dense":
            return self.matrices(analysis, doc_ids, windows)
        if config.level == "token":
            return batch_association_table(analysis, doc_ids, self.causal, top_k, threshold, self.value_type, windows)
        tables = [association_table(doc_id, doc.to_word_level(), self.causal, top_k, threshold, self.value_type)
                  for doc_id, doc in zip(doc_ids, analysis.docs, strict=True)]
        if windows is not None:
            counts = [t.num_rows for t in tables]
            tables = [pa.concat_tables(tables).append_column(
                "window", pa.array(np.repeat(np.asarray(windows, dtype=np.int16), counts), pa.int16()))]
        return pa.concat_tables(tables)


    def matrices(self, analysis: BatchAnalysis, doc_ids: list[int], windows: list[int] | None) -> pa.Table:
        """Dense storage: one row per (layer, head, document) holding the matrix (`corpus.matrices`)."""
        window_ids = None if windows is None else torch.tensor(windows, dtype=torch.long)
        if self.config.level == "token":
            return matrices_table(analysis.per_layer, *batch_inputs(analysis, doc_ids), self.causal, self.value_type,
                                  window_ids, analysis.first_keys)
        tables = []
        for b, (doc_id, doc) in enumerate(zip(doc_ids, analysis.docs, strict=True)):
            words = doc.to_word_level()
            tables.append(matrices_table(*document_inputs(doc_id, words), self.causal, self.value_type,
                                         None if window_ids is None else window_ids[b : b + 1], words.first_keys))
        return pa.concat_tables(tables)


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


def raise_empty(config: RunConfig) -> NoReturn:
    raise UserError(f"input '{config.input}' has no records")
