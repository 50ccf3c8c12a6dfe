"""ALTI, GlobEnc and value zeroing checked against the real model's own intermediate states and interventions.

- the per-source vectors ALTI and GlobEnc decompose sum to the LayerNorm outputs that hooks record;
- value zeroing in a batch equals a loop that zeroes one value vector with a hook on the model's value
  projection and re-runs the whole model; its small distances agree with a float64 run of the model;
- invariants (rows sum to 1, non-negative, 0 on padding and on the causal future), refusals, agreement.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from conftest import FAMILIES

from extractor.attribution.agreement import agreement_frame, agreement_sums, average_ranks, row_spearman
from extractor.attribution.analysis import analyse_batch
from extractor.attribution.decompose import NormParams, attention_block_vectors, linear_norm, norm_scale
from extractor.attribution.layer_pass import visibility
from extractor.attribution.replay import ZeroedValueLayer, record_layers
from extractor.attribution.rollout import chain
from extractor.attribution.value_zeroing import zeroing_distances
from extractor.core.adapters import adapter_for
from extractor.core.encode import encode
from extractor.core.models import LoadedModel
from extractor.corpus.config import RunConfig
from extractor.errors import UserError

SHORT = ["I love pets, especially cats.", "The animal was tired."]


def get_model(which: str, minilm: LoadedModel, tiny_loaded: Callable[..., LoadedModel],
              rotary_loaded: Callable[[str], LoadedModel] | None = None) -> LoadedModel:
    if which in FAMILIES:
        assert rotary_loaded is not None
        return rotary_loaded(which)
    return minilm if which == "minilm" else tiny_loaded(which)


def layer_parts(loaded: LoadedModel, layer: int) -> tuple:
    """(value linear, output linear, attention LayerNorm, output LayerNorm) read from the modules, not the adapter."""
    if loaded.provenance["model_type"] == "distilbert":
        block = loaded.model.transformer.layer[layer]
        return block.attention.v_lin, block.attention.out_lin, block.sa_layer_norm, block.output_layer_norm
    block = loaded.model.encoder.layer[layer]
    return block.attention.self.value, block.attention.output.dense, block.attention.output.LayerNorm, block.output.LayerNorm


def hooked_states(loaded: LoadedModel, model_inputs: dict, norms: list) -> tuple[list, dict]:
    """Hugging Face's hidden states and attentions, and each LayerNorm's real input and output (by hooks)."""
    seen: dict = {}
    handles = [n.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0], o))) for n in norms]
    try:
        with torch.no_grad():
            out = loaded.model(**model_inputs, output_hidden_states=True, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    return [out.hidden_states, out.attentions], seen


def f_from_modules(x: torch.Tensor, value, dense, n_heads: int) -> torch.Tensor:
    """f_h(x_j) = value(x_j)_h · W_O^h from the nn.Linear modules: [batch, head, key, d_model]."""
    v = value(x)  # [batch, key, head·d_head]
    d_head = v.shape[-1] // n_heads
    W = dense.weight.T  # [head·d_head, d_model]
    return torch.stack([v[..., h * d_head:(h + 1) * d_head] @ W[h * d_head:(h + 1) * d_head] for h in range(n_heads)], 1)


def lin(u: torch.Tensor, norm, sigma: torch.Tensor) -> torch.Tensor:
    """A LayerNorm's linear part with σ fixed: u [batch, query, d_model], sigma [batch, query]."""
    return (u - u.mean(-1, keepdim=True)) * norm.weight / sigma[..., None]


