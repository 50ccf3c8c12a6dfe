"""attention-extractor: see, verify and compare what every attention head of a pretrained transformer does.

The public names are imported on first use (PEP 562), so `import extractor` and the command line start
without loading torch: an interrupt during start-up then reaches the CLI's handler instead of a traceback.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the re-exported names, for type checkers and editors; __getattr__ imports them at run time
    from extractor.api import ExtractionResult, extract, run_extraction  # noqa: F401
    from extractor.attribution.analysis import DocAttention  # noqa: F401
    from extractor.core.models import LoadedModel, load_model  # noqa: F401
    from extractor.core.recompute import AttentionRecompute, recompute_attention  # noqa: F401
    from extractor.core.verify import VerificationReport  # noqa: F401
    from extractor.corpus.config import RunConfig  # noqa: F401
    from extractor.corpus.run_folder import RunFolder, open_run  # noqa: F401

from extractor.version import __version__ as __version__

# What a notebook user needs, and where it lives: extract texts, run over a corpus, open a finished run, check
# the recomputation. Everything else is reached through its subpackage.
_PUBLIC = {
    "extract": "extractor.api",
    "ExtractionResult": "extractor.api",
    "run_extraction": "extractor.api",
    "RunConfig": "extractor.corpus.config",
    "open_run": "extractor.corpus.run_folder",
    "RunFolder": "extractor.corpus.run_folder",
    "load_model": "extractor.core.models",
    "LoadedModel": "extractor.core.models",
    "DocAttention": "extractor.attribution.analysis",
    "VerificationReport": "extractor.core.verify",
    "AttentionRecompute": "extractor.core.recompute",
    "recompute_attention": "extractor.core.recompute",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
