"""`extractor run`: a corpus run, streamed to Parquet, resumable, in bounded memory, with one writer at a time.

The output folder is locked for the whole run. Before anything in it is deleted, `--resume` checks the
settings and the input against the interrupted run's; a complete run's data are never deleted. The engine
(`local`, `ray`: extractor.corpus.engines) does the work; figures and the report are the caller's `extras`.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from extractor.core import runtime
from extractor.core.models import LoadedModel
from extractor.corpus.config import RunConfig
from extractor.corpus.engines import engine_for
from extractor.corpus.extraction import peeked
from extractor.corpus.manifest import VERDICT, check_input_unchanged, check_resumable
from extractor.corpus.readers import read_documents
from extractor.corpus.storage import OutputFolder, Part
from extractor.errors import UserError

# Writes a run's figures and report into its folder: (folder, config, only the missing ones) → what was written.
Extras = Callable[[Path, RunConfig, bool], list[str]]


def run_corpus(
    config: RunConfig, resume: bool = False, overwrite: bool = False, quiet: bool = False,
    loaded: LoadedModel | None = None, after_part: Callable[[Part], None] | None = None,
    extras: Extras | None = None,
) -> dict[str, Any]:
    """Run (or finish) a corpus run; returns the manifest. `extras` writes the figures and report while the
    folder is still locked (after a complete run, only those missing)."""
    runtime.configure(config.threads)
    # Open the input first: a missing file, field or column, or no records, fails before anything is written.
    records = peeked(read_documents(config.input, config.input_format, config.text_field, config.text_column,
                                    config.record_keys),
                     config)
    engine = engine_for(config.engine)
    engine.check_available()  # e.g. without Ray, say how to install it before anything is written
    protect = None if config.input == "-" else Path(config.input)
    folder = OutputFolder.open(config.output, resume=resume, overwrite=overwrite, protect=protect)
    try:
        previous = folder.read_manifest() if resume else None
        if previous:
            check_resumable(previous, config)
            check_input_unchanged(previous, config, folder)
            if previous.get("status") == "complete":
                return complete_run(folder, previous, config, quiet, extras)
        if resume:
            folder.discard_uncommitted(quiet)
        manifest: dict[str, Any] = engine.run(config, folder, records, quiet, loaded, after_part)
        if extras is not None:
            extras(folder.path, config, False)
        if not quiet:
            print(done_line(manifest, folder.path), file=sys.stderr)
        return manifest
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


def complete_run(
    folder: OutputFolder, manifest: dict[str, Any], config: RunConfig, quiet: bool, extras: Extras | None
) -> dict[str, Any]:
    """`--resume` of a run whose data are complete: tidy what an interruption left and write the report and
    figures that are missing. The association files and tables are kept as they are."""
    folder.discard_leftovers()
    missing = extras(folder.path, config, True) if extras is not None else []
    if not quiet:
        print(f"run in '{config.output}' is complete; "
              + (f"wrote the missing {' and '.join(missing)}" if missing else "nothing to do"), file=sys.stderr)
    return manifest


def done_line(manifest: dict[str, Any], path: Path) -> str:
    """The one-line summary a finished run prints."""
    counts = manifest["counts"]
    return (f"done: {counts['records']} records ({counts['ok']} ok, {counts['truncated']} truncated, "
            f"{counts['skipped']} skipped), {counts['association_rows']} association rows, "
            f"verification {VERDICT[manifest['verification']['passed']]} → {path}")