@pytest.mark.parametrize("which", ["minilm", "bert", "distilbert"])
def test_decomposed_vectors_sum_to_the_models_layernorm_outputs(which: str, minilm, tiny_loaded) -> None:
    loaded = get_model(which, minilm, tiny_loaded)
    batch = encode(loaded.tokenizer, SHORT)
    n_layers, n_heads = loaded.provenance["n_layers"], loaded.provenance["n_heads"]
    parts = [layer_parts(loaded, layer) for layer in range(n_layers)]
    (hidden, attentions), seen = hooked_states(loaded, batch.model_inputs, [p[k] for p in parts for k in (2, 3)])
    real = batch.attention_mask.bool()
    analysis = analyse_batch(loaded, batch, measures=("alti", "globenc"), verify=False)
    for layer, (value, dense, ln1, ln2) in enumerate(parts):
        with torch.no_grad():
            x, pattern = hidden[layer], attentions[layer]
            f = f_from_modules(x, value, dense, n_heads)
            (ln1_in, ln1_out), (ln2_in, ln2_out) = seen[ln1], seen[ln2]
            sigma1 = norm_scale(ln1_in, ln1.eps)  # [batch, query], from the hooked input
            T = attention_block_vectors(pattern, f, x, NormParams.of(ln1), sigma1, slice(0, x.shape[1]))
            # ALTI: Σ_j T_i(x_j) + L1(b_O) + β1 = the attention LayerNorm's real output.
            rebuilt = T.sum(dim=1) + lin(dense.bias.expand_as(x), ln1, sigma1) + ln1.bias
            torch.testing.assert_close(rebuilt[real], ln1_out[real], rtol=0, atol=1e-5)
            # GlobEnc: Σ_j L2(T_i(x_j)) + L2(L1(b_O) + β1) + L2(FFN_i) + β2 = the output LayerNorm's real output.
            sigma2 = norm_scale(ln2_in, ln2.eps)
            G = linear_norm(T, ln2.weight, sigma2)  # [batch, key, query, d_model]
            ffn = ln2_in - ln1_out
            rest = lin(lin(dense.bias.expand_as(x), ln1, sigma1) + ln1.bias, ln2, sigma2) + lin(ffn, ln2, sigma2)
            torch.testing.assert_close((G.sum(dim=1) + rest + ln2.bias)[real], ln2_out[real], rtol=0, atol=1e-5)
            # Layer 0 of the stored (rolled-out) measures is the layer's own matrix: check it cell by cell.
            y = ln1_out
            for b, doc in enumerate(batch.docs):
                n = doc.n_tokens
                c = (y[b, None, :n].abs().sum(-1) - (T[b, :n, :n] - y[b, None, :n]).abs().sum(-1)).clamp_min(0).T
                N = G[b, :n, :n].norm(dim=-1).T  # [query, key]
                if layer == 0:
                    got = analysis.docs[b].layer_measures
                    torch.testing.assert_close(got["alti"][0], c / c.sum(-1, keepdim=True), rtol=1e-4, atol=1e-6)
                    torch.testing.assert_close(got["globenc"][0], N / N.sum(-1, keepdim=True), rtol=1e-4, atol=1e-6)


def test_decomposition_fails_when_the_layernorm_gain_is_wrong(tiny_loaded) -> None:
    """Negative control: the sum check above detects a LayerNorm read with the wrong gain."""
    loaded = tiny_loaded("bert")
    batch = encode(loaded.tokenizer, SHORT[:1])
    value, dense, ln1, _ = layer_parts(loaded, 0)
    (hidden, attentions), seen = hooked_states(loaded, batch.model_inputs, [ln1])
    with torch.no_grad():
        x = hidden[0]
        sigma = norm_scale(seen[ln1][0], ln1.eps)
        wrong = NormParams(gamma=ln1.weight.flip(0), beta=ln1.bias, eps=ln1.eps)
        T = attention_block_vectors(attentions[0], f_from_modules(x, value, dense, 4), x, wrong, sigma, slice(0, x.shape[1]))
        rebuilt = T.sum(dim=1) + lin(dense.bias.expand_as(x), ln1, sigma) + ln1.bias
    assert (rebuilt - seen[ln1][1]).abs().max() > 1e-2


def value_projection_hook(loaded: LoadedModel, layer: int, key: int):
    """Zero key `key`'s value vector (all heads) at the real model's value projection of `layer`."""
    family = loaded.provenance["model_type"]
    if family == "gpt2":
        d = loaded.model.config.n_embd
        module, cols = loaded.model.h[layer].attn.c_attn, slice(2 * d, 3 * d)
    elif family == "gpt_neox":  # fused and interleaved per head: [head, q|k|v, d_head]
        module = loaded.model.layers[layer].attention.query_key_value
        heads, d_head = loaded.model.config.num_attention_heads, loaded.model.config.hidden_size // loaded.model.config.num_attention_heads
        cols = [h * 3 * d_head + 2 * d_head + i for h in range(heads) for i in range(d_head)]
    elif family in ("llama", "mistral", "qwen2", "qwen3"):
        module, cols = loaded.model.layers[layer].self_attn.v_proj, slice(None)
    else:
        module, cols = layer_parts(loaded, layer)[0], slice(None)

    def hook(m, args, output):
        output = output.clone()
        output[:, key, cols] = 0
        return output

    return module.register_forward_hook(hook)


