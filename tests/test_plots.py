"""Figures: non-empty PNG and SVG with the expected panels, labels and titles; `extractor plot`."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import shutil  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from run_fixture import build_run_folder, sample_lines  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from extractor.api import extract  # noqa: E402
from extractor.cli import app  # noqa: E402
from extractor.corpus import run_folder as outputs
from extractor.errors import UserError  # noqa: E402
from extractor.heads.clustering import cluster_heads  # noqa: E402
from extractor.heads.metrics import METRICS  # noqa: E402
from extractor.presentation import plots

TEXTS = sample_lines(3)


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory: pytest.TempPathFactory, tiny_loaded) -> Path:
    return build_run_folder(tmp_path_factory.mktemp("runs") / "bert", tiny_loaded("bert"), TEXTS)


@pytest.fixture(scope="module")
def gpt2_topk_run(tmp_path_factory: pytest.TempPathFactory, tiny_loaded) -> Path:
    return build_run_folder(
        tmp_path_factory.mktemp("runs") / "gpt2", tiny_loaded("gpt2"), TEXTS, storage="topk", top_k=3
    )


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory: pytest.TempPathFactory, minilm) -> Path:
    return build_run_folder(tmp_path_factory.mktemp("runs") / "minilm", minilm, TEXTS[:2])


def heatmap_meshes(ax) -> int:
    """Number of heatmap meshes (seaborn's) drawn on `ax` (0 for a colour bar's axes)."""
    if hasattr(ax, "_colorbar"):
        return 0
    return sum(type(c).__name__ == "QuadMesh" for c in ax.collections)


def assert_written(paths: list[Path]) -> None:
    for path in paths:
        assert path.is_file() and path.stat().st_size > 1000, path
        head = path.read_bytes()[:8]
        assert head.startswith(b"\x89PNG") if path.suffix == ".png" else b"<?xml" in head or b"<svg" in head


# --- figure builders (panels) -------------------------------------------------------------------------------


def hand_heads_table() -> pd.DataFrame:
    rows = [
        {"layer": layer, "head": head, "n_rows": 10, **{m: layer + head / 10 for m in METRICS}}
        for layer in range(2)
        for head in range(3)
    ]
    return pd.DataFrame(rows)


def test_head_metric_figure_is_a_layer_by_head_heatmap_with_colour_bar() -> None:
    figure = plots.head_metric_figure(hand_heads_table(), "entropy", "tiny: entropy")
    heatmap, colour_bar = figure.axes
    assert heatmap_meshes(heatmap) == 1
    mesh = heatmap.collections[0].get_array().reshape(2, 3)
    np.testing.assert_allclose(mesh, [[0.0, 0.1, 0.2], [1.0, 1.1, 1.2]])  # rows = layers, columns = heads
    assert heatmap.get_xlabel() == "head" and heatmap.get_ylabel() == "layer"
    assert heatmap.get_title() == "tiny: entropy"
    assert "entropy" in colour_bar.get_ylabel()


def test_doc_grid_is_one_mosaic_with_every_head_in_its_tile() -> None:
    matrices = np.random.default_rng(0).random((2, 3, 4, 4)).astype(np.float32)
    figure = plots.doc_grid_figure(matrices, ["a", "b", "c", "d"], "tiny grid")
    images = [ax for ax in figure.axes if ax.images]
    assert len(images) == 1 and len(figure.axes) == 2  # one mosaic + one shared colour bar
    mosaic = np.ma.getdata(images[0].images[0].get_array())
    gap = 1  # max(1, 4 // 12)
    for layer in range(2):
        for head in range(3):
            top, left = layer * (4 + gap), head * (4 + gap)
            np.testing.assert_array_equal(mosaic[top : top + 4, left : left + 4], matrices[layer, head])
    assert np.isnan(mosaic[4, :]).all() and np.isnan(mosaic[:, 4]).all()  # white gutters between tiles
    ticks = [t.get_text() for t in images[0].get_xticklabels()]
    assert ticks == ["head 0", "head 1", "head 2"]
    assert "tiny grid" in images[0].get_title() and "a b c d" in images[0].get_title()  # right above the mosaic


def test_doc_grid_pools_long_documents_keeping_sharp_weights() -> None:
    matrices = np.zeros((1, 1, 512, 512), dtype=np.float32)
    matrices[0, 0, 300, 7] = 0.9  # one sharp weight must survive the reduction
    small = plots.pooled(matrices, 128)
    assert small.shape == (1, 1, 128, 128)
    assert small.max() == np.float32(0.9) and small[0, 0, 300 // 4, 7 // 4] == np.float32(0.9)
    assert plots.pooled(matrices[..., :100, :100], 128).shape == (1, 1, 100, 100)  # small ones unchanged


def test_doc_head_figure_labels_queries_and_keys() -> None:
    labels = ["[CLS]", "the", "cat", "[SEP]"]
    figure = plots.doc_head_figure(np.eye(4), labels, "minilm: attention, doc 0, layer 1 head 2")
    heatmap = figure.axes[0]
    assert [t.get_text() for t in heatmap.get_xticklabels()] == labels
    assert [t.get_text() for t in heatmap.get_yticklabels()] == labels
    assert len(figure.axes) == 2 and heatmap.get_title().endswith("layer 1 head 2")


def test_attention_vs_value_norm_side_by_side_on_row_shares() -> None:
    attention = np.array([[0.5, 0.5], [0.2, 0.8]])
    value_norm = np.array([[3.0, 1.0], [0.0, 2.0]])
    figure = plots.attention_vs_value_norm_figure(attention, value_norm, ["x", "y"], "tiny: L0H0")
    assert len(figure.axes) == 4  # two heatmaps, two colour bars
    left, right = [ax for ax in figure.axes if ax.images and not hasattr(ax, "_colorbar")]
    np.testing.assert_allclose(left.images[0].get_array(), attention)
    np.testing.assert_allclose(right.images[0].get_array(), [[0.75, 0.25], [0.0, 1.0]])
    assert left.images[0].get_clim() == right.images[0].get_clim() == (0.0, 1.0)  # one fixed 0..1 scale


def images_by_size(figure) -> list:
    """The figure's axes that hold an image, largest image first (colour bars' own axes left out)."""
    axes = [ax for ax in figure.axes if ax.images and not hasattr(ax, "_colorbar")]
    return sorted(axes, key=lambda ax: -ax.images[0].get_array().shape[0] * ax.images[0].get_array().shape[1])


def test_clustermap_labels_every_head(bert_run: Path) -> None:
    similarity = outputs.read_similarity(bert_run)
    figure = plots.similarity_clustermap_figure(similarity, "tiny: head similarity")
    clustering = cluster_heads(similarity)
    heatmap, *strips = images_by_size(figure)  # the 8 × 8 heatmap, then the 8 × 1 layer strips and the key
    labels = [t.get_text() for t in heatmap.get_yticklabels()]
    assert labels == [clustering.labels[i] for i in clustering.order]  # every head, in the tree's leaf order
    assert [t.get_text() for t in heatmap.get_xticklabels()] == labels
    assert set(labels) == {f"L{layer}H{head}" for layer in range(2) for head in range(4)}
    np.testing.assert_allclose(heatmap.images[0].get_array(),
                               clustering.divergence[np.ix_(clustering.order, clustering.order)])
    # the layer strips beside the rows and above the columns: each head's layer colour, in the rows' order
    colours = plots.layer_colours(2)
    expected = colours[[plots.layer_of(label) for label in labels]]
    row_strip = next(ax for ax in strips if ax.images[0].get_array().shape[:2] == (8, 1))
    column_strip = next(ax for ax in strips if ax.images[0].get_array().shape[:2] == (1, 8))
    np.testing.assert_allclose(row_strip.images[0].get_array()[:, 0], expected)
    np.testing.assert_allclose(column_strip.images[0].get_array()[0], expected)
    # the strip's key names each layer, and each band has its layer's colour
    key = next(ax for ax in strips if ax.images[0].get_array().shape[:2] == (2, 1))
    assert [t.get_text() for t in key.get_yticklabels()] == ["0", "1"]
    np.testing.assert_allclose(key.images[0].get_array()[::-1, 0], colours)
    # one dendrogram on the top and one on the left, each with a link per merge
    trees = [ax for ax in figure.axes if ax.collections and not ax.images and not hasattr(ax, "_colorbar")]
    assert len(trees) == 2 and all(len(ax.collections[0].get_segments()) == 7 for ax in trees)


def similarity_table(n_layers: int, n_heads: int) -> pd.DataFrame:
    """A head_similarity table of random symmetric divergences for n_layers × n_heads heads."""
    heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    rng = np.random.default_rng(0)
    divergence = rng.random((len(heads), len(heads)))
    divergence = divergence + divergence.T
    return pd.DataFrame([{"layer_a": a[0], "head_a": a[1], "layer_b": b[0], "head_b": b[1],
                          "js_divergence": 0.0 if i == j else divergence[i, j]}
                         for i, a in enumerate(heads) for j, b in enumerate(heads)])


def assert_laid_out(figure, panels: list) -> None:
    """Nothing leaves the figure, and no two of `panels` (display boxes) nor the title overlap."""
    renderer = figure.canvas.get_renderer()
    inside = figure.bbox
    drawn = figure.get_tightbbox(renderer).transformed(figure.dpi_scale_trans)  # inches → display
    assert inside.x0 - 1 <= drawn.x0 and drawn.x1 <= inside.x1 + 1 and inside.y0 - 1 <= drawn.y0, drawn
    assert drawn.y1 <= inside.y1 + 1, drawn
    for i, one in enumerate(panels):
        for other in panels[i + 1:]:
            assert not one.overlaps(other), (one, other)
    title = figure._suptitle.get_window_extent(renderer)
    assert not any(title.overlaps(panel) for panel in panels)


@pytest.mark.parametrize(("n_layers", "n_heads"), [(1, 2), (2, 4), (6, 12), (30, 9)])
def test_clustermap_is_laid_out_to_fit_without_cropping(n_layers: int, n_heads: int) -> None:
    """Saved uncropped (`fits`): the tree, strips, heatmap with its tick labels, both colour keys and the title
    stay inside the figure and apart, from two heads (no tree) to SmolLM2's 270."""
    figure = plots.similarity_clustermap_figure(similarity_table(n_layers, n_heads), "a model: head similarity")
    assert getattr(figure, "fits", False)
    renderer = figure.canvas.get_renderer()
    figure.draw(renderer)
    heatmap = images_by_size(figure)[0]
    bars = [ax for ax in figure.axes if hasattr(ax, "_colorbar")]
    key = next(ax for ax in images_by_size(figure) if ax.images[0].get_array().shape[:2] == (n_layers, 1)
               and ax.get_yticklabels())
    trees = [ax for ax in figure.axes if ax.collections and not ax.images and not hasattr(ax, "_colorbar")]
    assert len(trees) == (2 if n_layers * n_heads > 2 else 0)
    assert_laid_out(figure, [ax.get_tightbbox(renderer) for ax in [heatmap, *bars, key, *trees]])


