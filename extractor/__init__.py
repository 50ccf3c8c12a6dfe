"""attention-extractor: see, verify and compare what every attention head of a pretrained transformer does.

The public names are imported on first use (PEP 562), so `import extractor` and the command line start
without loading torch: an interrupt during start-up then reaches the CLI's handler instead of a traceback.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the re-exported names, for type checkers and editors; __getattr__ imports them at run time
    from .analysis import DocAttention, analyse_batch  # noqa: F401
    from .api import ExtractionResult, extract  # noqa: F401
    from .models import LoadedModel, load_model  # noqa: F401
    from .recompute import AttentionRecompute, additive_mask, recompute_attention  # noqa: F401
    from .verify import VerificationReport  # noqa: F401

try:
    __version__ = importlib.metadata.version("attention-extractor")
except importlib.metadata.PackageNotFoundError:
    __version__ = "unknown"

_PUBLIC = {
    "AttentionRecompute": "recompute",
    "DocAttention": "analysis",
    "ExtractionResult": "api",
    "LoadedModel": "models",
    "VerificationReport": "verify",
    "additive_mask": "recompute",
    "analyse_batch": "analysis",
    "extract": "api",
    "load_model": "models",
    "recompute_attention": "recompute",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
