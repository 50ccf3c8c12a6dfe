"""The notebook layer: an extraction held in memory shown inline in Jupyter, offline.

- `summary_html`: a compact table (texts and their token counts, model, measures, verification verdict and
  worst errors): `ExtractionResult._repr_html_`.
- `interactive_view`: the HTML report's explorer (extractor/presentation/report.py and its template) for a
  few documents in memory. The documents are written as a run folder would hold them, by the corpus's own
  table builders and writers, into a temporary folder that `build_report` reads, so the page and its data
  encoding are the report's, by construction. The page goes into a sandboxed <iframe srcdoc>: its styles,
  element ids and Content-Security-Policy stay inside the frame, and two views in one notebook never mix.

IPython is optional: `html_view` returns `IPython.display.HTML` when it is installed, else an `HTMLView`,
which Jupyter renders through its `_repr_html_` just the same.
"""

from __future__ import annotations

import html
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from extractor.attribution.analysis import DocAttention
from extractor.core.encode import Text
from extractor.core.verify import VerificationReport
from extractor.corpus.manifest import verification_summary
from extractor.corpus.storage import write_associations
from extractor.corpus.tables import association_table, tokens_table, words_table
from extractor.errors import UserError, shortened
from extractor.presentation.report import build_report

DEFAULT_HEIGHT = 900  # pixels of the inline frame; the page scrolls inside it
DEFAULT_MAX_MB = 5.0  # the report's own default bound on one page
TEXT_PREVIEW = 80  # characters of each text in the summary table


@dataclass(frozen=True)
class HTMLView:
    """HTML that Jupyter renders inline (what `IPython.display.HTML` does, without needing IPython)."""

    markup: str

    def _repr_html_(self) -> str:
        return self.markup

    def __repr__(self) -> str:
        return f"HTMLView({len(self.markup):,} characters of HTML; display it in Jupyter)"


def html_view(markup: str) -> Any:
    """`IPython.display.HTML(markup)` when IPython is installed, else an `HTMLView`; both have `_repr_html_`."""
    try:
        from IPython.display import HTML
    except ImportError:
        return HTMLView(markup)
    return HTML(markup)


def measure_names(doc: DocAttention) -> list[str]:
    """The measures one document holds: head-level first, then layer-level."""
    return [*doc.head_measures, *doc.layer_measures]


def model_label(provenance: dict[str, Any]) -> str:
    """`minilm 6×12`: the model's name (shortened) and its layers × heads."""
    name = shortened(str(provenance.get("model") or "model"), 60)
    return f"{name} {provenance.get('n_layers', '?')}×{provenance.get('n_heads', '?')}"


def verdict(report: VerificationReport | None) -> str:
    """`verification passed`, `verification FAILED (3 heads)` or `verification off`."""
    if report is None:
        return "verification off"
    if report.passed:
        return "verification passed"
    return f"verification FAILED ({len(report.failing_heads())} heads)"


def summary_html(
    texts: Sequence[str], docs: Sequence[DocAttention], provenance: dict[str, Any], report: VerificationReport | None
) -> str:
    """A compact HTML summary: model, measures, verification verdict and worst errors, one row per text."""
    summary = verification_summary(report)
    facts = [
        ("model", f"{model_label(provenance)} ({provenance.get('model_class', '')}, "
                  f"{'causal' if provenance.get('causal') else 'bidirectional'})"),
        ("measures", ", ".join(measure_names(docs[0])) if docs else ""),
        ("level", docs[0].level if docs else ""),
        ("verification", verdict(report) + (
            f" · max |Δ pattern| {summary['max_pattern_abs_err']:.2e} · max |Δ z| {summary['max_z_abs_err']:.2e}"
            f" · atol {summary['atol']:g}" if report is not None else "")),
    ]
    head = "".join(
        f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>{html.escape(v)}</td></tr>"
        for k, v in facts
    )
    rows = "".join(
        f"<tr><td>{i}</td><td style='text-align:left'>{html.escape(shortened(text, TEXT_PREVIEW))}</td>"
        f"<td>{doc.doc.n_tokens}</td></tr>"
        for i, (text, doc) in enumerate(zip(texts, docs, strict=True))
    )
    return (
        "<div class='extraction-result'>"
        f"<table>{head}</table>"
        "<table><tr><th>doc</th><th style='text-align:left'>text</th><th>tokens</th></tr>"
        f"{rows}</table></div>"
    )


