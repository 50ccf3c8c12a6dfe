"""Sliding-window attention (Mistral every layer, Qwen2 one layer) in the tables, the per-head metrics, the rank
agreement and the Python API: a row keeps exactly the keys its layer lets it see.

The models are conftest's tiny random-weight rotary decoders (`rotary_loaded`: saved with `save_pretrained`, loaded
through `load_model`), with a window of WINDOW = 4 tokens, shorter than every example sentence. Expected values
come from Hugging Face's own `output_attentions` and from the model's config, never from the code under test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import scipy.stats
import torch
from conftest import EXAMPLE_SENTENCES, WINDOW

from extractor.api import extract
from extractor.attribution.agreement import MeasureAgreement
from extractor.attribution.analysis import BatchAnalysis, analyse_batch
from extractor.core.encode import encode
from extractor.core.models import LoadedModel
from extractor.corpus.tables import batch_association_table, measures_table, padded_positions
from extractor.heads.metrics import HeadStats

MEASURES = ("attention", "value_norm", "rollout")
INDEX = ["doc_id", "layer", "head", "query_pos", "key_pos"]


@dataclass
class WindowedRun:
    """One padded batch of the example sentences through a model, and what Hugging Face says of it."""

    loaded: LoadedModel
    analysis: BatchAnalysis
    attentions: list[torch.Tensor]  # per layer [batch, head, query, key]: Hugging Face's output_attentions
    windows: list[int | None]  # per layer, from the model's config

    @property
    def lengths(self) -> list[int]:
        return self.analysis.batch.lengths


def config_windows(loaded: LoadedModel) -> list[int | None]:
    """Per layer, the sliding window the config asks for: Qwen2 lists its layer types, Mistral windows every layer."""
    config = loaded.model.config
    n_layers = config.num_hidden_layers
    types = getattr(config, "layer_types", None) or ["sliding_attention"] * n_layers
    window = getattr(config, "sliding_window", None)
    return [window if kind == "sliding_attention" else None for kind in types]


def windowed_run(loaded: LoadedModel) -> WindowedRun:
    batch = encode(loaded.tokenizer, EXAMPLE_SENTENCES)
    analysis = analyse_batch(loaded, batch, measures=MEASURES)
    assert analysis.verification is not None and analysis.verification.passed
    with torch.no_grad():
        attentions = list(loaded.model(**batch.model_inputs, output_attentions=True).attentions)
    return WindowedRun(loaded, analysis, attentions, config_windows(loaded))


@pytest.fixture(scope="module", params=["mistral-window", "qwen2-window-layer1"])
def run(request: pytest.FixtureRequest, rotary_loaded) -> WindowedRun:
    result = windowed_run(rotary_loaded(request.param))
    assert any(w is not None for w in result.windows) and min(result.lengths) > WINDOW
    return result


def first_key(q: int, window: int | None) -> int:
    """The first key query q sees: max(0, q − window + 1), written out here apart from the code under test."""
    return 0 if window is None else max(0, q - window + 1)


def cells_hugging_face_shows(run: WindowedRun) -> pd.DataFrame:
    """Every (doc, layer, head, query, key) cell a row sees, with Hugging Face's attention there."""
    records = []
    for layer, (pattern, window) in enumerate(zip(run.attentions, run.windows, strict=True)):
        for b, n in enumerate(run.lengths):
            for head in range(pattern.shape[1]):
                for q in range(n):
                    for k in range(first_key(q, window), q + 1):
                        records.append((b, layer, head, q, k, float(pattern[b, head, q, k])))
    return pd.DataFrame.from_records(records, columns=[*INDEX, "expected"]).sort_values(INDEX, ignore_index=True)


def same_cells(got: pd.DataFrame, expected: pd.DataFrame) -> bool:
    """Whether two frames sorted by INDEX list the same cells (the tables' columns are int16/int32)."""
    return np.array_equal(got[INDEX].to_numpy(np.int64), expected[INDEX].to_numpy(np.int64))


def head_rows(table: pa.Table) -> pd.DataFrame:
    frame = table.to_pandas()
    return frame[frame["head"] >= 0].sort_values(INDEX).reset_index(drop=True)


# --- (1) dense tables hold exactly the visible cells ---------------------------------------------------------


def test_dense_table_holds_exactly_the_cells_each_row_sees(run: WindowedRun) -> None:
    expected = cells_hugging_face_shows(run)
    # Hugging Face's own rows put all their mass on those cells: nothing visible is missing from the list
    assert np.allclose(expected.groupby(INDEX[:4])["expected"].sum(), 1.0, atol=1e-5)
    got = head_rows(batch_association_table(run.analysis, [0, 1, 2], causal=True))
    assert same_cells(got, expected)  # the same cells, no more, no fewer
    np.testing.assert_allclose(got["attention"], expected["expected"], rtol=0, atol=1e-5)
    counts = got.groupby(INDEX[:4]).size().reset_index(name="n")
    window = counts["layer"].map(lambda layer: run.windows[layer] or 10**9)
    assert (counts["n"] == np.minimum(counts["query_pos"] + 1, window)).all()  # min(q + 1, window) keys a row
    earliest = got["query_pos"] - got["layer"].map(lambda layer: run.windows[layer] or 10**9) + 1
    assert (got["key_pos"] >= earliest).all()  # no key before q − window + 1