def layer_outputs(loaded: LoadedModel, model_inputs: dict) -> list[torch.Tensor]:
    outputs: list = []
    handles = [m.register_forward_hook(lambda mod, a, o: outputs.append(o if isinstance(o, torch.Tensor) else o[0]))
               for m in loaded.adapter.layer_modules()]
    try:
        with torch.no_grad():
            loaded.model(**model_inputs)
    finally:
        for h in handles:
            h.remove()
    return outputs


@pytest.mark.parametrize("which", ["bert", "distilbert", "gpt2", "minilm", "llama-gqa2", "mistral-window",
                                   "gpt_neox-rotary_pct"])
def test_value_zeroing_equals_a_hooked_loop_over_keys(which: str, minilm, tiny_loaded, rotary_loaded) -> None:
    loaded = get_model(which, minilm, tiny_loaded, rotary_loaded)
    texts = ["I love pets."] if which == "minilm" else SHORT  # tiny models: a padded batch of two
    batch = encode(loaded.tokenizer, texts)
    got = analyse_batch(loaded, batch, measures=("value_zeroing",), verify=False).docs
    original = layer_outputs(loaded, batch.model_inputs)
    for b, doc in enumerate(batch.docs):
        n = doc.n_tokens
        inputs = {k: v[b : b + 1, :n] for k, v in batch.model_inputs.items()}
        for layer in range(loaded.adapter.n_layers):
            expected = torch.zeros(n, n, dtype=torch.float64)
            for key in range(n):
                handle = value_projection_hook(loaded, layer, key)
                try:
                    altered = layer_outputs(loaded, inputs)[layer][0]  # [query, d_model]
                finally:
                    handle.remove()
                cos = torch.nn.functional.cosine_similarity(altered.double(), original[layer][b, :n].double(), dim=-1)
                expected[:, key] = 1 - cos
            if loaded.adapter.causal:
                expected = expected.tril()
            expected /= expected.sum(-1, keepdim=True)
            torch.testing.assert_close(got[b].layer_measures["value_zeroing"][layer].double(), expected, rtol=0, atol=1e-5)


def raw_distances(loaded: LoadedModel, batch) -> list[torch.Tensor]:
    """Per layer the un-normalised d_ij of value zeroing, through the code under test."""
    with torch.no_grad():
        with record_layers(loaded.adapter, calls=True, output_norm_inputs=False) as rec:
            loaded.model(**batch.model_inputs)
        return [zeroing_distances(ZeroedValueLayer(loaded.adapter, layer, call), out, out.shape[1])
                for layer, (call, out) in enumerate(zip(rec.calls, rec.outputs, strict=True))]


