"""The package's layout is its architecture: imports point one way, down the pipeline, and nothing cycles.

    core → attribution → heads → corpus → presentation → (api, cli, bench)

A module may import its own layer or any layer to its left (and `errors`, `version`), never one to its right;
every import counts, lazy ones inside functions included. A corpus run (and every Ray worker) must therefore
never import matplotlib: figures are the presentation layer's.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "extractor"
LAYERS = {"errors": 0, "version": 0, "core": 1, "attribution": 2, "heads": 3, "corpus": 4, "presentation": 5,
          "api": 6, "cli": 6, "bench": 6, "__main__": 7}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every `extractor.…` module `path` imports, at any depth (functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("extractor"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("extractor"))
    return found


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_module_imports_a_layer_above_its_own(path: Path) -> None:
    own = layer(module_name(path))
    if own is None:  # the package root re-exports the public API lazily
        return
    upward = sorted(m for m in imports(path) if (other := layer(m)) is not None and other > own)
    assert upward == [], f"{module_name(path)} (layer {own}) imports {upward}"


def test_every_subpackage_has_a_layer() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    files = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert folders | files <= set(LAYERS), (folders | files) - set(LAYERS)


def test_a_corpus_run_imports_no_plotting_library() -> None:
    code = ("import sys, extractor.corpus.run, extractor.corpus.engines.local, extractor.corpus.engines.ray; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'seaborn')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_benchmark_finds_its_corpus() -> None:
    """The benchmark reads the repository's sample corpus by a path relative to its own module."""
    from extractor.bench.throughput import SAMPLE

    assert SAMPLE.is_file() and SAMPLE.name == "sample.txt"
