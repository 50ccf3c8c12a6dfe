"""The HTML run report: its embedded data equals the Parquet tables, it stays within its bounds, it escapes
every text, and in a real headless browser (Debian's chromium driven by Playwright) it loads offline without
errors, reacts to clicks and hovers with the Parquet values, and runs nothing a corpus smuggles in.

Browser set-up (no download): `apt-get install -y chromium` and `pip install playwright` (never
`playwright install`); the chromium binary can be moved with EXTRACTOR_CHROMIUM (tests/browser.py).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from extractor.api import run_extraction
from extractor.attribution.measures import MEASURES
from extractor.cli import app
from extractor.core.models import LoadedModel
from extractor.corpus.config import RunConfig
from extractor.corpus.run_folder import open_run
from extractor.corpus.tables import TOKEN_SCHEMA
from extractor.errors import UserError
from extractor.presentation.report import (
    DEFAULT_MAX_BYTES,
    HEAD_MEASURES,
    LAYER_MEASURES,
    build_report,
    decode_group,
    dequantise,
    quantise,
    write_report,
)

SAMPLE_CORPUS = Path(__file__).resolve().parent.parent / "data" / "sample.txt"

MALICIOUS = "<script>alert(1)</script> and <img src=x onerror=alert(2)>"
# Tokens that would break out of a <script> element or run code if the page ever parsed data as HTML.
HOSTILE_TOKENS = ["</script><script>alert(3)</script>", "<img src=x onerror=alert(4)>", "&lt;b&gt;"]
TOLERANCE = 1e-4
INDEX = ["doc_id", "layer", "head", "query_pos", "key_pos"]


# -- runs --------------------------------------------------------------------------------------------------
def _run(folder: Path, lines: list[str], loaded: LoadedModel, **settings: Any) -> Path:
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = RunConfig(input=str(corpus), output=str(folder / "out"), plots=False, report=True, **settings)
    run_extraction(config, quiet=True, loaded=loaded)
    return folder / "out"


@pytest.fixture(scope="session")
def report_run(
    tmp_path_factory: pytest.TempPathFactory, minilm: LoadedModel, sample_texts: list[str]
) -> Path:
    """8 sample sentences + a line of HTML, top-k storage, every measure; the run writes report.html."""
    return _run(tmp_path_factory.mktemp("report-topk"), sample_texts[:8] + [MALICIOUS], minilm, measures=list(MEASURES))


@pytest.fixture(scope="session")
def dense_word_run(
    tmp_path_factory: pytest.TempPathFactory, minilm: LoadedModel, sample_texts: list[str]
) -> Path:
    """Dense storage (every pair, float16) at word level: keys are implicit in the page's compact form."""
    return _run(
        tmp_path_factory.mktemp("report-dense"),
        sample_texts[:4] + [MALICIOUS],
        minilm,
        storage="dense",
        level="word",
    )


@pytest.fixture(scope="session")
def default_run(tmp_path_factory: pytest.TempPathFactory, minilm: LoadedModel) -> Path:
    """configs/default.yaml's run: the 60-sentence sample corpus, top-k 8, every measure."""
    folder = tmp_path_factory.mktemp("report-default")
    config = RunConfig(input=str(SAMPLE_CORPUS), output=str(folder / "out"), plots=False, report=True,
                       measures=list(MEASURES))
    run_extraction(config, quiet=True, loaded=minilm)
    return folder / "out"


