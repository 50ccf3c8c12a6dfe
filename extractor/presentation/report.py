"""`extractor report`: one self-contained, offline HTML page to explore a run's heads and tokens.

    write_report(OUTPUT) → OUTPUT/report.html

The page (template: report_template.html, vanilla JS + inline SVG and <canvas>, no library, no network) shows
the run's provenance and verification summary (folded in a <details>), a layer × head grid coloured by a
metric of heads.parquet, the chosen head's metrics, and for a chosen document (found by a search over the
documents' text) its attention, value_norm or rollout either as lines between tokens or as a zoomable
[query, key] heatmap (the default above SHORT_DOCUMENT positions), with the hovered row's strongest keys
listed; and, when the run wrote agreement.parquet, a layer × measure table of rank agreement.

Without heads.parquet the grid is coloured by the mean of each query row's largest attention weight over the
embedded documents, and the page says so; verification errors are always offered as colours too.

Size bound. The page considers the first `max_docs` documents (default 50) in order — status ok by doc_id,
then truncated ones — and embeds each unless it would push the whole file past `max_bytes` (default 5 MB);
the page says how many it left out. Per embedded document: its original text, its positions' labels (tokens,
or words at level word, as `extractor.corpus.run_folder.position_label` shows them), and the stored
association rows of every (layer, head) — attention and value_norm — and of every layer (head = -1) —
rollout and layer_value_norm (cells of overlapping windows averaged, as the figures do:
`run_folder.merge_windows`). Top-k storage keeps only the k strongest keys per query row, so only those exist
on the page too; a dense run's long documents keep their DENSE_KEYS_PER_ROW strongest.

Level of detail. Values are stored as 16-bit fixed point of their group's largest value. When the first few
documents show that `max_docs` of them would not fit, the page is embedded coarser, one step at a time
(`detail_levels`): 8 bits on a square-root scale (every document), then half the keys per row of long documents
(more than SHORT_DOCUMENT positions), down to 2; the page says which level it used. MiniLM (72 heads) over 50 documents of about 500 tokens:
13 documents at 8 bits and 2 keys per row (was 1 document at 4 decimals); a smaller `max_docs` buys detail.

Compact form. A matrix group (one document, one layer, one head or the layer) is a small JSON object with
its bytes zlib-compressed and base64-encoded (`encode_document`); the page inflates them with the browser's own
DecompressionStream. The JSON sits in <script type="application/json"> elements with '<', '>' and '&' written
as \\u003c, \\u003e, \\u0026, so no token can close the element; the page renders all text with textContent
and a Content-Security-Policy lets only its own script (by hash) run and forbids every network request.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import math
import os
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from extractor.attribution.measures import HEAD_MEASURES, LAYER_MEASURES, REGISTRY
from extractor.corpus.faults import checkpoint
from extractor.corpus.run_folder import open_run
from extractor.errors import UserError
from extractor.presentation.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_DOCS

log = logging.getLogger("extractor.presentation.report")

DECIMALS = 4  # weights shown with this many decimals
ZLIB_LEVEL = 9
SHORT_DOCUMENT = 60  # positions: a document this short keeps every stored key per row and is drawn as lines
DENSE_KEYS_PER_ROW = 8  # keys per row a long document keeps on the page when the run stored every key
TEMPLATE = Path(__file__).with_name("report_template.html")

# Measures the view can switch between (from the measure registry): level (head rows, or layer rows with
# head = -1), label, and how line opacity is scaled ("raw": the weight itself, as bertviz; "max": value / largest
# value in the matrix, for unbounded norms and for rolled-out measures, whose rows spread thinly over many keys).
MEASURE_INFO = {name: {"level": m.level, "label": m.label, "scale": m.scale, "note": m.meaning}
                for name, m in REGISTRY.items()}

# One line per heads.parquet metric, shown under the colour picker (see extractor/heads.py for definitions).
METRIC_NOTES = {
    "entropy": "mean entropy of a query row of A (nats): high = spread out, low = focused",
    "entropy_normalised": "row entropy / ln(row length): 1 = uniform, 0 = one key",
    "mean_distance": "mean |i − j| weighted by attention: how far a head looks",
    "first_token": "mean weight on the first token",
    "cls": "mean weight on [CLS]",
    "sep": "mean weight on [SEP]",
    "self": "mean weight of a token on itself",
    "previous_token": "mean weight on the previous token",
    "next_token": "mean weight on the next token",
    "punctuation": "mean weight on punctuation tokens",
    "max_weight": "mean of each row's largest weight: how sharp the head is",
    "cls_value_norm": "share of the value-weighted row on [CLS]",
    "sep_value_norm": "share of the value-weighted row on [SEP]",
    "previous_token_score": "previous-token pattern score (1 = always the previous token)",
    "duplicate_token_score": "duplicate-token pattern score (earlier copies of the same token)",
    "induction_score": "induction pattern score (the token after an earlier copy)",
    "mean_max_attention": "mean of each row's largest attention weight over the embedded documents "
    "(computed for this page: heads.parquet is not in the run folder)",
    "pattern_max_abs_err": "verification: max |pattern − Hugging Face's attentions| over the run",
    "z_max_abs_err": "verification: max |z − the z Hugging Face fed its output projection| over the run",
}
DEFAULT_METRIC = "max_weight"
PROVENANCE_KEYS = (
    "model",
    "model_class",
    "family",
    "n_layers",
    "n_heads",
    "causal",
    "dtype",
    "device",
    "attn_implementation",
    "transformers_version",
    "torch_version",
    "extractor_version",
    "weights_file",
    "weights_sha256",
)
_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"}


# -- compact encoding -------------------------------------------------------------------------------------
def quantise(values: np.ndarray, top: float | np.ndarray, bits: int) -> np.ndarray:
    """Values in [0, top] → unsigned integers: 16 bits linear (value / top · 65535), or 8 bits on a square-root
    scale (√(value / top) · 255), which keeps small weights distinguishable; 0 where top is not positive.
    values: [rows]; top: one number, or [rows] (each row's own group's) → [rows]."""
    top = np.broadcast_to(np.asarray(top, dtype=np.float64), values.shape)
    share = np.zeros(len(values))
    np.divide(values.astype(np.float64), top, out=share, where=top > 0)
    with np.errstate(invalid="ignore"):  # NaN (a measure a group leaves out) gives a code nobody reads
        share = np.clip(share, 0.0, 1.0)
        if bits == 16:
            return np.rint(share * 65535).astype("<u2")
        return np.rint(np.sqrt(share) * 255).astype(np.uint8)


def dequantise(codes: np.ndarray, top: float, bits: int) -> np.ndarray:
    """Inverse of `quantise` (the page's JavaScript does the same): [rows] → [rows] float64."""
    if bits == 16:
        return codes.astype(np.float64) / 65535 * top
    return (codes.astype(np.float64) / 255) ** 2 * top


def _width(top: int) -> int:
    return 1 if top < 256 else 2


def _unsigned(values: np.ndarray, width: int) -> bytes:
    return values.astype("<u2" if width == 2 else np.uint8).tobytes()


def embed_json(value: Any) -> str:
    """JSON safe inside a <script> element: ASCII only, and no '<', '>' or '&' that could end the element."""
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return re.sub(r"[<>&]", lambda m: _JSON_ESCAPES[m.group(0)], text)


def decode_group(group: dict[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of `encode_document` for one group: query, key and each measure's values per row (dequantised), and "kept_mass"
    per row when stored."""
    raw = zlib.decompress(base64.b64decode(group["z"]))
    n, rows, bits = group["n"], group["r"], group["w"]
    offset = 0

    def take(count: int, width: int) -> np.ndarray:
        nonlocal offset
        array = np.frombuffer(raw, dtype="<u2" if width == 2 else np.uint8, count=count, offset=offset)
        offset += count * width
        return array.astype(np.int64)

    counts = take(n, group["c"])
    decoded = {"query_pos": np.repeat(np.arange(n), counts), "key_pos": take(rows, group["kw"])}
    for name, top in group["v"].items():
        decoded[name] = dequantise(take(rows, bits // 8), top, bits)
    if group["m"]:
        kept = dequantise(take(int((counts > 0).sum()), bits // 8), 1.0, bits)
        decoded["kept_mass"] = np.repeat(kept, counts[counts > 0])
    assert offset == len(raw), "the group's bytes are read to the end"
    return decoded


def strongest_keys(query: np.ndarray, values: np.ndarray, keep: int | None) -> np.ndarray:
    """Indices of each query row's `keep` strongest keys by `values` (None: every key), in their (query, key) order.

    query, values: [rows], rows sorted by (query, key). Ties keep the lower key (a stable sort).
    """
    if keep is None or not len(query) or np.bincount(query).max() <= keep:  # every row keeps all its keys
        return np.arange(len(query))
    order = np.lexsort((-values, query))  # by query, then strongest first; stable, so ties stay in key order
    sorted_query = query[order]
    starts = np.flatnonzero(np.r_[True, sorted_query[1:] != sorted_query[:-1]])  # first row of each query
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    return np.sort(order[rank < keep])


def detail_levels(keys_per_row: int) -> list[tuple[int, int]]:
    """(bits per value, keys per row) from most to least detailed: what a long document is embedded with when
    the page cannot hold every document at a finer level."""
    levels = [(16, keys_per_row), (8, keys_per_row)]
    keys = keys_per_row // 2
    while keys >= 2:
        levels.append((8, keys))
        keys //= 2
    return levels


# -- reading the run ----------------------------------------------------------------------------------------
def _number(value: Any) -> float | None:
    """A float for JSON, or None for NaN / missing."""
    if value is None:
        return None
    number = float(value)
    return None if np.isnan(number) else number


class MaxAttention:
    """Running mean of each query row's largest attention weight per (layer, head): the fallback colour."""

    def __init__(self, n_layers: int, n_heads: int) -> None:
        self.total = np.zeros((n_layers, n_heads))  # [layer, head]
        self.rows = np.zeros((n_layers, n_heads))  # [layer, head]

    def add(self, layer: int, head: int, row_maxima: np.ndarray) -> None:
        """Count one document's query rows of (layer, head): row_maxima [query row] each row's largest weight."""
        self.total[layer, head] += row_maxima.sum()
        self.rows[layer, head] += len(row_maxima)

    def merge(self, other: MaxAttention) -> None:
        self.total += other.total
        self.rows += other.rows

    def values(self) -> list[float | None]:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.total / self.rows
        return [_number(v) for v in mean.reshape(-1)]


def split_documents(rows: pd.DataFrame) -> dict[int, dict[str, np.ndarray]]:
    """Association rows → per document, its columns as NumPy arrays sorted by (layer, head, query_pos, key_pos):
    one sort of the whole table on a single integer key, instead of a group-by and a sort per document."""
    if not len(rows):
        return {}
    columns = {name: rows[name].to_numpy() for name in rows.columns}
    doc = columns["doc_id"].astype(np.int64)
    sort_by = [doc - doc.min(), columns["layer"].astype(np.int64), columns["head"].astype(np.int64) + 1,
               columns["query_pos"].astype(np.int64), columns["key_pos"].astype(np.int64)]
    sizes = [int(c.max()) + 1 for c in sort_by]
    if math.prod(sizes) < 2**62:  # one integer key: an argsort of it is several times faster than a lexsort
        key = sort_by[0]
        for column, size in zip(sort_by[1:], sizes[1:], strict=True):
            key = key * size + column
        order = np.argsort(key)
    else:
        order = np.lexsort(sort_by[::-1])
    columns = {name: values[order] for name, values in columns.items()}
    doc = doc[order]
    bounds = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1], True])
    return {int(doc[start]): {name: values[start:stop] for name, values in columns.items()}
            for start, stop in zip(bounds[:-1], bounds[1:], strict=True)}