def write_run_folder(
    folder: Path,
    shown: Sequence[tuple[int, Text, DocAttention]],
    provenance: dict[str, Any],
    causal: bool,
    top_k: int | None,
    report: VerificationReport | None,
    heads: pd.DataFrame,
) -> None:
    """Write `shown` (doc id, text, its measures) into `folder` as a finished run holds them: manifest,
    documents, tokens (and words), association pairs, verification and per-head metrics."""
    level = shown[0][2].level
    associations = pa.concat_tables([association_table(i, doc, causal, top_k) for i, _, doc in shown])
    tables = {
        "documents": pa.table({"doc_id": [i for i, _, _ in shown], "status": ["ok"] * len(shown)}),
        "tokens": pa.concat_tables([tokens_table(i, doc.doc) for i, _, doc in shown]),
        "heads": pa.Table.from_pandas(heads, preserve_index=False),
    }
    if level == "word":
        tables["words"] = pa.concat_tables([words_table(i, doc.doc, text) for i, text, doc in shown])
    if report is not None:
        tables["verification"] = pa.Table.from_pandas(report.table(), preserve_index=False)
    for name, table in tables.items():
        pq.write_table(table, folder / f"{name}.parquet")
    (folder / "associations").mkdir()
    write_associations(associations, folder / "associations" / "part-000000.parquet")
    manifest = {
        "run": "in-memory extraction",
        "status": "complete",
        "config": {
            "input": f"{len(shown)} text(s) in memory",
            "storage": "dense" if top_k is None else "topk",
            "top_k": top_k,
            "level": level,
            "measures": measure_names(shown[0][2]),
            "verify": report is not None,
            "atol": report.atol if report is not None else None,
        },
        "provenance": {k: v for k, v in provenance.items() if k != "config"},
        "verification": verification_summary(report),
        "counts": {
            "records": len(shown), "ok": len(shown), "truncated": 0, "skipped": 0,
            "tokens_processed": sum(doc.doc.n_tokens for _, _, doc in shown),
            "association_rows": associations.num_rows,
        },
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, default=str), encoding="utf-8")


def interactive_page(
    shown: Sequence[tuple[int, Text, DocAttention]],
    provenance: dict[str, Any],
    causal: bool,
    top_k: int | None,
    report: VerificationReport | None,
    heads: pd.DataFrame,
    max_mb: float = DEFAULT_MAX_MB,
) -> str:
    """The report's self-contained page for the documents `shown` (every one embedded, or a UserError)."""
    with tempfile.TemporaryDirectory(prefix="extractor-show-") as tmp:
        write_run_folder(Path(tmp), shown, provenance, causal, top_k, report, heads)
        page, meta = build_report(tmp, max_docs=len(shown), max_bytes=int(max_mb * 1_000_000))
    if meta["sampling"]["left_out_for_size"]:
        raise UserError(
            f"{meta['sampling']['left_out_for_size']} of {len(shown)} document(s) do not fit in max_mb={max_mb:g}; "
            "show fewer or shorter documents, keep the strongest keys per row with top_k=8, or raise max_mb="
        )
    return page


def inline_frame(page: str, height: int = DEFAULT_HEIGHT) -> str:
    """`page` in a sandboxed <iframe srcdoc>: scripts run inside it, and nothing of it reaches the notebook."""
    return (
        f'<iframe class="extractor-view" title="attention explorer" sandbox="allow-scripts" '
        f'style="width: 100%; height: {int(height)}px; border: 1px solid #e3e8ee; border-radius: 6px" '
        f'srcdoc="{html.escape(page, quote=True)}"></iframe>'
    )