def _copy(run: Path, target: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(run, target)
    for name in drop:
        path = target / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (target / "report.html").unlink(missing_ok=True)
    return target


@pytest.fixture(scope="session")
def hostile_run(tmp_path_factory: pytest.TempPathFactory, report_run: Path) -> Path:
    """The small run with tokens of its first document replaced by HTML that closes <script> elements."""
    folder = _copy(report_run, tmp_path_factory.mktemp("report-hostile") / "out")
    tokens = pq.read_table(folder / "tokens.parquet").to_pandas()
    first = tokens.index[(tokens["doc_id"] == 0) & (tokens["position"].between(1, len(HOSTILE_TOKENS)))]
    tokens.loc[first, "token"] = HOSTILE_TOKENS
    tokens.loc[first, ["char_start", "char_end"]] = 0  # an empty span: the page shows the token string
    pq.write_table(
        pa.Table.from_pandas(tokens, schema=TOKEN_SCHEMA, preserve_index=False), folder / "tokens.parquet"
    )
    write_report(folder)
    return folder


# -- reading a page back -----------------------------------------------------------------------------------
def _script(page: str, element_id: str) -> str:
    match = re.search(
        rf'<script type="application/json" id="{element_id}">(.*?)</script>', page, flags=re.DOTALL
    )
    assert match is not None, f"no <script id={element_id}> in the page"
    return match.group(1)


def page_data(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    page = path.read_text(encoding="utf-8")
    return json.loads(_script(page, "report-data")), json.loads(_script(page, "report-docs"))


def embedded_rows(docs: list[dict[str, Any]]) -> pd.DataFrame:
    """Every (doc, layer, head, query, key) the page holds, with its measures, decoded as the page does."""
    frames = []
    for doc in docs:
        groups = [
            (layer, head, g) for layer, heads in enumerate(doc["h"] or []) for head, g in enumerate(heads)
        ]
        groups += [(layer, -1, g) for layer, g in enumerate(doc["l"] or [])]
        for layer, head, group in groups:
            if group is None:
                continue
            frame = pd.DataFrame(decode_group(group))
            # the quantisation step of each measure in this group: 16 bits of its largest value
            steps = {f"{m}_step": top / 65535 for m, top in group["v"].items()}
            frames.append(frame.assign(doc_id=doc["id"], layer=layer, head=head, **steps))
    return pd.concat(frames, ignore_index=True)


def parquet_rows(run: Path, doc_ids: list[int], **equal: int) -> pd.DataFrame:
    """The stored rows of `doc_ids`, read through the `associations` view users query (a dense run's matrices
    unnested by DuckDB, not by the code the report uses)."""
    where = [f"doc_id IN ({', '.join(str(int(d)) for d in doc_ids) or 'NULL'})"]
    where += [f"{column} = {int(value)}" for column, value in equal.items()]
    return open_run(run).sql(f"SELECT * FROM associations WHERE {' AND '.join(where)}").df()


def assert_page_equals_parquet(run: Path) -> None:
    meta, docs = page_data(run / "report.html")
    assert docs, "the page embeds no document"
    page = embedded_rows(docs)
    table = parquet_rows(run, [d["id"] for d in docs])
    for level, measures in (("head", HEAD_MEASURES), ("layer", LAYER_MEASURES)):
        rows = table[table["head"] >= 0] if level == "head" else table[table["head"] < 0]
        shown = page[page["head"] >= 0] if level == "head" else page[page["head"] < 0]
        merged = rows.merge(shown, on=INDEX, how="outer", suffixes=("", "_page"), indicator=True)
        assert (merged["_merge"] == "both").all(), (
            f"{level} pairs differ between the page and the Parquet table"
        )
        for measure in measures:
            if measure in rows:
                error = (merged[measure].astype(np.float64) - merged[f"{measure}_page"]).abs()
                assert (error <= merged[f"{measure}_step"].fillna(0) / 2 + 1e-7).all(), (
                    f"{measure}: page differs from Parquet by {error.max()}")
    assert set(meta["measures"]) == {m for m in (*HEAD_MEASURES, *LAYER_MEASURES) if m in table}


# -- the file ---------------------------------------------------------------------------------------------
def test_run_writes_one_self_contained_file(report_run: Path) -> None:
    page = (report_run / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # Nothing is loaded from elsewhere: no src/href attributes, no stylesheet links, no imports.
    assert not re.search(r"<(script|img|link|iframe)[^>]*\s(src|href)\s*=", page, flags=re.IGNORECASE)
    assert "@import" not in page and "url(" not in page
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert csp is not None and "default-src 'none'" in csp.group(1) and "script-src 'sha256-" in csp.group(1)
    assert page.count("<script") == 3  # two JSON data elements and the page's own code


def test_topk_page_values_equal_parquet(report_run: Path) -> None:
    assert_page_equals_parquet(report_run)


def test_dense_word_page_values_equal_parquet(dense_word_run: Path) -> None:
    assert_page_equals_parquet(dense_word_run)
    meta, docs = page_data(dense_word_run / "report.html")
    words = pq.read_table(dense_word_run / "words.parquet").to_pandas()
    assert (
        docs[0]["tokens"]
        == words[words["doc_id"] == docs[0]["id"]].sort_values("word_index")["word"].tolist()
    )


def test_documents_text_and_tokens(report_run: Path, sample_texts: list[str]) -> None:
    meta, docs = page_data(report_run / "report.html")
    tokens = pq.read_table(report_run / "tokens.parquet").to_pandas()
    inputs = [*sample_texts[:8], MALICIOUS]  # doc_id = input line
    for doc in docs:
        text = inputs[doc["id"]]
        assert doc["text"] == text  # the original text, capitals and all (MiniLM lower-cases its tokens)
        expected = tokens[tokens["doc_id"] == doc["id"]].sort_values("position")
        spans = zip(expected["token"], expected["char_start"], expected["char_end"], strict=True)
        assert doc["tokens"] == [text[a:b] if b > a else token for token, a, b in spans]
        assert doc["special"] == [i for i, s in enumerate(expected["is_special"]) if s]
    assert docs[1]["text"] != docs[1]["text"].lower()


def test_data_cannot_close_its_script_element(hostile_run: Path) -> None:
    page = (hostile_run / "report.html").read_text(encoding="utf-8")
    for element in ("report-data", "report-docs"):
        assert not re.search(r"[<>&]", _script(page, element)), (
            "'<', '>' and '&' must be \\u escapes in the JSON"
        )
    assert page.count("</script>") == 3
    _, docs = page_data(hostile_run / "report.html")
    assert docs[0]["tokens"][1 : 1 + len(HOSTILE_TOKENS)] == HOSTILE_TOKENS  # the text itself is unchanged


def test_quantise_round_trip() -> None:
    rng = np.random.default_rng(0)
    values = np.r_[0.0, 1e-4, rng.random(1000), 1.0]
    exact = dequantise(quantise(values, 1.0, 16), 1.0, 16)
    assert np.abs(exact - values).max() <= 0.5 / 65535 + 1e-12  # 16 bits: half a step of the largest value
    coarse = dequantise(quantise(values * 7, 7.0, 8), 7.0, 8)
    # 8 bits on a square-root scale: half a step in √(value / largest)
    assert np.abs(np.sqrt(coarse / 7) - np.sqrt(values)).max() <= 0.5 / 255 + 1e-12
    assert quantise(values, 1.0, 16).dtype == np.uint16 and quantise(values, 1.0, 8).dtype == np.uint8


def test_bounds(report_run: Path, tmp_path: Path) -> None:
    page, meta = build_report(report_run, max_docs=2)
    assert meta["sampling"]["documents_embedded"] == 2
    assert [d["id"] for d in json.loads(_script(page, "report-docs"))] == [0, 1]
    full, full_meta = build_report(report_run)
    assert full_meta["sampling"]["documents_embedded"] == 9
    limit = len(full.encode()) // 2
    page, meta = build_report(report_run, max_bytes=limit)
    assert len(page.encode()) <= limit
    assert 0 < meta["sampling"]["documents_embedded"] < 9
    assert meta["sampling"]["left_out_for_size"] == 9 - meta["sampling"]["documents_embedded"]
    with pytest.raises(UserError, match="max_bytes"):
        build_report(report_run, max_bytes=10_000)
    with pytest.raises(UserError, match="no manifest.json"):
        build_report(tmp_path)


@pytest.mark.slow
def test_default_run_page_is_small(default_run: Path) -> None:
    """configs/default.yaml over the 60-sentence sample: 50 documents embedded, the file under 5 MB."""
    path = default_run / "report.html"
    meta, docs = page_data(path)
    assert len(docs) == 50 and meta["sampling"]["documents_total"] == 60
    assert path.stat().st_size < DEFAULT_MAX_BYTES
    assert meta["metric_source"] == "heads.parquet"


def test_without_heads_parquet_colours_by_mean_max_attention(report_run: Path, tmp_path: Path) -> None:
    folder = _copy(report_run, tmp_path / "out", drop=("heads.parquet", "head_similarity.parquet"))
    meta, docs = page_data(write_report(folder))
    assert meta["metric_source"] == "embedded documents" and meta["default_metric"] == "mean_max_attention"
    rows = parquet_rows(folder, [d["id"] for d in docs])
    rows = rows[rows["head"] >= 0]
    expected = (
        rows.groupby(["layer", "head", "doc_id", "query_pos"])["attention"]
        .max()
        .groupby(["layer", "head"])
        .mean()
    )
    got = np.array(meta["metrics"]["mean_max_attention"])
    n_heads = meta["n_heads"]
    index = expected.index.get_level_values(0) * n_heads + expected.index.get_level_values(1)
    np.testing.assert_allclose(got[index], expected.to_numpy(), rtol=1e-6)


def test_cli_report(report_run: Path, tmp_path: Path) -> None:
    folder = _copy(report_run, tmp_path / "out")
    result = CliRunner().invoke(app, ["report", str(folder), "--max-docs", "3"])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output
    assert len(page_data(folder / "report.html")[1]) == 3
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2
    assert "no manifest.json" in missing.output


# -- long documents split into windows, and the user's own text ----------------------------------------------
LONG = (
    "The animal didn't cross the street because it was too tired, and the city councilmen refused the "
    "demonstrators a permit because they feared violence."
)
WINDOW_MEASURES = ("attention", "value_norm", "rollout")
UNICODE_TEXT = "Café owners in Zürich love 🤗 emojis."


def _cli_run(folder: Path, model: str, lines: list[str], *flags: str) -> Path:
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = folder / "out"
    result = CliRunner().invoke(app, ["run", "--model", model, "-i", str(corpus), "-o", str(out), *flags,
                                      "--set", "plots=false", "--set", "report=true", "--quiet"])
    assert result.exit_code == 0, (result.output, result.exception)
    return out


@pytest.fixture(scope="session")
def windowed_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Any) -> Path:
    """The tiny BERT over a long sentence cut into 16-token windows that share 4 tokens, top-k 3."""
    flags = ["--max-length", "16", "--storage", "topk", "--top-k", "3", "--measures", ",".join(WINDOW_MEASURES),
             "--set", "long_documents=window", "--set", "window_stride=4"]
    return _cli_run(tmp_path_factory.mktemp("report-window"), str(tiny_model_dir("bert")), [LONG, "Short one."],
                    *flags)


def window_averages(run: Path) -> tuple[dict[tuple[Any, ...], float], dict[tuple[Any, ...], float]]:
    """Brute force from the raw rows: (cell, measure) → mean over the windows that stored it, and
    (doc, layer, head, query) → mean kept mass over the windows that stored the row."""
    raw = ds.dataset(run / "associations").to_table().to_pandas()
    values: dict[tuple[Any, ...], list[float]] = {}
    kept: dict[tuple[Any, ...], dict[int, float]] = {}
    for row in raw.itertuples(index=False):
        cell = (int(row.doc_id), int(row.layer), int(row.head), int(row.query_pos), int(row.key_pos))
        for measure in WINDOW_MEASURES:
            value = float(getattr(row, measure))
            if not np.isnan(value):
                values.setdefault((*cell, measure), []).append(value)
        kept.setdefault(cell[:4], {})[int(row.window)] = float(row.kept_mass)
    repeated = [v for v in values.values() if len(v) > 1 and max(v) - min(v) > 10 * TOLERANCE]
    assert repeated, "no cell differs between windows: the test could not tell the policies apart"
    return ({key: sum(v) / len(v) for key, v in values.items()},
            {key: sum(w.values()) / len(w) for key, w in kept.items()})


def test_overlapping_windows_are_averaged_alike_in_report_and_plots(windowed_run: Path) -> None:
    expected, expected_kept = window_averages(windowed_run)
    meta, docs = page_data(windowed_run / "report.html")
    page = embedded_rows(docs)
    shown: dict[tuple[Any, ...], float] = {}
    for measure in WINDOW_MEASURES:
        for row in page.dropna(subset=[measure]).itertuples(index=False):
            cell = (int(row.doc_id), int(row.layer), int(row.head), int(row.query_pos), int(row.key_pos))
            shown[(*cell, measure)] = float(getattr(row, measure))
    assert shown.keys() == expected.keys()
    steps = {(int(r.doc_id), int(r.layer), int(r.head), m): getattr(r, f"{m}_step")
             for r in page.itertuples(index=False) for m in WINDOW_MEASURES if hasattr(r, f"{m}_step")}
    for key, value in expected.items():
        step = steps.get((*key[:3], key[5]), 0.0)
        assert abs(shown[key] - value) <= max(TOLERANCE, step), (key, shown[key], value)
    for doc in docs:  # each non-empty query row's kept mass ("m")
        for layer, heads in enumerate(doc["h"]):
            for head, group in enumerate(heads):
                decoded = pd.DataFrame(decode_group(group)).drop_duplicates("query_pos")
                for query, mass in zip(decoded["query_pos"], decoded["kept_mass"], strict=True):
                    assert abs(mass - expected_kept[(doc["id"], layer, head, int(query))]) <= TOLERANCE

    run = open_run(windowed_run)
    n_layers, n_heads = run.shape
    for doc in docs:
        for measure in ("attention", "value_norm"):
            matrices, labels = run.doc_matrices(doc["id"], measure)
            brute = np.zeros((n_layers, n_heads, len(labels), len(labels)), dtype=np.float64)
            for (doc_id, layer, head, query, key, name), value in expected.items():
                if doc_id == doc["id"] and name == measure and head >= 0:
                    brute[layer, head, query, key] = value
            np.testing.assert_allclose(matrices, brute, rtol=1e-6, atol=1e-7)


def test_the_users_text_is_kept(tmp_path: Path) -> None:
    out = _cli_run(tmp_path, "minilm", [UNICODE_TEXT])
    documents = pq.read_table(out / "documents.parquet").to_pandas()
    assert documents["text"].tolist() == [UNICODE_TEXT]
    _, docs = page_data(out / "report.html")
    assert docs[0]["text"] == UNICODE_TEXT  # not "cafe owners in zurich love [UNK] emojis."
    tokens = pq.read_table(out / "tokens.parquet").to_pandas().sort_values("position")
    assert "[UNK]" in tokens["token"].tolist() and "cafe" in tokens["token"].tolist()
    assert {"Café", "Zürich", "🤗"} <= set(docs[0]["tokens"])  # each token shows the text it spans
    assert open_run(out).labels(0) == docs[0]["tokens"]  # the figures label positions the same way


def test_runs_written_before_documents_kept_their_text(report_run: Path, tmp_path: Path) -> None:
    folder = _copy(report_run, tmp_path / "old")
    pq.write_table(pq.read_table(folder / "documents.parquet").drop(["text"]), folder / "documents.parquet")
    _, docs = page_data(write_report(folder))
    tokens = pq.read_table(folder / "tokens.parquet").to_pandas()
    for doc in docs:  # labels fall back to the token strings; the text places the tokens at their spans
        rows = tokens[tokens["doc_id"] == doc["id"]].sort_values("position")
        assert doc["tokens"] == [t.strip() or "␣" for t in rows["token"]]
        content = rows[~rows["is_special"]]
        gaps = content["char_start"].to_numpy()[1:] > content["char_end"].to_numpy()[:-1]
        pieces = content["token"].tolist()
        assert doc["text"] == pieces[0] + "".join((" " if gap else "") + p for gap, p in zip(gaps, pieces[1:], strict=True))


# -- in a real browser -------------------------------------------------------------------------------------
@dataclass
class Page:
    """A loaded report and everything it did: console messages, page errors, requests, dialogs."""

    page: Any
    url: str
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def rows(self, selector: str, fields: str) -> list[tuple[Any, ...]]:
        """Per element matching `selector`: the JavaScript array expression `fields` of element e."""
        return [tuple(x) for x in self.page.eval_on_selector_all(selector, f"els => els.map(e => {fields})")]

    def weights(self) -> list[tuple[Any, ...]]:
        """(query, key, text) of every weight the view shows."""
        return self.rows("#view text[data-role=weight]", "[+e.dataset.query, +e.dataset.key, e.textContent]")

    def lines(self) -> list[tuple[Any, ...]]:
        return self.rows("#view line", "[e.dataset.q, e.dataset.k, e.getAttribute('stroke-opacity')]")

    def select_doc(self, doc_id: int) -> None:
        index = self.page.eval_on_selector_all(
            "#doc-picker option", f"os => os.findIndex(o => o.textContent.startsWith('#{doc_id} '))"
        )
        assert index >= 0, f"document {doc_id} is not in the picker"
        value = self.page.eval_on_selector_all("#doc-picker option", f"os => os[{index}].value")
        self.page.select_option("#doc-picker", value)
        self.page.wait_for_selector(f'#view-panel[data-doc="{doc_id}"]')


@pytest.fixture
def open_report(browser: Any) -> Iterator[Any]:
    pages: list[Any] = []

    def load(path: Path) -> Page:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(10_000)
        pages.append(page)
        loaded = Page(page, path.resolve().as_uri())
        page.on("console", lambda m: loaded.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: loaded.console_errors.append(str(e)))
        page.on("request", lambda r: loaded.requests.append(r.url))
        page.on("dialog", lambda d: (loaded.dialogs.append(d.message), d.dismiss()))
        page.goto(loaded.url)
        page.wait_for_selector("#grid rect.cell")
        page.wait_for_selector("#view-panel[data-doc]")
        return loaded

    yield load
    for page in pages:
        page.close()


def assert_clean(loaded: Page) -> None:
    assert loaded.console_errors == []
    assert loaded.requests == [loaded.url], "the page must request nothing but itself"
    assert loaded.dialogs == []


def test_page_loads_offline_without_errors(report_run: Path, open_report: Any) -> None:
    loaded = open_report(report_run / "report.html")
    page = loaded.page
    meta, docs = page_data(report_run / "report.html")
    assert page.locator("#grid rect.cell").count() == meta["n_layers"] * meta["n_heads"]
    assert page.locator("#doc-picker option").count() == len(docs)
    assert page.text_content("#verification-verdict") == "PASSED"  # inside the collapsed provenance
    assert page.locator("#verification-layers tr").count() == meta["n_layers"] + 1
    assert "This page embeds 9 of 9 documents" in page.inner_text("#sampling")
    assert page.locator("#view line").count() > 0
    assert_clean(loaded)


def test_clicking_a_head_updates_the_view(report_run: Path, open_report: Any) -> None:
    loaded = open_report(report_run / "report.html")
    page = loaded.page
    assert page.inner_text("#view-title").startswith("layer 0 head 0")
    before = loaded.lines()
    page.click('#grid rect.cell[data-layer="3"][data-head="7"]')
    assert page.inner_text("#view-title").startswith("layer 3 head 7")
    assert page.inner_text("#head-title") == "layer 3 head 7"
    assert loaded.lines() != before
    heads = pq.read_table(report_run / "heads.parquet").to_pandas().set_index(["layer", "head"])
    shown = float(page.inner_text('#head-metrics td[data-metric="max_weight"]'))
    assert shown == pytest.approx(heads.loc[(3, 7), "max_weight"], rel=1e-3)
    assert_clean(loaded)


@pytest.mark.parametrize("measure", ["attention", "value_norm", "rollout", "layer_value_norm"])
def test_hovered_weights_equal_parquet(report_run: Path, open_report: Any, measure: str) -> None:
    loaded = open_report(report_run / "report.html")
    page = loaded.page
    doc_id, layer, head, query = 1, 2, 5, 8  # "The animal didn't cross the street because it ..."
    loaded.select_doc(doc_id)
    page.click(f'#grid rect.cell[data-layer="{layer}"][data-head="{head}"]')
    page.click(f'#measure-switch button[data-measure="{measure}"]')
    head_level = measure in HEAD_MEASURES
    assert ("head 5" in page.inner_text("#view-title")) == head_level
    stored = parquet_rows(report_run, [doc_id], layer=layer, head=head if head_level else -1)

    page.hover(f'#view g.tok[data-role="query"][data-pos="{query}"]')
    shown = loaded.weights()
    row = stored[stored["query_pos"] == query].set_index("key_pos")[measure]
    assert sorted(k for _, k, _ in shown) == sorted(row.index) and {q for q, _, _ in shown} == {query}
    for _, key, text in shown:
        assert abs(float(text) - float(row[key])) <= TOLERANCE, (key, text, row[key])

    page.hover('#view g.tok[data-role="key"][data-pos="2"]')  # a column: every query that stored key 2
    shown = loaded.weights()
    column = stored[stored["key_pos"] == 2].set_index("query_pos")[measure]
    assert sorted(q for q, _, _ in shown) == sorted(column.index)
    for q, _, text in shown:
        assert abs(float(text) - float(column[q])) <= TOLERANCE
    page.mouse.move(1, 1)
    assert loaded.weights() == []
    assert_clean(loaded)


def test_html_in_the_corpus_is_shown_as_text(report_run: Path, open_report: Any) -> None:
    loaded = open_report(report_run / "report.html")
    page = loaded.page
    malicious = len(page_data(report_run / "report.html")[1]) - 1
    loaded.select_doc(page_data(report_run / "report.html")[1][malicious]["id"])
    assert page.inner_text("#doc-text") == MALICIOUS
    assert MALICIOUS in page.inner_text("#doc-picker")
    for position in range(1, 8):
        page.hover(f'#view g.tok[data-role="query"][data-pos="{position}"]')
    assert page.locator("img").count() == 0
    assert page.locator("script").count() == 3
    assert_clean(loaded)


def test_tokens_that_close_script_elements_run_nothing(hostile_run: Path, open_report: Any) -> None:
    loaded = open_report(hostile_run / "report.html")
    page = loaded.page
    labels = page.eval_on_selector_all(
        '#view g.tok[data-role="query"] title', "els => els.map(e => e.textContent)"
    )
    for position, token in enumerate(HOSTILE_TOKENS, start=1):
        assert labels[position] == f"{token} (position {position})"
    page.hover('#view g.tok[data-role="query"][data-pos="1"]')
    assert HOSTILE_TOKENS[0] in page.inner_text("#view-status")
    assert page.locator("img").count() == 0
    assert page.locator("script").count() == 3
    assert_clean(loaded)


def test_page_without_heads_or_pair_tables(report_run: Path, tmp_path: Path, open_report: Any) -> None:
    no_heads = _copy(report_run, tmp_path / "no-heads", drop=("heads.parquet", "head_similarity.parquet"))
    loaded = open_report(write_report(no_heads))
    assert "heads.parquet is not in this run folder" in loaded.page.inner_text("#metric-note")
    assert loaded.page.input_value("#metric-picker") == "mean_max_attention"
    assert_clean(loaded)

    summary = _copy(report_run, tmp_path / "summary", drop=("associations",))
    loaded = open_report(write_report(summary))
    assert "stored no pair tables" in loaded.page.inner_text("#view-status")
    assert loaded.page.locator("#view line").count() == 0
    assert loaded.page.inner_text("#doc-text") != ""
    assert_clean(loaded)


# -- long documents: capacity, the matrix view, the strongest keys, search, provenance, agreement ------------
LONG_DOCS = 50


@pytest.fixture(scope="session")
def long_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Any, sample_texts: list[str]) -> Path:
    """50 documents of about 500 tokens (the sample sentences, shuffled) through a tiny BERT, top-k 8."""
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.permutation(sample_texts)[:40]) for _ in range(LONG_DOCS)]
    model = tiny_model_dir("bert", max_position_embeddings=512)
    return _cli_run(tmp_path_factory.mktemp("report-long"), str(model), lines, "--storage", "topk", "--top-k", "8",
                    "--verify", "off")