def encode_document(
    rows: dict[str, np.ndarray],
    n_positions: int,
    n_layers: int,
    n_heads: int,
    max_attention: MaxAttention | None = None,
    keys_per_row: int | None = None,
    bits: int = 16,
) -> dict[str, Any]:
    """Every matrix group (layer, head or the layer) of one document in compact form: "h"[layer][head] and
    "l"[layer] (None where nothing is stored).

    A group is {"n": positions, "r": rows, "c": bytes per row length, "kw": bytes per key, "w": bits per value,
    "v": {measure: largest value}, "m": 1 when kept mass follows, "z": base64 of the zlib-compressed bytes}: row
    lengths [n], keys [rows], each measure's quantised values [rows] in "v"'s order, then the kept mass of each
    non-empty row (little-endian). A measure with nulls among the group's rows is left out of it.

    rows: the document's columns sorted by (layer, head, query_pos, key_pos) (`split_documents`). keys_per_row:
    keep only each query row's strongest keys (by attention on head rows, by the first stored layer measure on
    layer rows); None keeps every stored key. bits: 16 or 8 per value (`quantise`).

    The selection, the counts, the largest values and the quantised codes are computed for all the document's
    groups at once (a document of MiniLM has 78); only the bytes are joined and compressed group by group.
    """
    layer = rows["layer"].astype(np.int64)
    head = rows["head"].astype(np.int64)
    query = rows["query_pos"].astype(np.int64)
    key = rows["key_pos"].astype(np.int64)
    columns = {m: rows[m].astype(np.float64) for m in (*HEAD_MEASURES, *LAYER_MEASURES) if m in rows}
    kept_mass = rows["kept_mass"].astype(np.float64) if "kept_mass" in rows else None
    n_positions = max(
        n_positions, int(query.max()) + 1 if len(query) else 0, int(key.max()) + 1 if len(key) else 0
    )
    head_groups: list[list[Any]] = [[None] * n_heads for _ in range(n_layers)]
    layer_groups: list[Any] = [None] * n_layers
    if not len(query):
        return {"h": head_groups, "l": layer_groups}
    group_id = layer * (n_heads + 1) + (head + 1)  # [rows]; rows are sorted by it
    starts = np.flatnonzero(np.r_[True, group_id[1:] != group_id[:-1]])  # [group] first row
    sizes = np.diff(np.r_[starts, len(group_id)])  # [group]
    group = np.repeat(np.arange(len(starts)), sizes)  # [rows] each row's group
    nan_rows = {m: np.add.reduceat(np.isnan(c), starts) for m, c in columns.items()}  # [group]
    # each group's measures (those not NaN on every row) and the values its rows are ranked by (the first)
    names: list[list[str]] = []
    ranked_by = np.zeros(len(query))  # [rows]
    for g, (start, size) in enumerate(zip(starts.tolist(), sizes.tolist(), strict=True)):
        measures = HEAD_MEASURES if head[start] >= 0 else LAYER_MEASURES
        names.append([m for m in measures if m in columns and nan_rows[m][g] < size])
        if names[g]:
            ranked_by[start : start + size] = columns[names[g][0]][start : start + size]
    runs = np.flatnonzero(np.r_[True, (group[1:] != group[:-1]) | (query[1:] != query[:-1])])  # each query row
    row_max = np.maximum.reduceat(columns["attention"], runs) if "attention" in columns else None  # [query row]
    kept = strongest_keys(group * n_positions + query, ranked_by, keys_per_row)  # [kept rows], per group in order
    k_group, k_query, k_key = group[kept], query[kept], key[kept]
    n_groups = len(starts)
    k_starts = np.searchsorted(k_group, np.arange(n_groups + 1))  # [group + 1] each group's kept rows
    counts = np.bincount(k_group * n_positions + k_query, minlength=n_groups * n_positions).reshape(n_groups, -1)
    values = {m: c[kept] for m, c in columns.items()}  # [kept rows]
    tops = {m: np.maximum(np.maximum.reduceat(v, k_starts[:-1]), 0.0) for m, v in values.items()}  # [group]
    complete = {m: np.add.reduceat(np.isnan(v), k_starts[:-1]) == 0 for m, v in values.items()}  # [group]
    codes = {m: quantise(v, tops[m][k_group], bits) for m, v in values.items()}  # [kept rows]
    k_runs = np.flatnonzero(np.r_[True, (k_group[1:] != k_group[:-1]) | (k_query[1:] != k_query[:-1])])
    run_starts = np.searchsorted(k_group[k_runs], np.arange(n_groups + 1))  # [group + 1] each group's rows
    mass_codes = None
    if kept_mass is not None:
        mass = kept_mass[kept]
        mass_complete = np.add.reduceat(np.isnan(mass), k_starts[:-1]) == 0  # [group]
        mass_codes = quantise(mass[k_runs], 1.0, bits)  # [kept query row]: the mass is constant along a row
    key_width = _width(n_positions - 1)
    all_runs = np.searchsorted(group[runs], np.arange(n_groups + 1))  # [group + 1] each group's query rows
    for g in range(n_groups):
        if not names[g]:
            continue
        g_layer, g_head = int(layer[starts[g]]), int(head[starts[g]])
        if max_attention is not None and g_head >= 0 and row_max is not None and nan_rows["attention"][g] == 0:
            max_attention.add(g_layer, g_head, row_max[all_runs[g] : all_runs[g + 1]])  # every row, before selection
        lo, hi = int(k_starts[g]), int(k_starts[g + 1])
        encoded_measures = [m for m in names[g] if complete[m][g]]
        count_width = _width(int(counts[g].max()))
        parts = [_unsigned(counts[g], count_width), _unsigned(k_key[lo:hi], key_width)]
        parts += [codes[m][lo:hi].tobytes() for m in encoded_measures]
        has_kept = mass_codes is not None and bool(mass_complete[g])
        if has_kept:
            assert mass_codes is not None
            parts.append(mass_codes[run_starts[g] : run_starts[g + 1]].tobytes())
        encoded = {
            "n": int(n_positions),
            "r": hi - lo,
            "c": count_width,
            "kw": key_width,
            "w": bits,
            "v": {m: float(tops[m][g]) for m in encoded_measures},
            "m": int(has_kept),
            "z": base64.b64encode(zlib.compress(b"".join(parts), ZLIB_LEVEL)).decode("ascii"),
        }
        if g_head >= 0:
            head_groups[g_layer][g_head] = encoded
        else:
            layer_groups[g_layer] = encoded
    return {"h": head_groups, "l": layer_groups}


