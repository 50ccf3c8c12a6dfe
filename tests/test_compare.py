"""`extractor compare`: per-head metric differences (B − A) of two runs, and refusal when shapes differ."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from run_fixture import build_run_folder, sample_lines  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from extractor.cli import app  # noqa: E402
from extractor.errors import UserError  # noqa: E402
from extractor.heads.compare import heads_difference, largest_changes  # noqa: E402
from extractor.heads.metrics import METRICS  # noqa: E402

TEXTS = sample_lines(3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_loaded, minilm) -> dict[str, Path]:
    """Runs of four models: tiny BERT, tiny BERT with other weights, tiny GPT-2 (2 × 4), MiniLM (6 × 12)."""
    root = tmp_path_factory.mktemp("compare")
    return {
        "bert": build_run_folder(root / "bert", tiny_loaded("bert"), TEXTS),
        "bert_other": build_run_folder(
            root / "bert_other", tiny_loaded("bert", initializer_range=0.1), TEXTS
        ),
        "gpt2": build_run_folder(root / "gpt2", tiny_loaded("gpt2"), TEXTS, storage="summary"),
        "minilm": build_run_folder(root / "minilm", minilm, TEXTS[:1], storage="summary"),
    }


def hand_heads(values: list[float]) -> pd.DataFrame:
    """A 1-layer, 2-head heads table where every metric of head h is values[h]."""
    return pd.DataFrame(
        [{"layer": 0, "head": h, "n_rows": 5 + h, **{m: v for m in METRICS}} for h, v in enumerate(values)]
    )


def test_difference_is_b_minus_a_per_head() -> None:
    a, b = hand_heads([0.25, 1.0]), hand_heads([0.75, 0.5])
    b.loc[1, "induction_score"] = np.nan
    difference = heads_difference(a, b)
    values = [f"{m}_{run}" for m in METRICS for run in ("a", "b")]
    assert list(difference.columns) == ["layer", "head", "n_rows_a", "n_rows_b", *METRICS, *values]
    assert difference["entropy"].tolist() == [0.5, -0.5]
    assert difference["entropy_a"].tolist() == [0.25, 1.0] and difference["entropy_b"].tolist() == [0.75, 0.5]
    assert np.isnan(difference.loc[1, "induction_score"]) and difference.loc[0, "induction_score"] == 0.5
    assert difference["n_rows_a"].tolist() == [5, 6]
    lines = largest_changes(difference, count=1)
    entropy = [line for line in lines if line.startswith("entropy: ")]
    assert entropy == ["entropy: L0H0 0.250 → 0.750 (+0.500)"] or entropy == ["entropy: L0H1 1.000 → 0.500 (-0.500)"]
    assert all(line.split(":")[0] in METRICS for line in lines)  # ranked within each metric, one line each


def test_largest_changes_says_when_nothing_changed() -> None:
    heads = hand_heads([0.25, 1.0])
    assert largest_changes(heads_difference(heads, heads)) == ["no per-head metric changed between the two runs"]


def test_difference_matches_heads_even_when_rows_are_in_another_order() -> None:
    a, b = hand_heads([0.25, 1.0]), hand_heads([0.75, 0.5]).iloc[::-1]
    assert heads_difference(a, b)["entropy"].tolist() == [0.5, -0.5]


def test_compare_two_different_models(runs: dict[str, Path]) -> None:
    result = CliRunner().invoke(app, ["compare", str(runs["bert"]), str(runs["gpt2"])])
    assert result.exit_code == 0, result.output
    folder = runs["gpt2"] / "compare_vs_bert"
    assert f"to {folder}" in result.output and "largest changes per metric (A → B, B − A):" in result.output
    difference = pq.read_table(folder / "heads_diff.parquet").to_pandas()
    a = pq.read_table(runs["bert"] / "heads.parquet").to_pandas()
    b = pq.read_table(runs["gpt2"] / "heads.parquet").to_pandas()
    assert len(difference) == 8

    def entropy(frame: pd.DataFrame) -> float:
        return frame.loc[(frame["layer"] == 1) & (frame["head"] == 2), "entropy"].item()

    assert entropy(difference) == pytest.approx(entropy(b) - entropy(a))
    assert difference["induction_score"].isna().all()  # BERT has no induction score
    assert difference["cls"].isna().all()  # GPT-2 has no [CLS]
    heatmaps = sorted(p.name for p in folder.glob("diff_*.png"))
    assert "diff_entropy.png" in heatmaps and "diff_cls.png" not in heatmaps
    assert all((folder / name).stat().st_size > 1000 for name in heatmaps)
    assert len(list(folder.glob("diff_*.svg"))) == len(heatmaps)
    assert "change (B − A) in" in (folder / "diff_entropy.svg").read_text()


def test_compare_two_models_of_one_family_into_a_chosen_folder(runs: dict[str, Path], tmp_path: Path) -> None:
    from extractor.presentation.compare import compare_runs

    difference, paths = compare_runs(runs["bert"], runs["bert_other"], tmp_path / "out")
    assert paths[0] == tmp_path / "out" / "heads_diff.parquet" and paths[0].is_file()
    assert (difference["entropy"].abs() > 1e-6).any()  # other weights, other heads
    assert (difference["n_rows_a"] == difference["n_rows_b"]).all()  # same texts, same tokenizer
    # Compared with itself, every difference is exactly zero.
    heads = pq.read_table(runs["bert"] / "heads.parquet").to_pandas()
    same = heads_difference(heads, heads)
    assert (same[[m for m in METRICS if m != "induction_score"]] == 0).all().all()


def test_compare_refuses_models_of_different_shapes(runs: dict[str, Path]) -> None:
    result = CliRunner().invoke(app, ["compare", str(runs["minilm"]), str(runs["bert"])])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot compare")
    assert "(6 layers × 12 heads)" in lines[0] and "(2 layers × 4 heads)" in lines[0]
    assert not (runs["bert"] / "compare_vs_minilm").exists()


def test_compare_refuses_a_folder_that_is_not_a_run(runs: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["compare", str(tmp_path), str(runs["bert"])])
    assert result.exit_code == 2 and "manifest.json" in result.output


def test_compare_refuses_a_run_without_heads(runs: dict[str, Path], tmp_path: Path) -> None:
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "manifest.json").write_text(
        (runs["bert"] / "manifest.json").read_text().replace('"complete"', '"running"')
    )
    from extractor.presentation.compare import compare_runs

    with pytest.raises(UserError, match=r"no heads.parquet \(status: running\)"):
        compare_runs(runs["bert"], unfinished)
