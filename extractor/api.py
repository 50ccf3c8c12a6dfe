"""Python API for notebooks: `extract(texts, model="minilm")` → an `ExtractionResult` you can query and save;
`run_extraction(config)` → a corpus run with its report and figures, as `extractor run` makes it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch

from extractor.attribution.analysis import DocAttention, analyse_batch, validate_measures
from extractor.attribution.measures import DEFAULT_MEASURES
from extractor.core.encode import encode
from extractor.core.models import LoadedModel, load_model
from extractor.core.verify import DEFAULT_ATOL, VerificationReport, fold
from extractor.corpus.config import RunConfig
from extractor.corpus.run import run_corpus
from extractor.corpus.storage import Part
from extractor.corpus.tables import association_table, tokens_table, words_table
from extractor.presentation.explain import normalise_token
from extractor.presentation.extras import write_extras

LEVELS = ("token", "word")


@dataclass
class ExtractionResult:
    """Association measures for a handful of texts, held in memory (use `extractor run` for corpora)."""

    texts: list[str]
    docs: list[DocAttention]
    report: VerificationReport | None
    causal: bool
    top_k: int | None
    provenance: dict

    def pattern(self, doc: int, layer: int, head: int, measure: str = "attention") -> torch.Tensor:
        """One head's matrix [query, key] (token or word positions, padding trimmed)."""
        return self.docs[doc].head_measures[measure][layer, head]

    def tokens(self) -> pd.DataFrame:
        """`doc_id, position, token, word_index, is_special, char_start, char_end` for every real token."""
        return pa.concat_tables([tokens_table(i, d.doc) for i, d in enumerate(self.docs)]).to_pandas()

    def words(self) -> pd.DataFrame:
        """`doc_id, word_index, word, is_special, n_tokens, char_start, char_end` for every word."""
        return pa.concat_tables(
            [words_table(i, d.doc, t) for i, (d, t) in enumerate(zip(self.docs, self.texts, strict=True))]
        ).to_pandas()

    def association_arrow(self) -> pa.Table:
        return pa.concat_tables([association_table(i, d, self.causal, self.top_k) for i, d in enumerate(self.docs)])

    def associations(
        self, layer: int | None = None, head: int | None = None, token: str | None = None, doc: int | None = None
    ) -> pd.DataFrame:
        """The long table, optionally filtered; `token` keeps query rows whose token (or word) text matches."""
        frame = self.association_arrow().to_pandas()
        if doc is not None:
            frame = frame[frame["doc_id"] == doc]
        if layer is not None:
            frame = frame[frame["layer"] == layer]
        if head is not None:
            frame = frame[frame["head"] == head]
        labels = self._labels()
        frame = frame.merge(labels.rename(columns={"position": "query_pos", "label": "query_token"}), on=["doc_id", "query_pos"])
        frame = frame.merge(labels.rename(columns={"position": "key_pos", "label": "key_token"}), on=["doc_id", "key_pos"])
        if token is not None:
            frame = frame[frame["query_token"].map(normalise_token) == normalise_token(token)]
        return frame.reset_index(drop=True)

    def _labels(self) -> pd.DataFrame:
        if self.docs and self.docs[0].level == "word":
            words = self.words()
            return pd.DataFrame({"doc_id": words["doc_id"], "position": words["word_index"], "label": words["word"]})
        tokens = self.tokens()
        return pd.DataFrame({"doc_id": tokens["doc_id"], "position": tokens["position"], "label": tokens["token"]})

    def verification(self) -> pd.DataFrame:
        """Per (layer, head) max abs errors against Hugging Face and pass/fail."""
        if self.report is None:
            raise ValueError("verification was turned off for this extraction (verify=False)")
        return self.report.table()

    def save(self, folder: str | Path, format: str = "parquet") -> Path:
        """Write associations, tokens (and words), verification as Parquet (default) or CSV."""
        if format not in ("parquet", "csv"):
            raise ValueError(f"format '{format}' is not supported; choose parquet or csv")
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        tables = {"associations": self.association_arrow(), "tokens": pa.Table.from_pandas(self.tokens(), preserve_index=False)}
        if self.docs and self.docs[0].level == "word":
            tables["words"] = pa.Table.from_pandas(self.words(), preserve_index=False)
        if self.report is not None:
            tables["verification"] = pa.Table.from_pandas(self.report.table(), preserve_index=False)
        for name, table in tables.items():
            if format == "parquet":
                pq.write_table(table, out / f"{name}.parquet")
            else:
                pa_csv.write_csv(table, out / f"{name}.csv")
        return out


def extract(
    texts: str | Sequence[str],
    model: str | LoadedModel = "minilm",
    measures: Sequence[str] = DEFAULT_MEASURES,
    level: str = "token",
    top_k: int | None = None,
    verify: bool = True,
    atol: float = DEFAULT_ATOL,
    batch_size: int = 16,
    max_length: int | None = None,
) -> ExtractionResult:
    """Extract every layer's and head's association measures for `texts` (verified against Hugging Face)."""
    if level not in LEVELS:
        raise ValueError(f"level '{level}' is not supported; choose one of: {', '.join(LEVELS)}")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or any(not t.strip() for t in texts):
        raise ValueError("every text must contain at least one non-whitespace character")
    measures = validate_measures(measures)
    loaded = load_model(model, tolerance=atol) if isinstance(model, str) else model
    docs: list[DocAttention] = []
    report: VerificationReport | None = None
    for start in range(0, len(texts), batch_size):
        batch = encode(loaded.tokenizer, texts[start : start + batch_size], max_length, loaded.device, loaded.model.config)
        analysis = analyse_batch(loaded, batch, measures, verify=verify, atol=atol, level=level)
        docs.extend(analysis.docs)
        report = fold(report, analysis.verification)
    return ExtractionResult(
        texts=texts, docs=docs, report=report, causal=loaded.adapter.causal, top_k=top_k, provenance=loaded.provenance
    )


def run_extraction(
    config: RunConfig, resume: bool = False, overwrite: bool = False, quiet: bool = False,
    loaded: LoadedModel | None = None, after_part: Callable[[Part], None] | None = None,
) -> dict:
    """A corpus run (see `extractor.corpus.run.run_corpus`) followed by its report and figures, as `config`
    asks; returns the manifest. `--resume` of a complete run writes the report and figures that are missing."""
    return run_corpus(config, resume=resume, overwrite=overwrite, quiet=quiet, loaded=loaded, after_part=after_part,
                      extras=write_extras)