def _heads_metrics(heads: pd.DataFrame | None, n_layers: int, n_heads: int) -> dict[str, list[float | None]]:
    """heads.parquet as metric → [layer·n_heads + head] values (metrics NaN for every head dropped)."""
    if heads is None:
        return {}
    index = heads["layer"].to_numpy(np.int64) * n_heads + heads["head"].to_numpy(np.int64)
    metrics: dict[str, list[float | None]] = {}
    for column in heads.columns:
        if column in ("layer", "head", "n_rows") or not pd.api.types.is_numeric_dtype(heads[column]):
            continue
        values: list[float | None] = [None] * (n_layers * n_heads)
        for i, v in zip(index, heads[column], strict=True):
            if 0 <= i < len(values):
                values[i] = _number(v)
        if any(v is not None for v in values):
            metrics[str(column)] = values
    return metrics


def _neighbours(
    similarity: pd.DataFrame | None, n_heads: int, count: int = 3
) -> dict[str, list[list[float]]] | None:
    """Per head "L,H": its `count` closest other heads by Jensen–Shannon divergence, [[layer, head, js]]."""
    if similarity is None or "js_divergence" not in similarity:
        return None
    other = similarity[
        (similarity["layer_a"] != similarity["layer_b"]) | (similarity["head_a"] != similarity["head_b"])
    ]
    other = other.dropna(subset=["js_divergence"]).sort_values("js_divergence", kind="stable")
    result: dict[str, list[list[float]]] = {}
    for (layer, head), group in other.groupby(["layer_a", "head_a"], sort=False):
        result[f"{int(layer)},{int(head)}"] = [
            [int(r.layer_b), int(r.head_b), round(float(r.js_divergence), 4)]
            for r in group.head(count).itertuples()
        ]
    return result