def test_share_metrics_share_one_fixed_colour_scale() -> None:
    """Shares and scores are drawn on 0..1 whatever their values, so `cls` and `cls_value_norm` compare by
    colour; entropy keeps its own range."""
    table = hand_heads_table()
    for metric in ("cls", "cls_value_norm", "previous_token_score"):
        mesh = plots.head_metric_figure(table, metric, metric).axes[0].collections[0]
        assert mesh.get_clim() == (0.0, 1.0), metric
    entropy = plots.head_metric_figure(table, "entropy", "entropy").axes[0].collections[0]
    assert entropy.get_clim() == (0.0, 1.2)  # the data's own range


@pytest.mark.parametrize(("n_layers", "n_heads"), [(2, 3), (6, 12), (30, 9), (48, 40)])
def test_overview_is_laid_out_to_fit_without_cropping(n_layers: int, n_heads: int) -> None:
    """The overview is saved uncropped (`fits`), so its own layout must keep every text and map inside the
    figure, and no two panels' texts, maps or colour bars may overlap: for tiny, MiniLM, SmolLM2 and a
    48-layer × 40-head model (more than 40 rows or columns are drawn at the 40 size)."""
    rng = np.random.default_rng(0)
    heads = pd.DataFrame([{"layer": layer, "head": head, "n_rows": 10, **{m: rng.random() * 30 for m in METRICS}}
                          for layer in range(n_layers) for head in range(n_heads)])
    figure = plots.head_metrics_overview_figure(heads, "a model: per-head metrics over the corpus")
    assert getattr(figure, "fits", False)
    renderer = figure.canvas.get_renderer()
    figure.draw(renderer)
    metrics = plots.plotted_metrics(heads)
    maps = [ax for ax in figure.axes if not hasattr(ax, "_colorbar")]
    shared = [ax for ax in figure.axes if ax.get_label() == plots.SHARED_BAR]
    bars = {id(ax._colorbar.mappable): ax for ax in figure.axes if hasattr(ax, "_colorbar") and ax not in shared}
    assert len(maps) == len(metrics)
    # entropy and distance each have a bar of their own range; every other map is on 0..1, with one shared bar
    own = {metric: bars.get(id(ax.images[0])) for metric, ax in zip(metrics, maps, strict=True)}
    assert {m for m, bar in own.items() if bar is not None} == set(plots.UNBOUNDED_METRICS) & set(metrics)
    bounded = [ax for metric, ax in zip(metrics, maps, strict=True) if metric not in plots.UNBOUNDED_METRICS]
    assert all(ax.images[0].get_clim() == (0.0, 1.0) for ax in bounded)
    assert len(shared) == 1 and shared[0]._colorbar.mappable.get_clim() == (0.0, 1.0)
    # tick labels on the outer maps only: layers on the first column, heads under the last map of each column
    for index, ax in enumerate(maps):
        assert bool(ax.get_yticklabels()) == bool(ax.get_ylabel()) == (index % 4 == 0), index
        assert bool(ax.get_xticklabels()) == bool(ax.get_xlabel()) == (index + 4 >= len(maps)), index
    # each panel = its map, its own colour bar if any, and their titles, labels and tick labels; the shared bar
    panels = [ax.get_tightbbox(renderer).union([ax.get_tightbbox(renderer),
                                                (own[metric] or ax).get_tightbbox(renderer)])
              for metric, ax in zip(metrics, maps, strict=True)]
    assert_laid_out(figure, [*panels, shared[0].get_tightbbox(renderer)])


