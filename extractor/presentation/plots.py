"""Figures (matplotlib, headless; seaborn for the annotated per-metric heatmaps), each written as PNG and SVG.

Every figure has a `*_figure(...) -> Figure` builder (testable: count its panels) and a `plot_*(..., out_dir)`
writer that returns the written paths. Figures are built with matplotlib's object API on an Agg canvas
(`new_figure`), which draws without any GUI backend and without pyplot. A figure without a canvas makes every
text-extent query (seaborn's tick-label overlap check, constrained layout) render the whole figure again: 7 GB
and 39 s for three 60-token figures, against a few hundred MB on a canvas. Sides are capped and labels thinned,
so memory stays bounded at 512 tokens; the cell meshes are rasterised in SVG (one image instead of n² paths).

`write_default_plots(run_dir)` draws the standard set from a run's output folder into RUN/plots/.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from extractor.corpus.faults import checkpoint
from extractor.corpus.run_folder import RunFolder, open_run
from extractor.errors import UserError
from extractor.heads.clustering import cluster_heads
from extractor.heads.names import METRICS
from extractor.presentation.forked import Forked

FORMATS = ("png", "svg")  # what `save_figure` writes unless `figure_formats` says otherwise
DPI = 150
SEQUENTIAL = "viridis"
DIVERGING = "RdBu_r"
METRIC_LABELS = {
    "entropy": "mean row entropy (nats)",
    "entropy_normalised": "mean row entropy / ln(row length)",
    "mean_distance": "mean attention distance |i − j| (tokens)",
    "first_token": "attention to the first token",
    "cls": "attention to [CLS]",
    "sep": "attention to [SEP]",
    "self": "attention to itself",
    "previous_token": "attention to the previous token",
    "next_token": "attention to the next token",
    "punctuation": "attention to punctuation",
    "max_weight": "mean max weight of a row",
    "cls_value_norm": "value_norm share to [CLS]",
    "sep_value_norm": "value_norm share to [SEP]",
    "previous_token_score": "previous-token score Σ(A⊙P)/ΣA",
    "duplicate_token_score": "duplicate-token score Σ(A⊙P)/ΣA",
    "induction_score": "induction score Σ(A⊙P)/ΣA",
}


# --- writing ------------------------------------------------------------------------------------------------


def new_figure(figsize: tuple[float, float], **options: object) -> Figure:
    """A Figure on an Agg canvas (see the module docstring for why it must have one)."""
    figure = Figure(figsize=figsize, **options)  # type: ignore[arg-type]
    FigureCanvasAgg(figure)
    return figure


def laid_out_figure(width: float, height: float) -> Figure:
    """A `new_figure` of width × height inches whose builder places every axes itself (`axes_at`), with room for
    all its text: `save_figure` saves it as it is (`fits`), one draw per format, no tight-bbox crop."""
    figure = new_figure((width, height))
    figure.fits = True  # type: ignore[attr-defined]
    return figure


def axes_at(figure: Figure, x: float, y: float, w: float, h: float):  # noqa: ANN201 - matplotlib's Axes
    """New axes on `figure` at a box given in inches from its lower left corner."""
    width, height = figure.get_size_inches()
    return figure.add_axes((x / width, y / height, w / width, h / height))


_formats: ContextVar[tuple[str, ...]] = ContextVar("figure_formats", default=FORMATS)


@contextmanager
def figure_formats(formats: Sequence[str]) -> Iterator[None]:
    """Inside, `save_figure` writes these formats (a subset of FORMATS, in that order): a run's end-of-run figures
    are PNG only by default (`plot_formats`), since SVG costs about twice a PNG's drawing time."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"figure formats must be one or more of {', '.join(FORMATS)} (got {', '.join(formats) or 'none'})")
    token = _formats.set(tuple(f for f in FORMATS if f in formats))
    try:
        yield
    finally:
        _formats.reset(token)


def save_figure(figure: Figure, out_dir: str | Path, stem: str) -> list[Path]:
    """Write `figure` as OUT/stem.png and OUT/stem.svg (the formats `figure_formats` chose; each through a
    temporary name), cropped to what is drawn unless the figure says it `fits` as laid out; returns the paths."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.{fmt}" for fmt in _formats.get()]
    # SVG text stays text (searchable, editable, smaller) instead of glyph outlines.
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        # The tight bounding box is found once, by one draw, and both formats are cropped to it: `bbox_inches=
        # "tight"` would draw each figure twice per format (4 draws instead of 3).
        bbox = None if getattr(figure, "fits", False) else tight_bbox(figure)
        for path in paths:
            partial = path.with_name(f".{path.name}.tmp")
            figure.savefig(partial, dpi=DPI, bbox_inches=bbox, format=path.suffix[1:])
            partial.replace(path)
    return paths


def tight_bbox(figure: Figure, pad: float = 0.1) -> Bbox:
    """The figure's drawn extent in inches plus `pad` inches all round: what `bbox_inches="tight"` crops to."""
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    return figure.get_tightbbox(renderer).padded(pad)


