"""The local engine: batches analysed in this process, parts committed in a background thread."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from extractor.core.models import LoadedModel, load_model
from extractor.corpus.config import RunConfig
from extractor.corpus.extraction import Extraction, expected_records, limited
from extractor.corpus.manifest import base_manifest, finish
from extractor.corpus.progress import Progress
from extractor.corpus.readers import SourceRecord
from extractor.corpus.storage import OutputFolder, Part


def run(
    config: RunConfig, folder: OutputFolder, records: Iterator[SourceRecord], quiet: bool,
    loaded: LoadedModel | None, after_part: Callable[[Part], None] | None,
) -> dict[str, Any]:
    """Analyse every batch here; parts are committed in the background while the next batch is analysed."""
    started = time.time()
    records = iter(limited(records, config.limit))
    loaded = loaded or load_model(config.model, config.device, config.dtype, config.atol)
    load_seconds = time.time() - started
    # the checks that need the model (layers, decoder or encoder) fail here, before the manifest is written
    extraction = Extraction(config, loaded, warn=None if quiet else lambda line: print(f"warning: {line}", file=sys.stderr))
    manifest = base_manifest(config, loaded.provenance, started)
    folder.write_manifest(manifest)
    done = folder.committed_doc_ids()
    total = expected_records(config)
    progress = Progress(None if total is None else max(total - len(done), 0), quiet)
    try:
        for part in extraction.parts(records, folder.next_part_id(), done):
            folder.submit(part)
            progress.update(len(part.documents), part.state.get("n_tokens", 0))
            if after_part is not None:
                after_part(part)
        folder.flush()
    finally:
        progress.close()
    return finish(folder, manifest, started, load_seconds)


def check_available() -> None:
    """The local engine needs nothing beyond the package's own dependencies."""