def test_fifty_long_documents_fit_in_the_default_size(long_run: Path) -> None:
    page, meta = build_report(long_run)
    tokens = pq.read_table(long_run / "tokens.parquet").to_pandas().groupby("doc_id").size()
    assert (tokens >= 480).all() and len(tokens) == LONG_DOCS
    assert meta["sampling"]["documents_embedded"] == LONG_DOCS
    assert len(page.encode()) <= DEFAULT_MAX_BYTES
    keep = meta["detail"]["keys_per_row"]
    docs = json.loads(_script(page, "report-docs"))
    stored = parquet_rows(long_run, [docs[0]["id"]], layer=1, head=2)
    strongest = stored.sort_values("attention", ascending=False, kind="stable").groupby("query_pos").head(keep)
    shown = pd.DataFrame(decode_group(docs[0]["h"][1][2]))
    assert set(zip(shown["query_pos"], shown["key_pos"], strict=True)) == set(
        zip(strongest["query_pos"], strongest["key_pos"], strict=True)
    ), "a long document keeps each row's strongest keys"


def on_page(run: Path, doc_id: int, layer: int, head: int) -> pd.DataFrame:
    """The Parquet rows of one head of one document that the page holds (long documents keep the strongest)."""
    _, docs = page_data(run / "report.html")
    doc = next(d for d in docs if d["id"] == doc_id)
    shown = pd.DataFrame(decode_group(doc["h"][layer][head]))[["query_pos", "key_pos"]]
    return parquet_rows(run, [doc_id], layer=layer, head=head).merge(shown, on=["query_pos", "key_pos"])


