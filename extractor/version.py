"""The installed package's version (a leaf module: anything may import it without importing the package's API)."""

from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("attention-extractor")
except importlib.metadata.PackageNotFoundError:
    __version__ = "unknown"