def test_default_head_is_the_sharpest_that_is_not_positional() -> None:
    table = hand_heads_table()
    for metric in ("previous_token", "self", "first_token", "cls", "sep"):
        table[metric] = 0.1
    table["entropy"] = [0.5, 0.2, 0.9, 0.8, 0.3, 0.7]  # L0H1 is the sharpest, L1H1 next
    table.loc[1, "previous_token"] = 0.95  # ... but L0H1 is a previous-token head
    assert plots.choose_head(table) == (1, 1)
    table["first_token"] = 0.9  # every head is positional: fall back to the sharpest overall
    assert plots.choose_head(table) == (0, 1)
    assert plots.choose_head(table, layer=1) == (1, 1)


def test_minilm_grid_labels_6_layers_and_12_heads(minilm_run: Path) -> None:
    matrices, labels = outputs.doc_matrices(minilm_run, 0)
    assert matrices.shape[:2] == (6, 12)
    figure = plots.doc_grid_figure(matrices, labels, "minilm grid")
    mosaic = figure.axes[0]
    assert [t.get_text() for t in mosaic.get_yticklabels()] == [f"layer {i}" for i in range(6)]
    assert [t.get_text() for t in mosaic.get_xticklabels()] == [f"head {i}" for i in range(12)]


# --- reading a run folder -----------------------------------------------------------------------------------