def _row_keys(loaded: Page) -> list[tuple[int, float]]:
    return [(int(k), float(w)) for k, w in loaded.rows("#row-keys tr", "[e.dataset.key, e.lastChild.textContent]")]


def _assert_strongest_keys(shown: list[tuple[int, float]], row: pd.Series, step: float) -> None:
    """`shown` (key, weight) is `row` (key → weight) strongest first, to the page's quantisation."""
    expected = row.sort_values(ascending=False, kind="stable")
    assert [k for k, _ in shown] == list(expected.index[: len(shown)]) and len(shown) == min(12, len(row))
    for (_, weight), value in zip(shown, expected, strict=False):
        assert abs(weight - value) <= step / 2 + 0.5e-4 + 1e-7


def test_matrix_view_draws_the_chosen_head(long_run: Path, open_report: Any) -> None:
    loaded = open_report(long_run / "report.html")
    page = loaded.page
    _, docs = page_data(long_run / "report.html")
    layer, head, doc_id = 1, 2, docs[0]["id"]
    assert page.get_attribute('#view-switch button[data-view="matrix"]', "aria-checked") == "true"  # n > 60
    page.click(f'#grid rect.cell[data-layer="{layer}"][data-head="{head}"]')
    canvas = page.locator("#matrix")
    assert (canvas.get_attribute("data-layer"), canvas.get_attribute("data-head")) == (str(layer), str(head))
    stored = on_page(long_run, doc_id, layer, head)
    largest = stored["attention"].max()
    strong = stored.loc[stored["attention"].idxmax()]
    query, key = int(strong["query_pos"]), int(strong["key_pos"])

    def attribute(name: str) -> float:
        return float(canvas.get_attribute(f"data-{name}") or "nan")

    page.click("#zoom-in")
    assert attribute("cell") == pytest.approx(1.5 * 560 / int(canvas.get_attribute("data-n") or 0))
    page.click("#zoom-reset")
    box = canvas.bounding_box()
    assert box is not None
    at_zoom = 560 / int(canvas.get_attribute("data-n") or 0)
    page.mouse.move(box["x"] + (key + 0.5) * at_zoom, box["y"] + (query + 0.5) * at_zoom)
    for _ in range(10):
        page.mouse.wheel(0, -100)  # zoom in around the pointer
    page.wait_for_function("+document.getElementById('matrix').dataset.cell > 6")
    cell, x0, y0 = attribute("cell"), attribute("x0"), attribute("y0")
    span = 560 / cell
    assert x0 <= key < x0 + span and y0 <= query < y0 + span, "the strong cell stays in view"

    def pixel(q: int, k: int) -> list[int]:
        x, y = int((k + 0.5 - x0) * cell), int((q + 0.5 - y0) * cell)
        script = f"document.getElementById('matrix').getContext('2d').getImageData({x}, {y}, 1, 1).data"
        return page.evaluate(f"Array.from({script})")

    share = strong["attention"] / largest  # the page colours white → --attention (#1c64f2) by weight / largest
    expected = [255 + (c - 255) * share for c in (0x1C, 0x64, 0xF2)]
    assert np.abs(np.array(pixel(query, key)[:3]) - expected).max() <= 3
    row_keys = set(stored.loc[stored["query_pos"] == query, "key_pos"])
    empty = next(k for k in range(int(x0) + 1, int(x0 + span) - 1) if k not in row_keys)
    assert pixel(query, empty)[:3] == [255, 255, 255]  # a key the run did not store stays white

    page.mouse.move(box["x"] + (key + 0.5 - x0) * cell, box["y"] + (query + 0.5 - y0) * cell)
    assert page.get_attribute("#row-keys", "data-query") == str(query)
    row = stored[stored["query_pos"] == query].set_index("key_pos")["attention"]
    meta, _ = page_data(long_run / "report.html")
    step = largest / 65535 if meta["detail"]["bits"] == 16 else 2 * np.sqrt(largest * row.max()) / 255
    _assert_strongest_keys(_row_keys(loaded), row, step)
    assert_clean(loaded)