def test_rollout_rows_keep_every_key_the_layers_reach_together(run: WindowedRun) -> None:
    """Rollout multiplies the layers' patterns, so a row reaches further back than one window: its rows are the
    nonzero cells of a rollout computed here from Hugging Face's attentions, and they keep all of its mass."""
    table = batch_association_table(run.analysis, [0, 1, 2], causal=True).to_pandas()
    layer_rows = table[table["head"] == -1]
    for b, n in enumerate(run.lengths):
        rolled = None
        for layer, pattern in enumerate(run.attentions):
            mixed = 0.5 * pattern[b, :, :n, :n].double().mean(dim=0) + 0.5 * torch.eye(n, dtype=torch.float64)
            mixed = mixed / mixed.sum(dim=-1, keepdim=True)
            rolled = mixed if rolled is None else mixed @ rolled
            got = layer_rows[(layer_rows["doc_id"] == b) & (layer_rows["layer"] == layer)]
            query, key = (rolled > 0).nonzero(as_tuple=True)
            assert sorted(zip(got["query_pos"], got["key_pos"], strict=True)) == sorted(
                zip(query.tolist(), key.tolist(), strict=True)
            ), (b, layer)
            assert np.allclose(got.groupby("query_pos")["rollout"].sum(), 1.0, atol=1e-5)
        if all(w is not None for w in run.windows):  # every layer windowed: the reach is narrower than causal
            assert rolled is not None and bool((rolled == 0).tril().any())


# --- (2) top-k never picks a hidden key -----------------------------------------------------------------------


@pytest.mark.parametrize("k", [WINDOW + 2, 3])
def test_top_k_keeps_only_visible_keys(run: WindowedRun, k: int) -> None:
    got = head_rows(batch_association_table(run.analysis, [0, 1, 2], causal=True, top_k=k))
    expected = cells_hugging_face_shows(run)
    for (b, layer, head, q), row in got.groupby(INDEX[:4]):
        window = run.windows[layer]
        keys = expected[(expected["doc_id"] == b) & (expected["layer"] == layer) & (expected["head"] == head)
                        & (expected["query_pos"] == q)]
        strongest = np.sort(keys["expected"].to_numpy())[::-1][:k]
        assert set(row["key_pos"]) <= set(keys["key_pos"]), (b, layer, head, q)
        assert len(row) == len(strongest) == min(q + 1, window or 10**9, k)
        np.testing.assert_allclose(np.sort(row["attention"].to_numpy())[::-1], strongest, rtol=0, atol=1e-5)
        np.testing.assert_allclose(row["kept_mass"], strongest.sum(), rtol=0, atol=1e-5)
        if window is not None and k >= window:  # the whole window fits in k: every visible key, all the mass
            assert set(row["key_pos"]) == set(keys["key_pos"])
            np.testing.assert_allclose(row["kept_mass"], 1.0, rtol=0, atol=1e-5)


# --- (3) per-head metrics count the keys of the window ----------------------------------------------------------


def reference_head_metrics(run: WindowedRun, windows: list[int | None]) -> dict[str, np.ndarray]:
    """From Hugging Face's attentions, [layer, head] arrays as metrics.py averages them: `entropy_normalised`
    pooled over every row of every document with more than one visible key (and the mean over documents of each
    document's own mean), `first_token` pooled over the rows that see key 0. Entropies are divided by
    ln(min(q + 1, window)) for the `windows` given."""
    n_layers, n_heads = len(run.attentions), run.attentions[0].shape[1]
    pooled, per_doc, first = (np.zeros((n_layers, n_heads)) for _ in range(3))
    for layer, pattern in enumerate(run.attentions):
        for head in range(n_heads):
            values, doc_means, first_weights = [], [], []
            for b, n in enumerate(run.lengths):
                rows = pattern[b, head, :n, :n].double()
                entropy = -(rows * rows.clamp_min(1e-300).log()).sum(dim=-1)  # [query]
                count = [min(q + 1, windows[layer] or 10**9) for q in range(n)]
                mine = [float(entropy[q]) / math.log(count[q]) for q in range(n) if count[q] > 1]
                values += mine
                doc_means.append(np.mean(mine))
                first_weights += [float(rows[q, 0]) for q in range(n) if first_key(q, windows[layer]) == 0]
            pooled[layer, head], per_doc[layer, head] = np.mean(values), np.mean(doc_means)
            first[layer, head] = np.mean(first_weights)
    return {"entropy_normalised": pooled, "entropy_normalised_doc_mean": per_doc, "first_token": first}


def as_grid(table: pd.DataFrame, column: str) -> np.ndarray:
    n_layers, n_heads = int(table["layer"].max()) + 1, int(table["head"].max()) + 1
    return table.sort_values(["layer", "head"])[column].to_numpy().reshape(n_layers, n_heads)