def test_doc_matrix_round_trips_the_extracted_pattern(minilm_run: Path, minilm) -> None:
    result = extract(TEXTS[:2], model=minilm, measures=("attention", "value_norm"), verify=False)
    matrix, labels = outputs.doc_matrix(minilm_run, 1, layer=3, head=7)
    np.testing.assert_allclose(matrix, result.pattern(1, 3, 7).numpy(), atol=1e-7)
    doc = result.docs[1].doc  # labels: each token's slice of the text, the token string for empty spans
    assert labels == [TEXTS[1][a:b].strip() if b > a else t for t, (a, b) in zip(doc.tokens, doc.offsets, strict=True)]
    assert labels != doc.tokens  # MiniLM lower-cases: the labels keep the text's capitals
    np.testing.assert_allclose(matrix.sum(axis=-1), 1.0, atol=1e-5)  # dense storage: rows sum to 1


def test_word_level_run_reads_word_labels(tmp_path: Path, tiny_loaded) -> None:
    text = "I love pets, especially cats."
    run = build_run_folder(tmp_path / "words", tiny_loaded("bert"), [text], level="word")
    matrix, labels = outputs.doc_matrix(run, 0, layer=0, head=1)
    assert labels == ["[CLS]", *text.split(), "[SEP]"]  # words are what was typed between spaces
    assert matrix.shape == (len(labels), len(labels))
    np.testing.assert_allclose(matrix.sum(axis=-1), 1.0, atol=1e-5)