def test_hovered_query_lists_its_strongest_keys(report_run: Path, open_report: Any) -> None:
    loaded = open_report(report_run / "report.html")
    page = loaded.page
    loaded.select_doc(1)
    page.click('#grid rect.cell[data-layer="4"][data-head="3"]')
    assert page.get_attribute('#view-switch button[data-view="lines"]', "aria-checked") == "true"  # a short one
    stored = parquet_rows(report_run, [1], layer=4, head=3)
    for query in (0, 5, 9):
        page.hover(f'#view g.tok[data-role="query"][data-pos="{query}"]')
        row = stored[stored["query_pos"] == query].set_index("key_pos")["attention"]
        _assert_strongest_keys(_row_keys(loaded), row, stored["attention"].max() / 65535)
    assert_clean(loaded)


def test_search_filters_the_documents(report_run: Path, open_report: Any) -> None:
    loaded = open_report(report_run / "report.html")
    page = loaded.page
    _, docs = page_data(report_run / "report.html")
    word = "the"
    page.fill("#doc-search", word)
    shown = loaded.rows("#doc-picker option", "[e.textContent]")
    expected = [d["id"] for d in docs if word in d["text"].lower()]
    assert 0 < len(expected) < len(docs), "the word must split the documents for the test to mean anything"
    assert [int(t[0].split(" ")[0][1:]) for t in shown] == expected
    page.fill("#doc-search", "no document holds this")
    assert page.locator("#doc-picker option").count() == 0
    page.fill("#doc-search", "")
    assert page.locator("#doc-picker option").count() == len(docs)
    assert_clean(loaded)