def test_head_metrics_divide_by_the_keys_of_the_window(run: WindowedRun) -> None:
    expected = reference_head_metrics(run, run.windows)
    # the test can tell: ignoring the window (ln(q + 1)) gives clearly other values
    unwindowed = reference_head_metrics(run, [None] * len(run.windows))
    assert np.abs(unwindowed["entropy_normalised"] - expected["entropy_normalised"]).max() > 1e-2
    n_layers, n_heads = expected["first_token"].shape
    batched = HeadStats(n_layers, n_heads, True, None, None)
    batched.update_batch(run.analysis)  # the corpus path: padded batch tensors
    api = extract(EXAMPLE_SENTENCES, model=run.loaded, measures=("attention",))  # per document, as the API does
    for table in (batched.table(), api.heads()):
        for column, values in expected.items():
            np.testing.assert_allclose(as_grid(table, column), values, rtol=1e-5, atol=1e-6, err_msg=column)


# --- the Python API, word level, and the rank agreement -----------------------------------------------------------


def test_word_level_tables_hold_the_words_a_row_sees(run: WindowedRun) -> None:
    """A word sees a key word when one of its pieces sees one of the key word's pieces (from Hugging Face's
    token-level zeros); the API's word-level associations hold exactly those cells, and all of each row's mass."""
    result = extract(EXAMPLE_SENTENCES, model=run.loaded, measures=("attention",), level="word")
    table = result.association_arrow().to_pandas()
    for b, doc in enumerate(run.analysis.batch.docs):
        member = torch.zeros(doc.n_words, doc.n_tokens)
        member[torch.tensor(doc.word_index), torch.arange(doc.n_tokens)] = 1.0  # [word, token]
        for layer, pattern in enumerate(run.attentions):
            sees = (pattern[b, :, : doc.n_tokens, : doc.n_tokens] > 0).any(dim=0).float()  # [query, key] tokens
            query, key = (member @ sees @ member.T > 0).nonzero(as_tuple=True)
            expected = sorted(zip(query.tolist(), key.tolist(), strict=True))
            rows = table[(table["doc_id"] == b) & (table["layer"] == layer)]
            for head in range(pattern.shape[1]):
                got = rows[rows["head"] == head]
                assert sorted(zip(got["query_pos"], got["key_pos"], strict=True)) == expected, (b, layer, head)
                assert np.allclose(got.groupby("query_pos")["attention"].sum(), 1.0, atol=1e-5)
        if run.windows[-1] is not None:
            assert len(expected) < doc.n_words * (doc.n_words + 1) // 2  # the window hides some earlier words


def test_rank_agreement_ranks_only_the_keys_of_the_window(run: WindowedRun) -> None:
    """Spearman's ρ of attention and value_norm per row over the keys both see, against scipy on the window."""
    agreement = MeasureAgreement(causal=True)
    agreement.update_batch(run.analysis)
    table = agreement.table()
    per_layer = run.analysis.per_layer
    for layer, window in enumerate(run.windows):
        rhos = []
        for b, n in enumerate(run.lengths):
            attention = run.attentions[layer][b].double().mean(dim=0)  # [query, key]
            value_norm = per_layer["value_norm"][layer][b].double().mean(dim=0)
            for q in range(n):
                keys = slice(first_key(q, window), q + 1)
                x, y = attention[q, keys].numpy(), value_norm[q, keys].numpy()
                if len(x) > 1 and len(set(x)) > 1 and len(set(y)) > 1:
                    rhos.append(scipy.stats.spearmanr(x, y).statistic)
        got = table[(table["layer"] == layer) & (table["measure_a"] == "attention")
                    & (table["measure_b"] == "value_norm")].iloc[0]
        assert int(got["n_rows"]) == len(rhos)
        assert float(got["spearman"]) == pytest.approx(float(np.mean(rhos)), abs=1e-6)


# --- (4) full attention: the tables as before -----------------------------------------------------------------


def table_without_windows(analysis: BatchAnalysis, **mode) -> pa.Table:
    """The batch's table built with no sliding-window information at all (`measures_table` without first keys)."""
    docs = analysis.batch.docs
    return measures_table(analysis.per_layer, torch.tensor(analysis.batch.lengths),
                          padded_positions([d.positions for d in docs]), torch.arange(len(docs)), True, **mode)


def test_a_model_without_a_window_keeps_every_causal_key(rotary_loaded) -> None:
    """Llama (no window): each causal row keeps keys 0..q, the cells of Hugging Face's causal rows, and every
    storage mode's table equals the one built without window information (the path before windows were carried)."""
    full = windowed_run(rotary_loaded("llama-gqa2"))
    assert full.windows == [None, None] and full.analysis.sliding_windows == [None, None]
    table = batch_association_table(full.analysis, [0, 1, 2], causal=True)
    got = head_rows(table)
    assert same_cells(got, cells_hugging_face_shows(full))
    counts = got.groupby(INDEX[:4]).size().reset_index(name="n")
    assert (counts["n"] == counts["query_pos"] + 1).all()
    for mode in ({}, {"top_k": 3}, {"threshold": 0.05}):
        assert batch_association_table(full.analysis, [0, 1, 2], True, **mode).equals(
            table_without_windows(full.analysis, **mode)), mode