def test_reader_errors_are_user_errors(tmp_path: Path, bert_run: Path) -> None:
    with pytest.raises(UserError, match="manifest.json"):
        outputs.read_manifest(tmp_path)
    with pytest.raises(UserError, match="doc ids are: 0, 1, 2"):
        outputs.doc_matrix(bert_run, 9, 0, 0)
    with pytest.raises(UserError, match="--head 4 is out of range"):
        outputs.doc_matrix(bert_run, 0, 0, 4)
    with pytest.raises(UserError, match="rollout.*stored: attention, value_norm"):
        outputs.doc_matrix(bert_run, 0, 0, 0, measure="rollout")


# --- the default set (drawn once, through the command) ------------------------------------------------------


def test_plot_command_writes_the_default_set(bert_run: Path) -> None:
    result = CliRunner().invoke(app, ["plot", str(bert_run)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["plot", str(bert_run), "--doc", "1"])  # adds only doc 1's figures
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote 6 files to {bert_run / 'plots'}"
    paths = sorted((bert_run / "plots").iterdir())
    assert_written(paths)
    stems = {p.stem for p in paths}
    metrics = [m for m in METRICS if m != "induction_score"]  # NaN for an encoder: no figure
    assert {f"heads_{m}" for m in metrics} <= stems and "heads_induction_score" not in stems
    assert "head_similarity_clustermap" in stems and "heads_overview" in stems
    heads = outputs.read_heads(bert_run)
    content = heads[(heads[["previous_token", "self", "first_token", "cls", "sep"]] < 0.5).all(axis=1)]
    layer, head = (
        (content if len(content) else heads).sort_values("entropy").iloc[0][["layer", "head"]].astype(int)
    )  # default: the sharpest head that is not a positional one
    assert {f"doc1_L{layer}H{head}", "doc1_grid", f"doc1_L{layer}H{head}_attention_vs_value_norm"} <= stems
    assert len(paths) == 2 * (
        1 + len(metrics) + 1 + 3 + 3
    )  # PNG + SVG of: the overview, metrics, clustermap, three figures of the default document (0) and three of doc 1
    svg = (bert_run / "plots" / f"doc1_L{layer}H{head}.svg").read_text()
    model = outputs.model_name(outputs.read_manifest(bert_run))
    assert (
        f"{model}: attention, doc 1, layer {layer} head {head}" in svg
    )  # the title says model, measure, head
    assert (
        "mean row entropy (nats)" in (bert_run / "plots" / "heads_entropy.svg").read_text()
    )  # colour bar label


def test_document_figures_of_a_topk_gpt2_run(gpt2_topk_run: Path, tmp_path: Path) -> None:
    heads = outputs.read_heads(gpt2_topk_run)
    assert plots.choose_document_view(gpt2_topk_run, heads, None, 1, 2) == (0, 1, 2)
    paths = plots.plot_document(gpt2_topk_run, 0, 1, 2, out_dir=tmp_path, model="tiny-gpt2")
    assert_written(paths)
    assert {p.stem for p in paths} == {"doc0_L1H2", "doc0_grid", "doc0_L1H2_attention_vs_value_norm"}
    assert (
        "tiny-gpt2: attention (top-k cells only), doc 0, layer 1 head 2"
        in (tmp_path / "doc0_L1H2.svg").read_text()
    )
    matrix, _ = outputs.doc_matrix(gpt2_topk_run, 0, 1, 2)
    assert ((matrix > 0).sum(axis=-1) <= 3).all()  # at most top_k cells per row, the rest read as 0
    assert np.triu(matrix, k=1).max() == 0.0  # causal: nothing above the diagonal


def test_summary_run_has_no_document_figures(tmp_path: Path, tiny_loaded) -> None:
    run = build_run_folder(tmp_path / "summary", tiny_loaded("bert"), TEXTS[:1], storage="summary")
    heads = outputs.read_heads(run)
    assert plots.choose_document_view(run, heads, None, None, None) is None
    with pytest.raises(UserError, match="storage: summary"):
        plots.write_default_plots(run, doc_id=0)
    assert not (run / "plots").exists()  # refused before drawing anything


def test_metrics_that_are_all_nan_get_no_figure(tmp_path: Path) -> None:
    table = hand_heads_table()
    table["induction_score"] = np.nan
    paths = plots.plot_head_metric_heatmaps(
        table[["layer", "head", "n_rows", "entropy", "induction_score"]], tmp_path, "tiny"
    )
    assert [p.name for p in paths] == ["heads_entropy.png", "heads_entropy.svg"]
    assert_written(paths)


# --- the command's refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layer", "5"], "--layer 5 is out of range; this run has layers 0..1"),
        (["--doc", "7"], "document 7 is not in"),
    ],
)
def test_plot_command_refuses_bad_options(bert_run: Path, extra: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["plot", str(bert_run), *extra])
    assert result.exit_code == 2
    assert message in result.output


