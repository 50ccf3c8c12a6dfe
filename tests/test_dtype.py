"""bfloat16 runs: the tolerance follows the dtype, and verification still compares against Hugging Face."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from extractor.api import run_extraction
from extractor.cli import app
from extractor.core.tolerance import BF16_ATOL
from extractor.corpus.config import validate_config


def test_bfloat16_default_tolerance_and_explicit_override() -> None:
    assert validate_config({}).atol == 1e-5
    assert validate_config({"dtype": "bfloat16"}).atol == BF16_ATOL
    assert validate_config({"dtype": "bfloat16", "atol": 1e-3}).atol == 1e-3


def test_bfloat16_run_verifies_against_hugging_face(tiny_model_dir, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The animal didn't cross the street.\nI love pets, especially cats.\n", encoding="utf-8")
    config = validate_config({"model": str(tiny_model_dir("bert")), "input": str(corpus), "dtype": "bfloat16",
                              "output": str(tmp_path / "out"), "plots": False, "report": False})
    manifest = run_extraction(config, quiet=True)
    assert manifest["provenance"]["dtype"] == "bfloat16"
    assert manifest["verification"]["passed"] is True
    assert manifest["verification"]["atol"] == BF16_ATOL
    table = pq.read_table(tmp_path / "out" / "verification.parquet").to_pandas()
    assert (table["atol"] == BF16_ATOL).all() and table["passed"].all()


def test_verify_cli_takes_dtype(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["verify", "--dtype", "bfloat16", "--text", "I love pets, especially cats."])
    assert result.exit_code == 0, result.output
    assert "bfloat16" in result.output and "atol=0.02" in result.output