def test_value_zeroing_small_distances_match_float64(minilm: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Distances of 1e-8..1e-5 (keys no head attends to) agree with float64 to 1e-3 relative; float32 `1 − cos`,
    the negative control, is off by more than 5 % there."""
    batch = encode(minilm.tokenizer, SHORT)
    model64 = copy.deepcopy(minilm.model).double()
    loaded64 = LoadedModel(model=model64, tokenizer=minilm.tokenizer, adapter=adapter_for(model64))
    d32, d64 = torch.stack(raw_distances(minilm, batch)), torch.stack(raw_distances(loaded64, batch))
    assert d32.dtype == torch.float32 and d64.dtype == torch.float64
    visible = visibility(batch.attention_mask, causal=False)[None].expand_as(d64)
    small = visible & (d64 < 1e-5) & (d64 > 1e-10)
    assert int(small.sum()) >= 5, "expected some tiny distances in MiniLM"
    relative = ((d32.double() - d64).abs() / d64)[small]
    assert float(relative.max()) < 1e-3, float(relative.max())
    torch.testing.assert_close(d32.double()[visible], d64[visible], rtol=0, atol=1e-6)
    naive = lambda a, b: 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)  # noqa: E731
    monkeypatch.setattr("extractor.attribution.value_zeroing.cosine_distance", naive)
    naive32 = torch.stack(raw_distances(minilm, batch))
    assert float(((naive32.double() - d64).abs() / d64)[small].max()) > 0.05


def test_measures_are_row_stochastic_and_zero_off_the_visible_keys(minilm, tiny_loaded) -> None:
    for loaded, measures in ((tiny_loaded("bert"), ("alti", "globenc", "alti_layer", "value_zeroing")), (tiny_loaded("gpt2"), ("value_zeroing",))):
        batch = encode(loaded.tokenizer, SHORT)
        analysis = analyse_batch(loaded, batch, measures=measures)
        visible = visibility(batch.attention_mask, loaded.adapter.causal)
        lengths = batch.attention_mask.sum(-1)
        for name in measures:
            for layer, m in enumerate(analysis.per_layer[name]):
                assert m.shape == visible.shape, (name, layer)
                assert (m >= 0).all() and (m[~visible] == 0).all(), (name, layer)
                sums = m.sum(-1)  # [batch, query]
                for b, n in enumerate(lengths.tolist()):
                    torch.testing.assert_close(sums[b, :n], torch.ones(n), rtol=0, atol=1e-5)
            assert len(analysis.docs[0].layer_measures[name]) == loaded.adapter.n_layers


@pytest.mark.parametrize("which", ["minilm", "distilbert"])
def test_per_layer_alti_and_globenc_roll_out_to_the_stored_measures(which: str, minilm, tiny_loaded) -> None:
    """alti_layer (C_l) and globenc_layer (N_l) are the matrices before rollout: their plain product in the
    papers' order, R_l = M_l · … · M_0, rows normalised, is the stored rolled-out alti / globenc. C_l's rows sum
    to 1; N_l holds raw norms (its rows do not), which the rollout multiplies before normalising."""
    loaded = get_model(which, minilm, tiny_loaded)
    batch = encode(loaded.tokenizer, SHORT)  # padded
    docs = analyse_batch(loaded, batch, measures=("alti", "globenc", "alti_layer", "globenc_layer")).docs
    for doc in docs:
        for per_layer, rolled in (("alti_layer", "alti"), ("globenc_layer", "globenc")):
            matrices = doc.layer_measures[per_layer].double()  # [layer, query, key]
            product = matrices[0]
            for layer in range(len(matrices)):
                if layer:
                    product = matrices[layer] @ product
                expected = product / product.sum(-1, keepdim=True)
                torch.testing.assert_close(doc.layer_measures[rolled][layer].double(), expected, rtol=0, atol=1e-5)
        n = doc.doc.n_tokens
        torch.testing.assert_close(doc.layer_measures["alti_layer"].sum(-1), torch.ones(len(matrices), n), rtol=0, atol=1e-5)
        globenc_sums = doc.layer_measures["globenc_layer"].sum(-1)  # [layer, query]
        assert (globenc_sums - 1).abs().max() > 0.5, "globenc_layer should hold raw norms"


def test_post_norm_measures_refuse_gpt2(tiny_loaded) -> None:
    loaded = tiny_loaded("gpt2")
    batch = encode(loaded.tokenizer, SHORT[:1])
    for name in ("alti", "globenc", "alti_layer", "globenc_layer"):
        with pytest.raises(UserError, match=rf"measure '{name}' is not available for gpt2 models: .*LayerNorm"):
            analyse_batch(loaded, batch, measures=(name,))


def test_config_and_default_measures() -> None:
    names = ["alti", "globenc", "alti_layer", "globenc_layer", "value_zeroing"]
    assert RunConfig(measures=names).measures == names
    from extractor.attribution.measures import DEFAULT_MEASURES, RUN_MEASURES

    assert not set(names) & {*DEFAULT_MEASURES, *RUN_MEASURES}


def test_chain_equals_the_normalised_plain_product() -> None:
    matrices = [torch.rand(2, 5, 5, dtype=torch.float64) * 40 for _ in range(12)]  # unnormalised, like GlobEnc's norms
    rolled = matrices[0]
    for layer, got in enumerate(chain(matrices)):
        if layer:
            rolled = matrices[layer] @ rolled
        torch.testing.assert_close(got, rolled / rolled.sum(-1, keepdim=True))


def test_row_spearman_matches_scipy_with_ties_and_hidden_keys() -> None:
    a = torch.randint(0, 4, (3, 6, 6)).float()  # many ties
    b = torch.rand(3, 6, 6)
    b[0, 1] = 0.5  # a constant row: undefined
    visible = torch.ones(3, 6, 6, dtype=torch.bool).tril()  # causal: row i sees keys ≤ i
    rho, defined = row_spearman(a, b, visible)
    for row in range(18):
        i, q = divmod(row, 6)
        x, y = a[i, q, : q + 1].numpy(), b[i, q, : q + 1].numpy()
        if q == 0 or len(set(x)) == 1 or len(set(y)) == 1:
            assert not defined[row]
            continue
        assert defined[row]
        assert abs(float(rho[row]) - scipy.stats.spearmanr(x, y).statistic) < 1e-9
    ranks = average_ranks(torch.tensor([[3.0, 1.0, 3.0, 2.0]]), torch.ones(1, 4, dtype=torch.bool))
    assert ranks.tolist() == [[3.5, 1.0, 3.5, 2.0]]


def test_agreement_table_of_a_measure_with_itself_is_one(minilm: LoadedModel) -> None:
    batch = encode(minilm.tokenizer, SHORT)
    analysis = analyse_batch(minilm, batch, measures=("attention", "rollout"), verify=False)
    per_layer = {**analysis.per_layer, "copy": [m.mean(dim=1) for m in analysis.per_layer["attention"]]}
    table = agreement_frame(agreement_sums(per_layer, visibility(batch.attention_mask, False)))
    assert list(table.columns) == ["layer", "measure_a", "measure_b", "spearman", "n_rows"]
    assert len(table) == 6 * 3
    same = table[(table.measure_a == "attention") & (table.measure_b == "copy")]
    assert (same.spearman - 1).abs().max() < 1e-9
    assert (same.n_rows == sum(d.n_tokens for d in batch.docs)).all()


def test_a_run_with_agreement_writes_the_same_table_as_the_api(tiny_model_dir, tiny_loaded, tmp_path) -> None:
    """`agreement: true` accumulates the rank agreement batch by batch over a run's parts; it equals
    `agreement_table` over the same texts in one go, and `extractor query` reads it."""
    from typer.testing import CliRunner

    from extractor.attribution.agreement import agreement_table
    from extractor.cli import app

    texts = ["I love pets, especially cats.", "The animal didn't cross the street because it was too tired.",
             "Cats sleep.", "The street was empty because it rained all day."]
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"{t}\n" for t in texts))
    out = tmp_path / "out"
    measures = "attention,value_norm,rollout,value_zeroing"
    result = CliRunner().invoke(app, ["run", "--model", str(tiny_model_dir("bert")), "-i", str(corpus), "-o", str(out),
                                      "--measures", measures, "--agreement", "--batch-size", "2", "--quiet",
                                      "--no-plots", "--no-report"])
    assert result.exit_code == 0, result.output
    stored = pd.read_parquet(out / "agreement.parquet").sort_values(["layer", "measure_a", "measure_b"])
    direct = agreement_table(tiny_loaded("bert"), texts, measures.split(",")).sort_values(["layer", "measure_a", "measure_b"])
    assert len(stored) == 2 * 6  # 2 layers × 6 pairs of 4 measures
    np.testing.assert_array_equal(stored["n_rows"].to_numpy(), direct["n_rows"].to_numpy())
    np.testing.assert_allclose(stored["spearman"].to_numpy(), direct["spearman"].to_numpy(), rtol=1e-12)
    query = CliRunner().invoke(app, ["query", str(out), "SELECT count(*) AS n FROM agreement", "--format", "csv"])
    assert query.exit_code == 0 and query.output.split() == ["n", "12"]