def _tick_size(n: int, side: float) -> float:
    """Font size (points) for n tick labels along `side` inches: as large as their spacing allows, 4–9 pt."""
    spacing = (
        0.8 * side * 72 / max(n, 1)
    )  # points between neighbouring labels (the map fills ~80% of the side)
    return float(np.clip(0.65 * spacing, 4, 9))


def thin_labels(labels: Sequence[str], side: float, smallest: float = 5.0) -> list[str]:
    """Labels for a long axis: every k-th label (others blank), so that those shown are ≥ `smallest` pt."""
    spacing = 0.8 * side * 72 / max(len(labels), 1)
    step = max(1, int(np.ceil(smallest / (0.65 * spacing))))
    return [label if i % step == 0 else "" for i, label in enumerate(labels)]


def _side(n: int, per_label: float = 0.28, low: float = 4.0, high: float = 14.0) -> float:
    """Figure side in inches for n labels."""
    return float(np.clip(per_label * n, low, high))


# --- per-head metrics ---------------------------------------------------------------------------------------


def metric_grid(heads: pd.DataFrame, column: str) -> pd.DataFrame:
    """heads table → [layer, head] grid of one column (rows: layers, columns: heads)."""
    return heads.pivot(index="layer", columns="head", values=column).sort_index().sort_index(axis=1)


# Metrics without a natural 0..1 range; every other metric (shares of a row, detector scores, normalised
# entropy) is drawn on a fixed 0..1 scale, so that heatmaps of different metrics and runs (`cls` beside
# `cls_value_norm`) compare by colour directly.
UNBOUNDED_METRICS = ("entropy", "mean_distance")


def head_metric_figure(heads: pd.DataFrame, metric: str, title: str, diverging: bool = False) -> Figure:
    """A layer × head heatmap of one metric, annotated when small enough to read, with a colour bar."""
    import seaborn as sns  # here, not at the top: a run's default figures do without it (0.5 s of imports)

    grid = metric_grid(heads, metric)  # [layer, head]
    n_layers, n_heads = grid.shape
    figure = new_figure((max(5.0, 0.55 * n_heads + 2.5), max(3.0, 0.45 * n_layers + 1.6)))
    ax = figure.add_subplot()
    label = ("change (B − A) in " if diverging else "") + METRIC_LABELS.get(metric, metric)
    bounded = metric not in UNBOUNDED_METRICS
    options: dict
    if diverging:
        options = {"cmap": DIVERGING, "center": 0.0, **({"vmin": -1.0, "vmax": 1.0} if bounded else {})}
    else:
        options = {"cmap": SEQUENTIAL, **({"vmin": 0.0, "vmax": 1.0} if bounded else {})}
    sns.heatmap(
        grid,
        ax=ax,
        annot=n_layers * n_heads <= 144,
        fmt=".2f",
        annot_kws={"fontsize": 7},
        linewidths=0.3,
        linecolor="white",
        cbar_kws={"label": label},
        **options,
    )
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    return figure


def plotted_metrics(heads: pd.DataFrame) -> list[str]:
    """Metric columns of a heads table with any value (all-NaN ones, e.g. BERT's induction, are skipped)."""
    return [m for m in METRICS if m in heads.columns and heads[m].notna().any()]


SHARED_BAR = "shared 0..1 colour bar"  # the overview's bar for every map on 0..1 (its axes' label)


