"""Python API for notebooks: `extract(texts, model="minilm")` → an `ExtractionResult` you can query, show
(`result.show()`: the report's explorer inline in Jupyter) and save; `run_extraction(config)` → a corpus run
with its report and figures, as `extractor run` makes it.

Mistakes in the arguments raise `ArgumentError` (a `ValueError` and a `UserError`) whose one line names the
Python argument to change (`model=`, `measures=`), never a command-line flag.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch

from extractor.attribution.analysis import DocAttention, analyse_batch, validate_measures
from extractor.attribution.layer_pass import ZeroingScope, layers_out_of_range
from extractor.attribution.measures import DEFAULT_MEASURES, MEASURES
from extractor.core.encode import Text, encode
from extractor.core.models import LoadedModel, load_model, wrap_model
from extractor.core.verify import DEFAULT_ATOL, VerificationReport, fold
from extractor.corpus.config import RunConfig
from extractor.corpus.run import run_corpus
from extractor.corpus.storage import Part
from extractor.corpus.tables import association_table, tokens_table, words_table
from extractor.errors import UserError, quoted
from extractor.heads.metrics import HeadStats
from extractor.presentation import notebook
from extractor.presentation.explain import normalise_token
from extractor.presentation.extras import FigureHelper, write_extras

LEVELS = ("token", "word")


class ArgumentError(UserError, ValueError):
    """A bad argument of the Python API; the one-line message names the argument (`model=`) and the fix."""


@dataclass(repr=False)
class ExtractionResult:
    """Association measures for a handful of texts, held in memory (use `extractor run` for corpora)."""

    texts: list[Text]  # each a text, or a (text, text_pair) sentence pair
    docs: list[DocAttention]
    report: VerificationReport | None
    causal: bool
    top_k: int | None
    provenance: dict
    cls_token: str | None = None  # the tokenizer's [CLS] and [SEP] tokens, for the per-head metrics
    sep_token: str | None = None

    def __repr__(self) -> str:
        """One line: `ExtractionResult(2 texts, minilm 6×12, measures attention,value_norm, verification passed)`."""
        measures = ",".join(notebook.measure_names(self.docs[0])) if self.docs else "none"
        return (f"ExtractionResult({len(self.texts)} text{'s' * (len(self.texts) != 1)}, "
                f"{notebook.model_label(self.provenance)}, measures {measures}, {notebook.verdict(self.report)})")

    def _repr_html_(self) -> str:
        """Jupyter's view: model, measures, verification verdict and worst errors, a row per text."""
        return notebook.summary_html([shown_text(t) for t in self.texts], self.docs, self.provenance, self.report)

    def _doc(self, doc: int) -> DocAttention:
        if isinstance(doc, bool) or not isinstance(doc, int) or not 0 <= doc < len(self.docs):
            raise ArgumentError(f"doc={quoted(doc)} is not a document of this result; choose 0..{len(self.docs) - 1}")
        return self.docs[doc]

    def tensor(self, doc: int, measure: str = "attention") -> torch.Tensor:
        """One document's measure, every layer stacked: [layer, head, query, key] for a head measure
        (attention, value_norm, ...), [layer, query, key] for a layer measure (rollout, ...); positions are
        tokens (or words at level word), padding trimmed, on the CPU."""
        found = self._doc(doc)
        if measure in found.head_measures:
            return found.head_measures[measure]  # [layer, head, query, key]
        if measure in found.layer_measures:
            return found.layer_measures[measure]  # [layer, query, key]
        raise ArgumentError(f"measure={quoted(measure)} was not computed; this result has: "
                            f"{', '.join(notebook.measure_names(found))} (choose them with extract(measures=...))")

    def attention(self, doc: int = 0) -> torch.Tensor:
        """One document's attention patterns [layer, head, query, key] (each row sums to 1)."""
        return self.tensor(doc, "attention")

    def pattern(self, doc: int, layer: int, head: int, measure: str = "attention") -> torch.Tensor:
        """One head's matrix [query, key] (token or word positions, padding trimmed)."""
        return self.docs[doc].head_measures[measure][layer, head]

    def heads(self, docs: Sequence[int] | None = None) -> pd.DataFrame:
        """Per-head metrics (extractor.heads.metrics) over these texts, or over the documents `docs`:
        one row per (layer, head) with entropy, mean distance, previous-token score, ..."""
        chosen = [self._doc(i) for i in (range(len(self.docs)) if docs is None else docs)]
        if not chosen or "attention" not in chosen[0].head_measures:
            raise ArgumentError("heads() needs the attention measure of at least one document; "
                                "extract with measures= that include 'attention'")
        stats = HeadStats(self.provenance["n_layers"], self.provenance["n_heads"], self.causal,
                          self.cls_token, self.sep_token)
        for doc in chosen:
            stats.update(doc)
        return stats.table()

    def show(self, doc: int | Sequence[int] | None = 0, top_k: int | None = None, height: int = notebook.DEFAULT_HEIGHT,
             max_mb: float = notebook.DEFAULT_MAX_MB) -> Any:
        """The HTML report's explorer for document `doc` (a list of them, or None for all), inline in Jupyter and
        offline: the layer × head grid coloured by per-head metrics, and the token-to-token view.

        `top_k` keeps only the k strongest keys per query row on the page (default: the extraction's own
        `top_k`, else every key); a page over `max_mb` megabytes is refused with a one-line error. Returns an
        object Jupyter displays (`IPython.display.HTML` when IPython is installed)."""
        ids = list(range(len(self.docs))) if doc is None else [doc] if isinstance(doc, int) else list(doc)
        if not ids:
            raise ArgumentError("doc= names no document; pass an index, a list of them, or None for all")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ArgumentError(f"top_k={quoted(top_k)} must be a whole number ≥ 1, or None for every key")
        shown = [(i, self.texts[i], doc) for i, doc in ((i, self._doc(i)) for i in ids)]
        try:
            page = notebook.interactive_page(shown, self.provenance, self.causal, top_k or self.top_k, self.report,
                                             self.heads(ids), max_mb=max_mb)
        except UserError as exc:
            exc.args = (as_python_arguments(str(exc), ExtractionResult.show),)
            raise
        return notebook.html_view(notebook.inline_frame(page, height))

    def tokens(self) -> pd.DataFrame:
        """`doc_id, position, token, word_index, is_special, char_start, char_end, segment` for every real token
        (segment 1: the pair's second text, which its tokens' char spans index into)."""
        return pa.concat_tables([tokens_table(i, d.doc) for i, d in enumerate(self.docs)]).to_pandas()

    def words(self) -> pd.DataFrame:
        """`doc_id, word_index, word, is_special, n_tokens, char_start, char_end, segment` for every word: what
        was typed between spaces (`extractor.core.words`)."""
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
            level = self.docs[0].level if self.docs else "token"
            wanted = normalise_token(token, level)
            frame = frame[frame["query_token"].map(lambda label: normalise_token(label, level)) == wanted]
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


