"""Engines: where a corpus run's batches are analysed. One module per engine, one line per engine below.

Every engine module provides
    check_available() -> None        raise a UserError (how to install it) before anything is written
    run(config, folder, records, quiet, loaded, after_part) -> manifest
on an `OutputFolder` the caller has locked and prepared. An engine is imported only when selected, so its
dependencies (Ray) stay optional extras.
"""

from __future__ import annotations

import importlib
from types import ModuleType

ENGINES = {
    "local": "extractor.corpus.engines.local",  # this process; parts committed by a background thread
    "ray": "extractor.corpus.engines.ray",  # blocks of records on Ray Data workers, one output folder
}


def engine_for(name: str) -> ModuleType:
    """The engine module registered as `name` (names are validated by RunConfig against ENGINES)."""
    return importlib.import_module(ENGINES[name])