def test_plot_command_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 2
    assert "error:" in result.output and "manifest.json" in result.output
    assert not (tmp_path / "plots").exists()


def test_agreement_figure_shows_each_measures_rho_with_value_zeroing() -> None:
    agreement = pd.DataFrame({
        "layer": [0, 0, 0, 1, 1, 1],
        "measure_a": ["attention", "attention", "value_norm"] * 2,
        "measure_b": ["value_norm", "value_zeroing", "value_zeroing"] * 2,
        "spearman": [0.7, 0.6, 0.9, 0.8, 0.5, 0.95],
        "n_rows": [10] * 6,
    })
    figure = plots.agreement_figure(agreement, "tiny: agreement")
    heatmap = figure.axes[0]
    mesh = heatmap.collections[0]
    np.testing.assert_allclose(mesh.get_array().reshape(2, 2), [[0.6, 0.5], [0.9, 0.95]])  # rows: attention, value_norm
    assert [t.get_text() for t in heatmap.get_yticklabels()] == ["attention", "value_norm"]
    assert mesh.get_clim() == (-1.0, 1.0)
    assert "value_zeroing" in figure.axes[1].get_ylabel()


@pytest.mark.slow
def test_drawing_a_512_token_documents_figures_stays_under_1_gb(tmp_path: Path) -> None:
    """The default figures of a run whose first document has 512 tokens (MiniLM), drawn in a fresh process:
    peak RSS (measured, not timed) stays under 1 GB. Before figures had an Agg canvas, 5 documents of ~170
    tokens exhausted 22 GB."""
    import subprocess
    import sys

    words = " ".join(sample_lines(60)).split()
    corpus = tmp_path / "long.txt"
    corpus.write_text(" ".join((words * 4)[:600]) + "\n" + sample_lines(1)[0] + "\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "--model", "minilm", "-i", str(corpus), "-o", str(out), "--quiet",
                                      "--no-plots", "--no-report", "--max-length", "512"])
    assert result.exit_code == 0, result.output
    assert int(outputs.open_run(out).documents()["n_tokens"].max()) == 512
    # Peak RSS from the kernel's high-water mark of this process's own memory (VmHWM): getrusage's ru_maxrss
    # survives exec on Linux and would report this test process's own peak.
    code = ("import sys; from extractor.presentation.plots import write_default_plots; "
            "paths = write_default_plots(sys.argv[1]); "
            "peak = [line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')][0]; "
            "print(len(paths), peak)")
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=600,
                          check=True)
    n_files, peak_kb = map(int, done.stdout.split())
    assert n_files >= 30  # every metric heatmap, the clustermap and the document's three figures, PNG + SVG
    assert any(p.name.startswith("doc0_") for p in (out / "plots").iterdir())
    assert peak_kb < 1024 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB"