def _verification(table: pd.DataFrame | None, n_layers: int, n_heads: int) -> dict[str, list[Any]] | None:
    if table is None:
        return None
    size = n_layers * n_heads
    out: dict[str, list[Any]] = {
        "pattern_max_abs_err": [None] * size,
        "z_max_abs_err": [None] * size,
        "passed": [None] * size,
    }
    for row in table.itertuples():
        i = int(row.layer) * n_heads + int(row.head)
        if 0 <= i < size:
            out["pattern_max_abs_err"][i] = _number(row.pattern_max_abs_err)
            out["z_max_abs_err"][i] = _number(row.z_max_abs_err)
            out["passed"][i] = bool(row.passed)
    return out


def _agreement(table: pd.DataFrame | None) -> dict[str, Any] | None:
    """agreement.parquet for the page: per layer, ρ of value_zeroing with each other measure when value_zeroing
    was among the measures, else of every pair: {"columns": ["a · b", ...], "rows": [[layer, ρ or None, ...]],
    "n_rows": [[layer, n or None, ...]]}."""
    if table is None or table.empty:
        return None
    table = table.assign(pair=[f"{a} · {b}" for a, b in zip(table["measure_a"], table["measure_b"], strict=True)])
    intervention = (table["measure_a"] == "value_zeroing") | (table["measure_b"] == "value_zeroing")
    if intervention.any():
        table = table[intervention]
        other = np.where(table["measure_a"] == "value_zeroing", table["measure_b"], table["measure_a"])
        table = table.assign(pair=[f"value_zeroing · {m}" for m in other])
    columns = list(dict.fromkeys(table["pair"]))
    rows, counts = [], []
    for layer, part in table.groupby("layer", sort=True):
        by_pair = part.set_index("pair")
        rows.append([int(layer), *(_number(by_pair["spearman"].get(c)) for c in columns)])
        counts.append([int(layer), *(int(by_pair["n_rows"][c]) if c in by_pair.index else None for c in columns)])
    return {"columns": columns, "rows": rows, "n_rows": counts,
            "versus_value_zeroing": bool(intervention.any())}


