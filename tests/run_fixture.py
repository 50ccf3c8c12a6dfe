"""Builds a run output folder (the layout `extractor run` writes) from `extractor.api.extract`, for tests of
`extractor plot` and `extractor compare`. One function, so that the real `extractor run` can replace it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from extractor.api import extract
from extractor.core.models import LoadedModel
from extractor.corpus.storage import write_associations
from extractor.heads.metrics import HeadStats
from extractor.heads.similarity import HeadSimilarity

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_CORPUS = REPO_ROOT / "data" / "sample.txt"


def sample_lines(count: int) -> list[str]:
    """The first `count` non-empty lines of data/sample.txt."""
    lines = [line for line in SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:count]


def build_run_folder(
    folder: Path,
    loaded: LoadedModel,
    texts: list[str],
    name: str | None = None,
    level: str = "token",
    storage: str = "dense",
    top_k: int = 4,
    measures: tuple[str, ...] = ("attention", "value_norm"),
) -> Path:
    """Write manifest.json, documents/tokens(/words).parquet, heads.parquet, head_similarity.parquet and
    (unless storage is 'summary') associations/part-000000.parquet, as `extractor run` lays it out, for `texts` under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    result = extract(
        texts,
        model=loaded,
        measures=measures,
        level=level,
        top_k=top_k if storage == "topk" else None,
        verify=False,
    )
    provenance = {k: v for k, v in loaded.provenance.items() if k != "config"}
    tokenizer = loaded.tokenizer
    stats = HeadStats(
        provenance["n_layers"], provenance["n_heads"], result.causal, tokenizer.cls_token, tokenizer.sep_token
    )
    similarity = HeadSimilarity(provenance["n_layers"], provenance["n_heads"])
    for doc in result.docs:
        stats.update(doc)
        similarity.update(doc)
    config = {
        "name": name or folder.name,
        "model": provenance["model"],
        "level": level,
        "storage": storage,
        "top_k": top_k,
        "measures": list(measures),
    }
    manifest = {"config": config, "provenance": provenance, "status": "complete"}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    pq.write_table(pa.Table.from_pandas(stats.table(), preserve_index=False), folder / "heads.parquet")
    pq.write_table(
        pa.Table.from_pandas(similarity.table(), preserve_index=False), folder / "head_similarity.parquet"
    )
    documents = pa.table(
        {"doc_id": pa.array(range(len(texts)), pa.int64()), "status": ["ok"] * len(texts), "text": texts}
    )
    pq.write_table(documents, folder / "documents.parquet")
    pq.write_table(pa.Table.from_pandas(result.tokens(), preserve_index=False), folder / "tokens.parquet")
    if level == "word":
        pq.write_table(pa.Table.from_pandas(result.words(), preserve_index=False), folder / "words.parquet")
    if storage != "summary":
        (folder / "associations").mkdir(exist_ok=True)
        write_associations(result.association_arrow(), folder / "associations" / "part-000000.parquet")
    return folder