def test_a_run_ends_with_the_overview_in_png_and_svg_on_request(bert_run: Path, tmp_path: Path) -> None:
    """End of `extractor run` (`write_extras`): the overview of every metric instead of one heatmap each, PNG
    only unless `plot_formats` asks for SVG too; `extractor plot` keeps the full set (test above)."""
    from extractor.corpus.config import RunConfig
    from extractor.presentation.extras import write_extras

    run = tmp_path / "run"
    shutil.copytree(bert_run, run, ignore=shutil.ignore_patterns("plots", "report.html"))
    assert write_extras(run, RunConfig(report=False)) == ["figures"]
    names = sorted(p.name for p in (run / "plots").iterdir())
    assert "heads_overview.png" in names and "head_similarity_clustermap.png" in names
    assert all(name.endswith(".png") for name in names) and not any(n.startswith("heads_entropy") for n in names)
    assert_written([run / "plots" / name for name in names])
    write_extras(run, RunConfig(report=False, plot_formats=["png", "svg"]))
    svg = (run / "plots" / "heads_overview.svg").read_text()
    assert "mean row entropy (nats)" in svg and "attention to [CLS]" in svg  # every metric's panel is titled


def test_extras_write_the_same_report_and_figures_on_one_cpu_or_side_by_side(
    bert_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With two CPUs the figures are drawn by a helper process while the report is written; with one, one after
    the other. Either way the same report and the same figures."""
    from extractor.corpus.config import RunConfig
    from extractor.presentation import extras

    written = {}
    for cpus in (1, 2):
        run = tmp_path / f"cpus{cpus}" / "run"  # the report names its folder
        shutil.copytree(bert_run, run)
        (run / "report.html").unlink(missing_ok=True)
        shutil.rmtree(run / "plots", ignore_errors=True)
        monkeypatch.setattr(extras, "available_cpus", lambda cpus=cpus: cpus)
        assert (extras.FigureHelper.start() is None) == (cpus == 1)
        assert extras.write_extras(run, RunConfig()) == ["report", "figures"]
        written[cpus] = ((run / "report.html").read_text(), sorted(p.name for p in (run / "plots").iterdir()))
    assert "heads_overview.png" in written[2][1] and "<html" in written[2][0][:300].lower()
    assert written[1] == written[2]


def fresh_run(bert_run: Path, tmp_path: Path) -> Path:
    """A copy of the run folder without its report and figures."""
    run = tmp_path / "run"
    shutil.copytree(bert_run, run)
    (run / "report.html").unlink(missing_ok=True)
    shutil.rmtree(run / "plots", ignore_errors=True)
    return run


def test_a_helper_started_early_waits_then_draws_the_figures(
    bert_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`extractor run` starts the helper before the run: it gets ready and waits (drawing nothing) until it is
    told the folder, then draws; one told nothing ends when its stdin closes, and `dismiss` ends it at once."""
    from extractor.corpus.config import RunConfig
    from extractor.presentation import extras

    run = fresh_run(bert_run, tmp_path)
    monkeypatch.setattr(extras, "available_cpus", lambda: 2)
    helper = extras.FigureHelper.start()
    assert helper is not None
    time.sleep(1.0)
    assert helper.process.poll() is None and not (run / "plots").exists()  # waiting
    assert extras.write_extras(run, RunConfig(), helper=helper) == ["report", "figures"]
    assert helper.process.returncode == 0 and (run / "plots" / "heads_overview.png").is_file()
    assert (run / "report.html").is_file()
    idle = extras.FigureHelper.start()
    assert idle is not None and idle.process.stdin is not None
    idle.process.stdin.close()  # the run ended without asking for figures
    assert idle.process.wait(timeout=60) == 0
    waiting = extras.FigureHelper.start()
    assert waiting is not None
    waiting.dismiss()
    assert waiting.process.returncode is not None
    # a helper started for a run that then needs only the report is dismissed, and the report written here
    (run / "report.html").unlink()
    unused = extras.FigureHelper.start()
    assert extras.write_extras(run, RunConfig(plots=False), helper=unused) == ["report"]
    assert unused is not None and unused.process.returncode is not None and (run / "report.html").is_file()


def test_a_figure_error_does_not_lose_the_report(
    bert_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Side by side: the figures fail in the helper (here: a format it cannot write); the report is still
    finished and in place, and the figures' one-line error is the one raised."""
    from extractor.corpus.config import RunConfig
    from extractor.presentation import extras

    run = fresh_run(bert_run, tmp_path)
    monkeypatch.setattr(extras, "available_cpus", lambda: 2)
    unwritable = RunConfig.model_construct(**{**RunConfig().model_dump(), "plot_formats": ["bmp"]})
    with pytest.raises(UserError, match="figure formats must be one or more of png, svg") as error:
        extras.write_extras(run, unwritable)
    assert "\n" not in str(error.value)
    assert (run / "report.html").is_file() and not list(run.glob("report.html*.tmp"))


def test_a_report_error_is_raised_after_the_figures_finish(
    bert_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report fails in this process: the helper's figures still finish, and the report's error is raised."""
    from extractor.corpus.config import RunConfig
    from extractor.presentation import extras, report

    run = fresh_run(bert_run, tmp_path)

    def broken(folder: Path) -> None:
        raise UserError("the report failed")

    monkeypatch.setattr(extras, "available_cpus", lambda: 2)
    monkeypatch.setattr(report, "write_report", broken)
    with pytest.raises(UserError, match="the report failed"):
        extras.write_extras(run, RunConfig())
    assert (run / "plots" / "heads_overview.png").is_file()


@pytest.mark.parametrize(
    ("code", "message"),
    [("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "died (exit status -9); draw them with: "),
     ("import sys; print('error: figure formats must be one or more of png, svg', file=sys.stderr); sys.exit(2)",
      "figure formats must be one or more of png, svg")],
)
def test_the_helpers_failure_is_one_line(tmp_path: Path, code: str, message: str) -> None:
    """A helper killed is one line that says how to draw the figures; a helper's own one-line error is
    raised as it is."""
    import subprocess
    import sys

    from extractor.presentation.extras import FigureHelper

    helper = FigureHelper(subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True))
    helper.draw(tmp_path, ["png"])
    with pytest.raises(UserError) as error:
        helper.result(tmp_path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_helper_imports_this_checkout_unless_the_package_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """From a checkout (or an editable install) the helper gets the checkout first on its PYTHONPATH, before
    what was there; installed in site-packages, the environment is passed unchanged (site-packages then stays
    after the standard library)."""
    import os
    import site

    from extractor.presentation import extras

    root = Path(extras.__file__).resolve().parents[2]
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    assert extras.helper_environment()["PYTHONPATH"] == os.pathsep.join([str(root), "/somewhere/else"])
    monkeypatch.setattr(site, "getsitepackages", lambda: [str(root)])
    assert extras.helper_environment() == dict(os.environ)