def head_metrics_overview_figure(heads: pd.DataFrame, title: str) -> Figure:
    """Every metric of a heads table as a small layer × head map, side by side: which heads stand out on which
    metric, at a glance. Shares and scores share one 0..1 colour scale and its bar (on the right); entropy and
    distance keep a bar of their own range beside their map. Tick labels and the axis names are drawn on the
    outer maps only (layers on the first column, heads under the last map of each column), as in any grid of
    small multiples with shared axes.

    Laid out in inches, with room for each map's title, labels, ticks and colour bar, so it needs no
    `tight_layout` and no cropping (`fits`): one draw to save instead of three.
    """
    metrics = plotted_metrics(heads)
    n_cols = min(4, max(1, len(metrics)))
    n_rows = -(-len(metrics) // n_cols)
    n_layers, n_heads = heads["layer"].nunique(), heads["head"].nunique()
    map_w, map_h = 1.9 + 0.1 * min(n_heads, 40), 0.55 + 0.1 * min(n_layers, 40)  # the map itself
    # around each map: its title above; ticks and "layer" left; ticks and "head" below; its own colour bar right
    left, above, below, bar_gap, bar, right = 0.5, 0.3, 0.4, 0.06, 0.1, 0.4
    cell_w, cell_h = left + map_w + bar_gap + bar + right, above + map_h + below
    top, margin = 0.5, 0.05  # the title of the figure; the edge
    shared_w = 0.15 + bar + 0.55  # the shared 0..1 bar: a gap, the bar, its ticks and label
    width, height = 2 * margin + n_cols * cell_w + shared_w, top + n_rows * cell_h + margin
    figure = laid_out_figure(width, height)
    shared_image = None
    for index, metric in enumerate(metrics):
        row, col = divmod(index, n_cols)
        x, y = margin + col * cell_w + left, height - top - row * cell_h - above - map_h  # map's lower left
        ax = axes_at(figure, x, y, map_w, map_h)
        bounded = metric not in UNBOUNDED_METRICS
        image = ax.imshow(metric_grid(heads, metric).to_numpy(), aspect="auto", cmap=SEQUENTIAL,
                          interpolation="nearest", vmin=0.0 if bounded else None, vmax=1.0 if bounded else None)
        ax.set_title(METRIC_LABELS.get(metric, metric), fontsize=7)
        ax.tick_params(labelsize=5)
        if col == 0:
            ax.set_ylabel("layer", fontsize=6, labelpad=1)
        else:
            ax.set_yticks([])  # no tick marks either: each is two lines and a label to lay out, for nothing
        if index + n_cols >= len(metrics):  # no map below this one
            ax.set_xlabel("head", fontsize=6, labelpad=1)
        else:
            ax.set_xticks([])
        if bounded:
            shared_image = image
        else:
            figure.colorbar(image, cax=axes_at(figure, x + map_w + bar_gap, y, bar, map_h)).ax.tick_params(labelsize=5)
    if shared_image is not None:
        grid_top, grid_bottom = height - top - above, height - top - (n_rows - 1) * cell_h - above - map_h
        shared_ax = axes_at(figure, margin + n_cols * cell_w + 0.15, grid_bottom, bar, grid_top - grid_bottom)
        shared_ax.set_label(SHARED_BAR)
        shared = figure.colorbar(shared_image, cax=shared_ax)
        shared.ax.tick_params(labelsize=6)
        shared.set_label("share of the row, or score (every map without its own bar)", fontsize=7)
    figure.suptitle(title, fontsize=10, y=1 - 0.15 / height, va="top")
    return figure


def plot_head_metric_heatmaps(
    heads: pd.DataFrame,
    out_dir: str | Path,
    title_prefix: str,
    diverging: bool = False,
    stem_prefix: str = "heads_",
) -> list[Path]:
    """One layer × head heatmap per metric → OUT/<stem_prefix><metric>.png/.svg."""
    paths: list[Path] = []
    for metric in plotted_metrics(heads):
        title = f"{title_prefix} — {METRIC_LABELS.get(metric, metric)}"
        figure = head_metric_figure(heads, metric, title, diverging=diverging)
        paths += save_figure(figure, out_dir, f"{stem_prefix}{metric}")
    return paths


# --- head similarity ----------------------------------------------------------------------------------------


def layer_colours(n_layers: int) -> np.ndarray:
    """[layer, RGBA]: one colour per layer, in order along a perceptually ordered map (neighbours look alike)."""
    return matplotlib.colormaps["turbo"](np.linspace(0.08, 0.92, n_layers)) if n_layers > 1 \
        else matplotlib.colormaps["turbo"]([0.5])


def _dendrogram(ax, tree: np.ndarray, n: int, orientation: str) -> None:
    """Draw scipy's dendrogram of `tree` on `ax`, its leaves at the heatmap's cell centres 0..n−1: on top
    (`orientation` "top", root up) or on the left ("left", root left, leaf 0 at the top as in the image)."""
    from matplotlib.collections import LineCollection
    from scipy.cluster.hierarchy import dendrogram

    shape = dendrogram(tree, no_plot=True)
    height = max((max(d) for d in shape["dcoord"]), default=1.0) or 1.0
    segments = []
    for across, up in zip(shape["icoord"], shape["dcoord"], strict=True):
        leaf_axis = np.asarray(across) / 10.0 - 0.5  # scipy puts leaf i at 10·i + 5
        points = np.column_stack([leaf_axis, up] if orientation == "top" else [up, leaf_axis])
        segments.append(points)
    ax.add_collection(LineCollection(segments, colors="0.25", linewidths=0.6))
    if orientation == "top":
        ax.set_xlim(-0.5, n - 0.5)
        ax.set_ylim(0, height * 1.02)
    else:
        ax.set_ylim(n - 0.5, -0.5)
        ax.set_xlim(height * 1.02, 0)
    ax.set_axis_off()


def similarity_clustermap_figure(similarity: pd.DataFrame, title: str) -> Figure:
    """The heads' mean JS divergence [head, head] in hierarchical-clustering order, with the dendrogram on the
    top and the left and a layer colour strip beside the rows and the columns (matplotlib only).

    Laid out in inches (`fits`, like the overview): the heatmap's side grows with the number of heads; its
    tick labels (every head) are on the right and below, the colour bar and the strip's legend above the row
    dendrogram and beside the column dendrogram.
    """
    clustering = cluster_heads(similarity)
    n = len(clustering.labels)
    clustered = n > 2
    order = clustering.order if clustered else list(range(n))
    labels = [clustering.labels[i] for i in order]
    layers = [layer_of(label) for label in labels]
    colours = layer_colours(max(layers) + 1)
    side = _side(n, per_label=0.16, low=4.5, high=22.0)  # the heatmap itself
    font = _tick_size(n, side)
    label_room = 0.1 + 0.62 * font / 72 * max(len(label) for label in labels)  # tick labels' length, in inches
    dendro = 0.12 * side + 0.3  # left blank when there is no tree (two heads or fewer)
    strip, gap = 0.14, 0.04
    left, top, axis_title, edge = 0.2, 0.55, 0.25, 0.1
    head_room = max(dendro + strip + gap, 1.35)  # the colour bars sit beside the column dendrogram
    width = left + dendro + strip + gap + side + label_room + axis_title + edge
    height = top + head_room + side + label_room + axis_title + edge
    figure = laid_out_figure(width, height)

    x0, y0 = left + dendro + strip + gap, edge + axis_title + label_room  # the heatmap's lower left
    heatmap = axes_at(figure, x0, y0, side, side)
    image = heatmap.imshow(clustering.divergence[np.ix_(order, order)], cmap="magma_r", vmin=0.0,
                           interpolation="nearest", aspect="auto", rasterized=True)
    heatmap.set_xticks(range(n), labels, fontsize=font, rotation=90)
    heatmap.set_yticks(range(n), labels, fontsize=font)
    heatmap.yaxis.tick_right()
    heatmap.yaxis.set_label_position("right")
    heatmap.tick_params(length=2, pad=1)
    heatmap.set_xlabel("head")
    heatmap.set_ylabel("head")
    rows = axes_at(figure, x0 - gap - strip, y0, strip, side)  # the layer strip beside the rows ...
    rows.imshow(colours[layers][:, None], aspect="auto", interpolation="nearest")
    columns = axes_at(figure, x0, y0 + side + gap, side, strip)  # ... and above the columns
    columns.imshow(colours[layers][None, :], aspect="auto", interpolation="nearest")
    for ax in (rows, columns):
        ax.set_axis_off()
    if clustered:
        _dendrogram(axes_at(figure, left, y0, dendro - 0.05, side), clustering.linkage, n, "left")
        top_tree = axes_at(figure, x0, y0 + side + gap + strip + gap, side, dendro - 0.05)
        _dendrogram(top_tree, clustering.linkage, n, "top")
    bar_y, bar_h = y0 + side + gap + 0.18, head_room - 0.3  # clear of the tree below and the title above
    bar = axes_at(figure, left + 0.45, bar_y, 0.12, bar_h)  # top left: the divergence scale, labelled on its left
    figure.colorbar(image, cax=bar)
    bar.tick_params(labelsize=6)
    bar.set_ylabel("mean JS divergence\n(bits)", fontsize=7)
    bar.yaxis.set_ticks_position("left")
    bar.yaxis.set_label_position("left")
    # top right: which strip colour is which layer, one band per layer (any number of layers fits)
    n_layers = len(colours)
    strip_key = axes_at(figure, x0 + side + 0.15, bar_y, 0.12, bar_h)
    strip_key.imshow(colours[::-1][:, None], aspect="auto", interpolation="nearest",
                     extent=(0, 1, -0.5, n_layers - 0.5))
    shown = [layer for layer in range(n_layers) if layer % max(1, -(-n_layers // 12)) == 0]
    strip_key.set_xticks([])
    strip_key.set_yticks(shown, [str(layer) for layer in shown], fontsize=6)
    strip_key.yaxis.tick_right()
    strip_key.yaxis.set_label_position("right")
    strip_key.set_ylabel("layer strip", fontsize=7)
    figure.suptitle(title, fontsize=11, y=1 - 0.12 / height, va="top")
    return figure


def layer_of(label: str) -> int:
    """'L3H7' → 3."""
    return int(label[1:].split("H")[0])


def plot_similarity_clustermap(
    similarity: pd.DataFrame, out_dir: str | Path, title: str, stem: str = "head_similarity_clustermap"
) -> list[Path]:
    """The head-similarity clustermap → OUT/<stem>.png/.svg."""
    return save_figure(similarity_clustermap_figure(similarity, title), out_dir, stem)


# --- which measure to trust -----------------------------------------------------------------------------------


def agreement_reference(agreement: pd.DataFrame) -> str:
    """The measure the others are compared with: value zeroing (the intervention) when present, else the first."""
    names = list(dict.fromkeys([*agreement["measure_a"], *agreement["measure_b"]]))
    return "value_zeroing" if "value_zeroing" in names else names[0]


def agreement_figure(agreement: pd.DataFrame, title: str) -> Figure:
    """Per layer, each measure's mean per-row Spearman ρ with the reference measure (agreement.parquet), on a
    fixed −1..1 scale: a [measure, layer] heatmap, annotated."""
    import seaborn as sns

    reference = agreement_reference(agreement)
    pairs = agreement[(agreement["measure_a"] == reference) | (agreement["measure_b"] == reference)].copy()
    pairs["measure"] = pairs["measure_a"].where(pairs["measure_b"] == reference, pairs["measure_b"])
    grid = pairs.pivot(index="measure", columns="layer", values="spearman")  # [measure, layer]
    figure = new_figure((max(5.0, 0.6 * grid.shape[1] + 3.0), max(2.5, 0.45 * grid.shape[0] + 1.6)))
    ax = figure.add_subplot()
    sns.heatmap(grid, ax=ax, cmap=DIVERGING, center=0.0, vmin=-1.0, vmax=1.0, annot=grid.size <= 400, fmt=".2f",
                annot_kws={"fontsize": 7}, linewidths=0.3, linecolor="white",
                cbar_kws={"label": f"mean Spearman ρ per query row with {reference}"})
    ax.set_xlabel("layer")
    ax.set_ylabel("measure")
    ax.set_title(title, fontsize=10)
    return figure


# --- one document -------------------------------------------------------------------------------------------


def _matrix_heatmap(
    ax, matrix: np.ndarray, labels: Sequence[str], side: float, colour_label: str, vmax: float | None = None
) -> None:
    """One [query, key] matrix on a `side`-inch square: token labels (x: keys, y: queries), colour bar.

    One image (not a mesh of n² cells), and ticks only where a label is shown: at 512 tokens this is the
    difference between seconds and minutes.
    """
    image = ax.imshow(matrix, cmap=SEQUENTIAL, vmin=0.0, vmax=vmax, interpolation="nearest", aspect="equal",
                      rasterized=True)
    shown = [(i, label) for i, label in enumerate(thin_labels(labels, side)) if label]
    positions, names = [i for i, _ in shown], [label for _, label in shown]
    size = max(_tick_size(len(labels), side), 5.0)
    ax.set_xticks(positions, names, fontsize=size, rotation=90)
    ax.set_yticks(positions, names, fontsize=size)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.figure.colorbar(image, ax=ax, label=colour_label, shrink=0.8)


def doc_head_figure(
    matrix: np.ndarray, labels: Sequence[str], title: str, colour_label: str = "attention weight"
) -> Figure:
    """One document's [query, key] matrix for one head: row i = how token i spreads its attention."""
    side = _side(len(labels)) + 1.5
    figure = new_figure((side + 1.2, side))
    _matrix_heatmap(figure.add_subplot(), matrix, labels, side, colour_label)
    figure.axes[0].set_title(title, fontsize=10)
    return figure


def plot_doc_head(
    matrix: np.ndarray,
    labels: Sequence[str],
    out_dir: str | Path,
    title: str,
    stem: str = "doc_head",
    colour_label: str = "attention weight",
) -> list[Path]:
    """One head's attention heatmap for one document, token labels on both axes → OUT/<stem>.png/.svg."""
    return save_figure(doc_head_figure(matrix, labels, title, colour_label), out_dir, stem)


def text_preview(labels: Sequence[str], limit: int = 80) -> str:
    """The document's tokens joined, shortened to `limit` characters (for subtitles)."""
    text = " ".join(labels)
    return text if len(text) <= limit else text[: limit - 1] + "…"


GRID_CELL_PIXELS = 128  # a grid cell is ~1 inch at 150 dpi: more resolution than that is never seen


def pooled(matrices: np.ndarray, size: int) -> np.ndarray:
    """[..., n, n] → [..., m, m] with m ≤ size, each cell the max of a block (a sharp weight stays visible)."""
    n = matrices.shape[-1]
    factor = int(np.ceil(n / size))
    if factor <= 1:
        return matrices
    m = int(np.ceil(n / factor))
    padded = np.zeros((*matrices.shape[:-2], m * factor, m * factor), dtype=matrices.dtype)
    padded[..., :n, :n] = matrices
    return padded.reshape(*matrices.shape[:-2], m, factor, m, factor).max(axis=(-3, -1))


def doc_grid_figure(
    matrices: np.ndarray, labels: Sequence[str], title: str, colour_label: str = "attention weight"
) -> Figure:
    """matrices [layer, head, query, key] → a layer × head grid of small maps sharing one colour scale.

    Drawn as one mosaic image with white gutters (one image, not layers × heads axes), so 270 heads draw as
    fast as 12.
    """
    matrices = pooled(matrices, GRID_CELL_PIXELS)  # [layer, head, query, key] at most a cell's pixels a side
    n_layers, n_heads, n, _ = matrices.shape
    gap = max(1, n // 12)
    mosaic = np.full((n_layers * (n + gap) - gap, n_heads * (n + gap) - gap), np.nan, dtype=np.float32)
    for layer in range(n_layers):
        for head in range(n_heads):
            top, left = layer * (n + gap), head * (n + gap)
            mosaic[top : top + n, left : left + n] = matrices[layer, head]  # [query, key]
    cell = 1.1 if n_heads <= 12 else 0.8
    figure = new_figure((cell * n_heads + 1.8, cell * n_layers + 1.2))
    ax = figure.add_subplot()
    colours = matplotlib.colormaps[SEQUENTIAL].with_extremes(bad="white")
    vmax = float(matrices.max()) if matrices.size else 1.0
    image = ax.imshow(mosaic, cmap=colours, vmin=0.0, vmax=vmax, interpolation="nearest", rasterized=True)
    centres = [i * (n + gap) + (n - 1) / 2 for i in range(max(n_layers, n_heads))]
    ax.set_xticks(centres[:n_heads], [f"head {h}" for h in range(n_heads)], fontsize=7, rotation=90)
    ax.set_yticks(centres[:n_layers], [f"layer {layer}" for layer in range(n_layers)], fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    figure.colorbar(image, ax=ax, shrink=0.6, label=colour_label)
    # on the mosaic's own axes, right above it: a figure title sat far above a wide grid kept square by its aspect
    ax.set_title(f"{title}\n{text_preview(labels)}", fontsize=10)
    return figure


def plot_doc_grid(
    matrices: np.ndarray, labels: Sequence[str], out_dir: str | Path, title: str, stem: str = "doc_grid"
) -> list[Path]:
    """A layer × head grid of one document's maps [layer, head, query, key] → OUT/<stem>.png/.svg."""
    return save_figure(doc_grid_figure(matrices, labels, title), out_dir, stem)


def row_share(matrix: np.ndarray) -> np.ndarray:
    """[query, key] → each row divided by its sum (rows of zeros stay zero)."""
    total = matrix.sum(axis=-1, keepdims=True)
    return np.divide(matrix, total, out=np.zeros_like(matrix, dtype=np.float64), where=total > 0)


def attention_vs_value_norm_figure(
    attention: np.ndarray, value_norm: np.ndarray, labels: Sequence[str], title: str
) -> Figure:
    """Attention and value_norm of one head side by side, both [query, key], on one 0..1 scale.

    value_norm ‖α_ij f(x_j)‖ is shown as each key's share of its row (rows sum to 1, like attention), so the
    two panels compare directly: a key bright on the left but dim on the right has a large weight on a small
    value vector.
    """
    side = _side(len(labels)) + 1.5
    figure = new_figure((2 * side + 2.5, side))
    left, right = figure.subplots(1, 2, gridspec_kw={"wspace": 0.35})
    _matrix_heatmap(left, attention, labels, side, "attention weight", vmax=1.0)
    left.set_title("attention A (softmax weights)", fontsize=9)
    _matrix_heatmap(right, row_share(value_norm), labels, side, "share of the row's value_norm", vmax=1.0)
    right.set_title("value_norm ‖α·f(x)‖, share of each row", fontsize=9)
    figure.suptitle(title, fontsize=10)
    return figure


def plot_attention_vs_value_norm(
    attention: np.ndarray,
    value_norm: np.ndarray,
    labels: Sequence[str],
    out_dir: str | Path,
    title: str,
    stem: str = "attention_vs_value_norm",
) -> list[Path]:
    """Attention and value_norm side by side for one head → OUT/<stem>.png/.svg."""
    return save_figure(attention_vs_value_norm_figure(attention, value_norm, labels, title), out_dir, stem)


# --- the default set from a run folder ----------------------------------------------------------------------


# A head that puts at least this share of its rows on one fixed position (the previous token, itself, the first
# token, [CLS] or [SEP]) shows the same picture for every document: the default figures skip it.
POSITIONAL_SHARE = 0.5
POSITIONAL_METRICS = ("previous_token", "self", "first_token", "cls", "sep")


def choose_head(heads: pd.DataFrame, layer: int | None = None, head: int | None = None) -> tuple[int, int]:
    """The head to draw: the given one, else, among those matching, the sharpest content head: the lowest mean
    row entropy among heads that put less than half of their attention on any one fixed position (previous
    token, itself, first token, [CLS], [SEP]); if every head does, the lowest entropy overall.

    A sharp head shows structure rather than a uniform wash; a positional head (the sharpest heads usually are)
    would draw the same diagonal or column for every document.
    """
    n_layers, n_heads = int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1
    for name, value, size in (("layer", layer, n_layers), ("head", head, n_heads)):
        if value is not None and not 0 <= value < size:
            raise UserError(f"--{name} {value} is out of range; this run has {name}s 0..{size - 1}")
    candidates = heads
    if layer is not None:
        candidates = candidates[candidates["layer"] == layer]
    if head is not None:
        candidates = candidates[candidates["head"] == head]
    positional = pd.Series(False, index=candidates.index)
    for metric in POSITIONAL_METRICS:
        if metric in candidates.columns:
            positional |= candidates[metric].fillna(0.0) >= POSITIONAL_SHARE
    content = candidates[~positional] if (~positional).any() else candidates
    best = content.sort_values(["entropy", "layer", "head"], na_position="last").iloc[0]
    return int(best["layer"]), int(best["head"])


def choose_document_view(
    run_dir: Path | RunFolder, heads: pd.DataFrame, doc_id: int | None, layer: int | None, head: int | None
) -> tuple[int, int, int] | None:
    """(doc, layer, head) to draw, checked before anything is drawn; None when the run stored nothing to draw
    per document and nothing was asked for (storage: summary)."""
    run = open_run(run_dir)
    asked = doc_id is not None or layer is not None or head is not None
    if not asked and not run.has_associations():
        return None
    if "attention" not in run.stored_measures():  # a UserError naming the storage if none were stored
        if not asked:
            return None
        raise UserError(f"run '{run.path}' did not store attention; rerun with measures including attention")
    doc = run.first_ok_doc() if doc_id is None else doc_id
    run.labels(doc)  # a UserError listing the doc ids if `doc` is not in the run
    return (doc, *choose_head(heads, layer, head))


def plot_document(run_dir: Path | RunFolder, doc: int, layer: int, head: int, out_dir: Path, model: str) -> list[Path]:
    """One document's figures: one head's attention, the layer × head grid, attention vs value_norm."""
    # What the cells are: only the top-k keys per row (others read as 0), and between words at word level.
    run = open_run(run_dir)
    qualifier = " (top-k cells only)" if run.is_top_k() else ""
    if run.level == "word":
        qualifier += " between words"
    where = f"doc {doc}, layer {layer} head {head}"
    grid, labels = run.doc_matrices(doc, "attention")  # [layer, head, query, key]: one read for both figures
    attention = grid[layer, head]
    paths = plot_doc_head(
        attention,
        labels,
        out_dir,
        f"{model}: attention{qualifier}, {where}",
        stem=f"doc{doc}_L{layer}H{head}",
    )
    paths += plot_doc_grid(
        grid,
        labels,
        out_dir,
        f"{model}: attention{qualifier}, doc {doc}, every layer × head",
        stem=f"doc{doc}_grid",
    )
    if "value_norm" in run.stored_measures():
        value_norm, _ = run.doc_matrix(doc, layer, head, "value_norm")
        paths += plot_attention_vs_value_norm(
            attention,
            value_norm,
            labels,
            out_dir,
            f"{model}: attention vs value_norm{qualifier}, {where}",
            stem=f"doc{doc}_L{layer}H{head}_attention_vs_value_norm",
        )
    return paths


def write_default_plots(
    run_dir: str | Path, doc_id: int | None = None, layer: int | None = None, head: int | None = None,
    per_metric: bool = True, fork_document: bool = False,
) -> list[Path]:
    """Draw the standard figures of a run into RUN/plots/ and return the written paths.

    - every metric of heads.parquet side by side (`heads_overview`), and with `per_metric` a larger annotated
      layer × head heatmap per metric (metrics that are all NaN are skipped);
    - the head-similarity clustermap (if head_similarity.parquet exists);
    - the measures' agreement with value zeroing per layer (if agreement.parquet exists: `agreement: true`);
    - if associations were stored: for document `doc_id` (default: the first document with status ok) and
      head (`layer`, `head`) (default: the head with the lowest mean row entropy, see `choose_head`):
      its attention heatmap, a layer × head grid of its attention maps, and attention vs value_norm (when
      value_norm was stored). Asking for a document of a run without associations is a UserError.

    The full set is drawn into a new folder that then replaces RUN/plots/ whole, so an interrupted drawing
    leaves the previous figures (or none), never half a set. Asking for a document, layer or head draws only
    that document's figures, added to RUN/plots/. `fork_document`: the document's figures are drawn by a forked
    copy of this process (`forked.Forked`) while this one draws the rest, on two cores (the end-of-run figure
    helper, a process that does nothing else, asks for it).
    """
    run_dir = Path(run_dir)
    run = open_run(run_dir)
    heads = run.heads()
    view = choose_document_view(run, heads, doc_id, layer, head)
    model = run.model
    final = run_dir / "plots"
    if doc_id is not None or layer is not None or head is not None:
        assert view is not None, "choose_document_view returns a view when one is asked for"
        return plot_document(run, *view, out_dir=final, model=model)
    partial = run_dir / f"plots.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    document = None
    if view is not None and fork_document:
        document = Forked(lambda: [str(p) for p in plot_document(run, *view, out_dir=partial, model=model)],
                          f"the figures of document {view[0]}")
    try:
        paths = save_figure(head_metrics_overview_figure(heads, f"{model}: per-head metrics over the corpus"),
                            partial, "heads_overview")
        if per_metric:
            paths += plot_head_metric_heatmaps(heads, partial, f"{model}: per-head metric over the corpus")
        checkpoint("figures")
        if run.has("head_similarity"):
            similarity = run.head_similarity()
            paths += plot_similarity_clustermap(
                similarity, partial, f"{model}: head similarity (mean JS divergence of rows)"
            )
        if run.has("agreement"):
            agreement = run.table("agreement")
            title = f"{model}: which measure agrees with {agreement_reference(agreement)} (per layer)"
            paths += save_figure(agreement_figure(agreement, title), partial, "measure_agreement")
        if document is not None:
            paths += [Path(path) for path in document.result()]
        elif view is not None:
            paths += plot_document(run, *view, out_dir=partial, model=model)
    except BaseException:
        if document is not None:
            document.cancel()
        raise
    previous = run_dir / f"plots.previous-{os.getpid()}"
    if final.exists():
        final.rename(previous)
    partial.rename(final)
    shutil.rmtree(previous, ignore_errors=True)
    return [final / path.name for path in paths]


__all__ = [
    "attention_vs_value_norm_figure",
    "choose_head",
    "doc_grid_figure",
    "doc_head_figure",
    "head_metric_figure",
    "head_metrics_overview_figure",
    "plot_attention_vs_value_norm",
    "plot_doc_grid",
    "plot_doc_head",
    "plot_head_metric_heatmaps",
    "plot_similarity_clustermap",
    "save_figure",
    "similarity_clustermap_figure",
    "write_default_plots",
]
