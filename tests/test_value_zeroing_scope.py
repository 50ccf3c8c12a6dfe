"""Value zeroing restricted to some layers and some documents (`value_zeroing_layers`, `value_zeroing_every`).

- the restricted rows equal a full run's rows for the same layers and documents (encoder, GPT-2, a rotary
  decoder with grouped-query attention: the sub-batch carries its masks and position embeddings along);
- skipped layers and documents are not re-run: a counter on the real layer modules sees no replay for them;
- in a run: value_zeroing is null (not 0) where it was not computed, and rows are absent where it is the only
  layer measure; agreement averages only over the documents and layers where it was computed;
- a layer the model does not have is one line naming the key, before anything is written; `--resume`
  refuses a changed setting.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from extractor.api import ArgumentError, extract
from extractor.attribution.agreement import agreement_table
from extractor.attribution.analysis import analyse_batch
from extractor.attribution.layer_pass import ZeroingScope, computed_documents
from extractor.cli import app
from extractor.core.encode import encode
from extractor.core.models import LoadedModel
from extractor.corpus.config import RunConfig
from extractor.corpus.manifest import check_resumable
from extractor.corpus.run_folder import open_run
from extractor.errors import UserError

TEXTS = ["I love pets, especially cats.", "The animal was tired.", "Cats sleep all day long in the warm sun.",
         "The street was empty because it rained all day."]
KEYS = ["doc_id", "layer", "head", "query_pos", "key_pos"]


def get_model(which: str, minilm: LoadedModel, tiny_loaded: Callable[..., LoadedModel],
              rotary_loaded: Callable[[str], LoadedModel]) -> LoadedModel:
    if which == "minilm":
        return minilm
    return rotary_loaded(which) if which == "llama-gqa2" else tiny_loaded(which)


@pytest.mark.parametrize("which", ["minilm", "gpt2", "llama-gqa2"])
def test_restricted_value_zeroing_equals_the_full_runs_rows(which: str, minilm, tiny_loaded, rotary_loaded) -> None:
    loaded = get_model(which, minilm, tiny_loaded, rotary_loaded)
    batch = encode(loaded.tokenizer, TEXTS[:3])  # padded to different lengths
    n_layers = loaded.adapter.n_layers
    layers = {n_layers - 1} if n_layers < 3 else {1, n_layers - 1}
    chosen = [False, True, True]
    full = analyse_batch(loaded, batch, ("value_zeroing",), verify=False).per_layer["value_zeroing"]
    part = analyse_batch(loaded, batch, ("value_zeroing",), verify=False,
                         zeroing=ZeroingScope(layers=layers, documents=chosen)).per_layer["value_zeroing"]
    for layer in range(n_layers):
        if layer in layers:
            torch.testing.assert_close(part[layer][1:], full[layer][1:], rtol=0, atol=1e-6)
            assert part[layer][0].isnan().all()
            assert computed_documents(part[layer]).tolist() == chosen
        else:
            assert part[layer].isnan().all(), layer
            assert not computed_documents(part[layer]).any()
        assert not computed_documents(full[layer]).logical_not().any()


@contextmanager
def layer_call_rows(loaded: LoadedModel) -> Iterator[list[list[int]]]:
    """Per layer, the batch size of every call of the real layer module (the forward pass and each replay)."""
    rows: list[list[int]] = [[] for _ in range(loaded.adapter.n_layers)]

    def hook(layer: int):
        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rows[layer].append(int(hidden.shape[0]))
        return record

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, m in enumerate(loaded.adapter.layer_modules())]
    try:
        yield rows
    finally:
        for handle in handles:
            handle.remove()


def test_skipped_layers_and_documents_are_not_rerun(minilm: LoadedModel) -> None:
    """A counter on the real layer modules: a skipped layer runs once (the forward pass); a chosen layer is
    re-run on copies of the chosen documents only, n copies of each (one per key of the padded batch)."""
    batch = encode(minilm.tokenizer, TEXTS[:3])
    n = batch.attention_mask.shape[1]
    scopes = {
        "every": (ZeroingScope(), {0, 1, 2, 3, 4, 5}, 3),
        "two layers, one document": (ZeroingScope(layers={2, 4}, documents=[False, True, False]), {2, 4}, 1),
        "no document": (ZeroingScope(documents=[False, False, False]), set(), 0),
        "no layer of the model": (ZeroingScope(layers=set()), set(), 0),
    }
    for name, (scope, rerun, docs) in scopes.items():
        with layer_call_rows(minilm) as rows:
            analyse_batch(minilm, batch, ("attention", "value_zeroing"), verify=False, zeroing=scope)
        for layer, calls in enumerate(rows):
            assert calls[0] == 3, (name, layer)  # the forward pass: the whole batch
            replayed = sum(calls[1:])
            assert replayed == (n * docs if layer in rerun else 0), (name, layer, calls)


def test_extract_takes_value_zeroing_layers(minilm: LoadedModel) -> None:
    full = extract(TEXTS[:2], model=minilm, measures="attention,value_zeroing", verify=False)
    some = extract(TEXTS[:2], model=minilm, measures="attention,value_zeroing", verify=False,
                   value_zeroing_layers=[0, 5])
    for doc in range(2):
        got, expected = some.tensor(doc, "value_zeroing"), full.tensor(doc, "value_zeroing")  # [layer, query, key]
        torch.testing.assert_close(got[[0, 5]], expected[[0, 5]], rtol=0, atol=1e-6)
        assert got[1:5].isnan().all()
    rows = some.associations()
    assert sorted(rows.loc[rows["head"] == -1, "layer"].unique().tolist()) == [0, 5]  # absent, not zero
    with pytest.raises(ArgumentError, match=r"value_zeroing_layers=\[0, 6\] names layer\(s\) 6, which this model "
                                            r"does not have: it has 6 layers, 0 to 5"):
        extract(TEXTS[:1], model=minilm, measures="value_zeroing", value_zeroing_layers=[0, 6])
    with pytest.raises(ArgumentError, match="value_zeroing_layers="):
        extract(TEXTS[:1], model=minilm, measures="value_zeroing", value_zeroing_layers=[])


# -- runs -------------------------------------------------------------------------------------------------


def run(model: str, corpus: Path, out: Path, *flags: str) -> None:
    result = CliRunner().invoke(app, ["run", "--model", model, "-i", str(corpus), "-o", str(out), "--quiet",
                                      "--no-plots", "--no-report", "--batch-size", "3", *flags])
    assert result.exit_code == 0, (result.output, result.exception)


def associations(out: Path) -> pd.DataFrame:
    """Every association row, through the `associations` view users query (dense runs store matrices)."""
    return open_run(out).sql("SELECT * FROM associations").df().sort_values(KEYS).reset_index(drop=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vz-corpus") / "c.txt"
    path.write_text("".join(f"{t}\n" for t in TEXTS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Callable[..., Path]) -> str:
    """The tiny random BERT (2 layers × 4 heads)."""
    return str(tiny_model_dir("bert"))


def test_run_leaves_out_what_value_zeroing_skipped(tiny: str, corpus: Path, tmp_path: Path) -> None:
    """Layer 1 of 2 and every 2nd document: value_zeroing equals the full run's there and is null elsewhere
    (rollout rows stay); with no other layer measure, the skipped rows are not written at all."""
    measures = ["--measures", "attention,rollout,value_zeroing", "--storage", "dense"]
    run(tiny, corpus, tmp_path / "full", *measures)
    run(tiny, corpus, tmp_path / "some", *measures, "--value-zeroing-layers", "1", "--value-zeroing-every", "2")
    full, some = associations(tmp_path / "full"), associations(tmp_path / "some")
    pd.testing.assert_frame_equal(full[KEYS], some[KEYS])
    np.testing.assert_array_equal(full["rollout"].to_numpy(), some["rollout"].to_numpy())
    chosen = (some["head"] == -1) & (some["layer"] == 1) & (some["doc_id"] % 2 == 0)
    assert chosen.sum() > 0 and (~chosen & (some["head"] == -1)).sum() > 0
    assert some.loc[chosen, "value_zeroing"].notna().all()
    assert some.loc[~chosen, "value_zeroing"].isna().all()  # not 0
    nulls = open_run(tmp_path / "some").sql("SELECT count(*) FROM associations WHERE value_zeroing IS NULL")
    assert nulls.fetchall()[0][0] == (~chosen).sum()  # null, not NaN
    np.testing.assert_array_equal(some.loc[chosen, "value_zeroing"].to_numpy(),
                                  full.loc[chosen, "value_zeroing"].to_numpy())
    manifest = json.loads((tmp_path / "some" / "manifest.json").read_text())
    assert (manifest["config"]["value_zeroing_layers"], manifest["config"]["value_zeroing_every"]) == ([1], 2)

    run(tiny, corpus, tmp_path / "alone", "--measures", "attention,value_zeroing", "--value-zeroing-layers", "1",
        "--value-zeroing-every", "2")
    alone = associations(tmp_path / "alone")
    layer_rows = alone[alone["head"] == -1]
    assert sorted(layer_rows["layer"].unique()) == [1] and sorted(layer_rows["doc_id"].unique()) == [0, 2]
    assert layer_rows["value_zeroing"].notna().all()


def test_agreement_averages_only_where_value_zeroing_was_computed(tiny: str, tiny_loaded, corpus: Path,
                                                                   tmp_path: Path) -> None:
    """The run's agreement with value_zeroing on layer 1 and documents 0, 2 equals the agreement of a full
    computation over documents 0 and 2 alone; layer 0 has no value_zeroing pair; the other pairs keep every
    document."""
    measures = "attention,rollout,value_zeroing"
    run(tiny, corpus, tmp_path / "out", "--measures", measures, "--agreement", "--value-zeroing-layers", "1",
        "--value-zeroing-every", "2")
    stored = pd.read_parquet(tmp_path / "out" / "agreement.parquet").set_index(["layer", "measure_a", "measure_b"])
    loaded = tiny_loaded("bert")
    even = agreement_table(loaded, TEXTS[0::2], measures.split(",")).set_index(["layer", "measure_a", "measure_b"])
    every = agreement_table(loaded, TEXTS, measures.split(",")).set_index(["layer", "measure_a", "measure_b"])
    with_vz = [key for key in stored.index if "value_zeroing" in key]
    assert sorted(with_vz) == [(1, "attention", "value_zeroing"), (1, "rollout", "value_zeroing")]
    for key in with_vz:
        assert stored.loc[key, "n_rows"] == even.loc[key, "n_rows"] < every.loc[key, "n_rows"]
        assert stored.loc[key, "spearman"] == pytest.approx(even.loc[key, "spearman"], rel=1e-9)
    for layer in (0, 1):
        key = (layer, "attention", "rollout")
        assert stored.loc[key, "n_rows"] == every.loc[key, "n_rows"]


def test_a_layer_the_model_lacks_is_one_line_before_anything_is_written(tiny: str, corpus: Path,
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "--model", tiny, "-i", str(corpus), "-o", str(out),
                                      "--measures", "value_zeroing", "--value-zeroing-layers", "0,2,5"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: value_zeroing_layers: 2, 5 out of range; model '{tiny}' has 2 layers, 0 to 1"]
    run(tiny, corpus, out, "--measures", "value_zeroing", "--value-zeroing-layers", "0,1")  # no --overwrite needed


def test_value_zeroing_settings_are_validated_and_resume_keeps_them() -> None:
    config = RunConfig(value_zeroing_layers="3, 0,3", value_zeroing_every=4)
    assert config.value_zeroing_layers == [0, 3]
    for bad in ({"value_zeroing_layers": [-1]}, {"value_zeroing_layers": []}, {"value_zeroing_every": 0}):
        with pytest.raises(ValueError):
            RunConfig(**bad)
    previous = {"config": RunConfig().model_dump()}
    check_resumable(previous, RunConfig())
    for changed in ({"value_zeroing_layers": [1]}, {"value_zeroing_every": 3}):
        key = next(iter(changed))
        with pytest.raises(UserError, match=rf"cannot resume .* different settings: {key} "):
            check_resumable(previous, RunConfig(**changed))
    # a run started before these settings existed had their defaults
    older = {"config": {k: v for k, v in previous["config"].items() if not k.startswith("value_zeroing")}}
    check_resumable(older, RunConfig())
    with pytest.raises(UserError, match="value_zeroing_every"):
        check_resumable(older, RunConfig(value_zeroing_every=2))