def shown_text(text: Text) -> str:
    """A text as one line for people: a sentence pair as `text ‖ text_pair`."""
    return text if isinstance(text, str) else " ‖ ".join(text)


def _texts_argument(texts: Any) -> list[Text]:
    """`texts=` as a list of texts and (text, text_pair) pairs (a tuple inside the list is a pair; `texts=`
    itself is a text or a sequence of items); a one-line error naming the item that is wrong."""
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items:
        raise ArgumentError("texts= must hold at least one text, each a string with a non-whitespace character")
    for item in items:
        parts = (item,) if isinstance(item, str) else item if isinstance(item, tuple) and len(item) == 2 else None
        if parts is None or any(not isinstance(p, str) or not p.strip() for p in parts):
            raise ArgumentError(f"texts= holds {quoted(item)}: each item must be a text, or a (text, text_pair) "
                                "tuple of two texts, each with a non-whitespace character")
    return items


def extract(
    texts: str | tuple[str, str] | Sequence[str | tuple[str, str]],
    model: str | LoadedModel | torch.nn.Module = "minilm",
    measures: str | Sequence[str] = DEFAULT_MEASURES,
    level: str = "token",
    top_k: int | None = None,
    verify: bool = True,
    atol: float = DEFAULT_ATOL,
    batch_size: int = 16,
    max_length: int | None = None,
    tokenizer: Any = None,
    device: str | None = None,
    value_zeroing_layers: Sequence[int] | None = None,
) -> ExtractionResult:
    """Extract every layer's and head's association measures for `texts` (verified against Hugging Face).

    texts: a text, or a list of them; a tuple `(text, text_pair)` is a sentence pair, tokenised as the tokenizer
    pairs texts (BERT: [CLS] A [SEP] B [SEP], token_type_ids 0 then 1); encoders only: a decoder refuses pairs.

    model: a name (`minilm`, `smollm2`, a Hub id, a folder written by save_pretrained, a `.gguf` file), a
    `LoadedModel`, or a Hugging Face model already in memory with its `tokenizer=` (a fine-tuned one, say; it
    is switched to eager attention and eval mode in place). device: `"cpu"` (default for names), `"cuda"`, ...;
    a model in memory stays where it is unless `device=` is given. measures: names, or one comma-separated
    string. value_zeroing_layers: compute `value_zeroing` only for these layers (0-based; default every layer);
    its matrices of the other layers are NaN (`result.tensor(doc, "value_zeroing")`) and absent from
    `associations()`.
    """
    if level not in LEVELS:
        raise ArgumentError(f"level={quoted(level)} is not supported; choose one of: {', '.join(LEVELS)}")
    texts = _texts_argument(texts)
    measures = _measures_argument(measures)
    for name, value in (("batch_size", batch_size), ("top_k", top_k), ("max_length", max_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ArgumentError(f"{name}={quoted(value)} must be a whole number ≥ 1")
    if not atol > 0:
        raise ArgumentError(f"atol={quoted(atol)} must be a positive tolerance (default {DEFAULT_ATOL:g})")
    zeroing_layers = _layers_argument(value_zeroing_layers)
    loaded = _loaded_model(model, tokenizer, device, atol)
    bad = layers_out_of_range(zeroing_layers, loaded.adapter.n_layers)
    if bad:
        raise ArgumentError(f"value_zeroing_layers={quoted(value_zeroing_layers)} names layer(s) "
                            f"{', '.join(map(str, bad))}, which this model does not have: it has "
                            f"{loaded.adapter.n_layers} layers, 0 to {loaded.adapter.n_layers - 1}")
    if loaded.adapter.causal and any(isinstance(t, tuple) for t in texts):
        raise ArgumentError(f"texts= holds a (text, text_pair) pair, but {loaded.provenance.get('model', 'this model')} "
                            "is a decoder, which reads one text: join the two texts into one string")
    docs: list[DocAttention] = []
    report: VerificationReport | None = None
    for start in range(0, len(texts), batch_size):
        batch = encode(loaded.tokenizer, texts[start : start + batch_size], max_length, loaded.device, loaded.model.config)
        analysis = analyse_batch(loaded, batch, measures, verify=verify, atol=atol, level=level,
                                 zeroing=ZeroingScope(layers=zeroing_layers))
        docs.extend(analysis.docs)
        report = fold(report, analysis.verification)
    return ExtractionResult(
        texts=texts, docs=docs, report=report, causal=loaded.adapter.causal, top_k=top_k, provenance=loaded.provenance,
        cls_token=loaded.tokenizer.cls_token, sep_token=loaded.tokenizer.sep_token,
    )


def _measures_argument(measures: str | Sequence[str]) -> tuple[str, ...]:
    """`measures=` as measure names: a list, or one comma-separated string; a one-line error naming it."""
    names = [m.strip() for m in measures.split(",")] if isinstance(measures, str) else list(measures)
    unknown = [m for m in names if m not in MEASURES]
    if unknown or not names:
        found = f"has unknown measure(s) {', '.join(map(str, unknown))}" if unknown else "is empty"
        raise ArgumentError(f"measures={quoted(measures)} {found}; choose from: {', '.join(MEASURES)}")
    return validate_measures(names)


def _layers_argument(layers: Sequence[int] | None) -> frozenset[int] | None:
    """`value_zeroing_layers=` as a set of layer indices (None: every layer); a one-line error naming it."""
    if layers is None:
        return None
    items = list(layers) if isinstance(layers, Sequence) and not isinstance(layers, str) else None
    if not items or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
        raise ArgumentError(f"value_zeroing_layers={quoted(layers)} must be a non-empty list of 0-based layer "
                            "indices (e.g. [0, 3, 5]), or None for every layer")
    return frozenset(items)


def as_python_arguments(message: str, function: Callable[..., Any]) -> str:
    """An error line from below the API with the command-line options that are arguments of `function` written
    as Python arguments (`use --model minilm` → `use model="minilm"`); other text (`pip install --no-deps`)
    stays."""
    arguments = {name.replace("_", "-") for name in inspect.signature(function).parameters}

    def rewrite(match: re.Match[str]) -> str:
        flag, value = match.group(1), match.group(2)
        if flag not in arguments:
            return match.group(0)
        return f"{flag.replace('-', '_')}=" + (f'"{value}"' if value else "")

    return re.sub(r"--([a-z][a-z-]*)(?: ([\w./-]+))?", rewrite, message)


def _loaded_model(model: Any, tokenizer: Any, device: str | None, atol: float) -> LoadedModel:
    """`model=` (name, LoadedModel or Hugging Face model + `tokenizer=`) as a LoadedModel on `device`."""
    try:
        if isinstance(model, str):
            if tokenizer is not None:
                raise ArgumentError(f"tokenizer= goes with a model in memory; model={quoted(model)} loads its own")
            return load_model(model, device=device or "cpu", tolerance=atol)
        if isinstance(model, LoadedModel):
            if tokenizer is not None:
                raise ArgumentError("tokenizer= goes with a Hugging Face model; a LoadedModel has its own")
            if device is not None and torch.device(device) != model.device:
                raise ArgumentError(f"model= is a LoadedModel on {model.device}, not device={quoted(device)}; "
                                    f"load it with load_model(..., device={quoted(device)})")
            return model
        if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
            if tokenizer is None:
                raise ArgumentError(f"model= is a {type(model).__name__} in memory: pass its tokenizer too, "
                                    "tokenizer=AutoTokenizer.from_pretrained(...)")
            return wrap_model(model, tokenizer, device=device, tolerance=atol)
    except UserError as exc:
        exc.args = (as_python_arguments(str(exc), extract),)
        raise
    raise ArgumentError(f"model={quoted(model)} is not a model: pass a name (\"minilm\"), a folder, a LoadedModel, "
                        "or a Hugging Face model with tokenizer=")


def run_extraction(
    config: RunConfig, resume: bool = False, overwrite: bool = False, quiet: bool = False,
    loaded: LoadedModel | None = None, after_part: Callable[[Part], None] | None = None,
    figure_helper: FigureHelper | None = None,
) -> dict:
    """A corpus run (see `extractor.corpus.run.run_corpus`) followed by its report and figures, as `config`
    asks; returns the manifest. `--resume` of a complete run writes the report and figures that are missing.
    `figure_helper`: a helper process started before the run (`FigureHelper.start`) that draws the figures."""
    return run_corpus(config, resume=resume, overwrite=overwrite, quiet=quiet, loaded=loaded, after_part=after_part,
                      extras=functools.partial(write_extras, helper=figure_helper))