# -- the page -----------------------------------------------------------------------------------------------
def _template() -> tuple[str, str]:
    """The page template, and a Content-Security-Policy that runs only its own script (by hash)."""
    template = TEMPLATE.read_text(encoding="utf-8")
    match = re.search(r'<script id="app">(.*?)</script>', template, flags=re.DOTALL)
    assert match is not None, 'report_template.html has its script in <script id="app">'
    digest = base64.b64encode(hashlib.sha256(match.group(1).encode("utf-8")).digest()).decode("ascii")
    csp = (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
        "base-uri 'none'; form-action 'none'"
    )
    return template, csp


def render_page(meta: dict[str, Any], docs_json: str, template: str, csp: str) -> str:
    """Fill the template in one pass (inserted text is never scanned again for placeholders)."""
    values = {
        "TITLE": html.escape(f"Attention report · {meta['run'].get('name') or 'run'}"),
        "CSP": html.escape(csp, quote=False),
        "META_JSON": embed_json(meta),
        "DOCS_JSON": docs_json,
    }
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values[m.group(1)], template)


def build_report(
    output_dir: Path | str, max_docs: int = DEFAULT_MAX_DOCS, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[str, dict[str, Any]]:
    """The page's HTML and its metadata (what `write_report` writes); bounds: module docstring."""
    folder = Path(output_dir)
    if max_docs < 0:
        raise UserError(f"--max-docs must be ≥ 0 (got {max_docs})")
    run = open_run(folder)
    manifest = run.manifest
    if not (run.has("documents") and run.has("tokens")):
        raise UserError(
            f"the run in '{output_dir}' is not finished (no documents.parquet or tokens.parquet); "
            "finish it with `extractor run ... --resume`"
        )
    documents = run.table("documents", columns=["doc_id", "status"])
    heads = run.optional("heads")
    verification = run.optional("verification")
    n_layers, n_heads = run.shape
    config = run.config
    provenance = manifest.get("provenance") or {}
    pairs_stored = run.has_associations()
    stored = set(run.stored_measures()) if pairs_stored else set()
    measures = {m: info for m, info in MEASURE_INFO.items() if m in stored}
    metrics = _heads_metrics(heads, n_layers, n_heads)
    max_attention = MaxAttention(n_layers, n_heads) if not metrics and "attention" in measures else None

    meta: dict[str, Any] = {
        "run": {
            "name": manifest.get("run") or folder.name,
            "status": manifest.get("status"),
            "counts": manifest.get("counts") or {},
            "timings": manifest.get("timings") or {},
            "config": {
                k: config.get(k)
                for k in (
                    "input",
                    "storage",
                    "top_k",
                    "threshold",
                    "level",
                    "measures",
                    "max_length",
                    "long_documents",
                    "verify",
                    "atol",
                )
            },
        },
        "provenance": {k: provenance.get(k) for k in PROVENANCE_KEYS if k in provenance},
        "verification_summary": manifest.get("verification"),
        "verification": _verification(verification, n_layers, n_heads),
        "n_layers": n_layers,
        "n_heads": n_heads,
        "decimals": DECIMALS,
        "detail": None,
        "agreement": _agreement(run.optional("agreement")),
        "measures": measures,
        "metrics": metrics,
        "metric_notes": METRIC_NOTES,
        "default_metric": DEFAULT_METRIC,
        "metric_source": "heads.parquet" if metrics else None,
        "neighbours": _neighbours(run.optional("head_similarity"), n_heads),
        "sampling": {
            "max_docs": max_docs,
            "max_bytes": max_bytes,
            "documents_total": int(len(documents)),
            "documents_usable": 0,
            "documents_embedded": 0,
            "left_out_for_size": 0,
            "pairs_stored": pairs_stored,
        },
    }
    keys_stored = (
        int(config.get("top_k") or DENSE_KEYS_PER_ROW) if config.get("storage") == "topk" else DENSE_KEYS_PER_ROW
    )
    meta["detail"] = {"bits": 16, "keys_per_row": keys_stored, "keys_stored": keys_stored,
                      "short_document": SHORT_DOCUMENT}
    template, csp = _template()
    # Bytes left for documents: the page without them, and room for the numbers filled in below.
    budget = max_bytes - len(render_page(meta, "[]", template, csp).encode("utf-8")) - 1024
    candidates = run.usable_doc_ids()
    meta["sampling"]["documents_usable"] = len(candidates)
    ids = candidates[:max_docs]
    labels = run.position_labels(ids) if ids else {}
    texts = run.texts(ids) if ids else {}
    pairs = run.pair_texts(ids) if ids else {}  # a sentence pair's second text
    rows = run.associations(ids, measures=list(MEASURE_INFO)) if ids and pairs_stored else None
    grouped = split_documents(rows) if rows is not None else {}
    status_of = dict(zip(documents["doc_id"].astype(int), documents["status"], strict=True))

    def encode(doc_id: int, level: tuple[int, int]) -> tuple[str, MaxAttention | None]:
        """One document's JSON at a level of detail, and its share of the fallback colour."""
        positions, special = labels.get(doc_id, ([], []))
        doc_rows = grouped.get(doc_id)
        doc_max = MaxAttention(n_layers, n_heads) if max_attention is not None else None
        bits, keys = level
        matrices = (
            encode_document(doc_rows, len(positions), n_layers, n_heads, doc_max,
                            None if len(positions) <= SHORT_DOCUMENT else keys, bits)
            if doc_rows is not None
            else {"h": None, "l": None}
        )
        document = {"id": doc_id, "status": status_of.get(doc_id), "tokens": positions, "special": special,
                    "text": texts.get(doc_id, ""), **({"pair": pairs[doc_id]} if doc_id in pairs else {}), **matrices}
        return embed_json(document), doc_max

    levels = detail_levels(keys_stored)
    sample: dict[int, dict[Any, Any]] = {doc_id: {} for doc_id in ids[:3]}  # doc → level → encoded: size estimate per level
    level = levels[0]
    for level in levels:
        sizes = [len(sample[d].setdefault(level, encode(d, level))[0]) + 1 for d in sample]
        if not sizes or sum(sizes) / len(sizes) * len(ids) <= budget:
            break
    meta["detail"] = {"bits": level[0], "keys_per_row": level[1], "keys_stored": keys_stored,
                      "short_document": SHORT_DOCUMENT}
    docs: list[str] = []
    used = 0
    for doc_id in ids:
        text, doc_max = sample[doc_id][level] if doc_id in sample else encode(doc_id, level)
        if used + len(text) + 1 > budget:  # +1: the comma
            meta["sampling"]["left_out_for_size"] += 1
            continue
        docs.append(text)
        used += len(text) + 1
        if max_attention is not None and doc_max is not None:  # the fallback colour counts embedded documents
            max_attention.merge(doc_max)
    meta["sampling"]["documents_embedded"] = len(docs)
    if max_attention is not None and docs:
        meta["metrics"] = {"mean_max_attention": max_attention.values()}
        meta["default_metric"] = "mean_max_attention"
        meta["metric_source"] = "embedded documents"
    if verification is not None:
        for name in ("pattern_max_abs_err", "z_max_abs_err"):
            meta["metrics"][name] = meta["verification"][name]
    page = render_page(meta, "[" + ",".join(docs) + "]", template, csp)
    size = len(page.encode("utf-8"))
    if size > max_bytes:
        raise UserError(
            f"the report needs {size:,} bytes without any document, more than max_bytes={max_bytes:,}; "
            "raise --max-mb"
        )
    return page, meta


def write_report(
    output_dir: Path | str, max_docs: int = DEFAULT_MAX_DOCS, max_bytes: int = DEFAULT_MAX_BYTES
) -> Path:
    """Write OUTPUT/report.html: ≤ `max_docs` documents (default 50), ≤ `max_bytes` bytes (default 5 MB)."""
    page, meta = build_report(output_dir, max_docs, max_bytes)
    path = Path(output_dir) / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    checkpoint("report")
    os.replace(tmp, path)
    sampling = meta["sampling"]
    log.info(
        "report: %s (%d bytes, %d of %d documents)",
        path,
        len(page.encode("utf-8")),
        sampling["documents_embedded"],
        sampling["documents_total"],
    )
    return path