def test_provenance_is_collapsed_and_the_explorer_above_the_fold(report_run: Path, browser: Any) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        page.goto((report_run / "report.html").resolve().as_uri())
        page.wait_for_selector("#view-panel[data-doc]")
        assert page.evaluate("document.getElementById('provenance-details').open") is False
        for element in ("#grid", "#view-panel", "#doc-search"):
            box = page.locator(element).bounding_box()
            assert box is not None and box["y"] < 900 - 100, element
        page.click("#provenance-summary")
        assert page.inner_text("#verification-verdict") == "PASSED"
    finally:
        page.close()


@pytest.fixture(scope="session")
def agreement_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Any, sample_texts: list[str]) -> Path:
    return _cli_run(tmp_path_factory.mktemp("report-agreement"), str(tiny_model_dir("bert")), sample_texts[:3],
                    "--measures", "attention,value_norm,rollout,value_zeroing", "--agreement")


def test_agreement_table_shows_the_parquet_values(agreement_run: Path, open_report: Any) -> None:
    table = pq.read_table(agreement_run / "agreement.parquet").to_pandas()
    versus = table[(table["measure_a"] == "value_zeroing") | (table["measure_b"] == "value_zeroing")]
    assert not versus.empty
    loaded = open_report(agreement_run / "report.html")
    cells = loaded.rows("#agreement td.rho", "[+e.dataset.layer, e.dataset.pair, e.textContent]")
    shown = {(layer, pair): text for layer, pair, text in cells}
    assert len(shown) == len(versus)
    for row in versus.itertuples(index=False):
        other = row.measure_b if row.measure_a == "value_zeroing" else row.measure_a
        text = shown[(int(row.layer), f"value_zeroing · {other}")]
        assert text == ("–" if np.isnan(row.spearman) else f"{row.spearman:.3f}")
    assert "Spearman" in loaded.page.inner_text("#agreement-note")
    assert_clean(loaded)
