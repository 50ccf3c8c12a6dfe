"""bfloat16 runs: the tolerance follows the dtype, and verification still compares against Hugging Face."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from extractor.api import run_extraction
from extractor.cli import app
from extractor.core.tolerance import BF16_ATOL, BF16_RTOL
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


def test_bfloat16_run_of_probed_batches_on_the_real_minilm(tmp_path: Path) -> None:
    """Batches after the first run the sdpa kernel and are probed: in bfloat16 the kernel accumulates in float32,
    so the pattern is computed in float32 for the z probe (in bfloat16 it missed the tolerance by up to 0.004)."""
    sample = Path(__file__).resolve().parent.parent / "data" / "sample.txt"
    config = validate_config({"model": "minilm", "input": str(sample), "dtype": "bfloat16", "batch_size": 8,
                              "output": str(tmp_path / "out"), "plots": False, "report": False})
    manifest = run_extraction(config, quiet=True)
    assert manifest["verification"]["passed"] is True, manifest["verification"]
    table = pq.read_table(tmp_path / "out" / "verification.parquet").to_pandas()
    assert (table["n_docs_compared"] == 8).all() and (table["n_docs"] == 60).all()  # 7 of 8 batches probed
    assert 0 < table["z_probe_err"].max() <= BF16_ATOL / 2 and table["projection_rel_err"].max() <= BF16_RTOL / 2
