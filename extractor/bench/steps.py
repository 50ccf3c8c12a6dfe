"""Where the time goes: each step of `extractor run` timed alone on one batch, beside the model's forward pass.

    python -m extractor.bench --steps-only

On one batch as `extractor run` plans it (length bucketing, the token and attention budgets), each step is run
`repeats` times after a warm-up and its median wall time reported, in ms per batch and as a share of the
Hugging Face forward pass (b). The steps add up to what one topk batch costs; the benchmark's cases measure the
same thing end to end.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

STEPS = {
    "forward": "(b) HF forward, eager, output_attentions (to NumPy)",
    "capture": "eager forward with the capture hooks (a batch compared with eager)",
    "verify": "recompute Q, K, V, Q·Kᵀ, masks, softmax, z from the weights; compare every head (eager batches)",
    "capture_sdpa": "sdpa forward recording q, k, v (a probed batch)",
    "pattern": "the pattern from the kernel's q and k (Q·Kᵀ, mask, softmax), once",
    "probes": "probe q, k, v against the weights and the pattern against the kernel's z",
    "measures": "the run's default measures from the pattern and V (attention, value_norm, rollout)",
    "heads": "per-head metrics (heads.parquet)",
    "similarity": "head similarity (4 rows per document)",
    "topk_table": "top-k association table (k = 8)",
    "topk_write": "write the top-k Parquet part (background thread in a run)",
    "dense_table": "dense matrices table (float16, one row per document, layer and head)",
    "dense_write": "write the dense Parquet part",
}


# What one probed top-k batch of a run costs, step by step; and the part of it no run with verification can skip:
# the forward pass, the pattern (the product) and the probes that check it. The floor's ratio to (b) is what a run
# that verifies every batch cannot beat on this machine with these kernels, with no table, metric or byte written.
PROBED_TOPK_BATCH = ("capture_sdpa", "pattern", "probes", "measures", "heads", "similarity", "topk_table", "topk_write")
VERIFIED_FLOOR = ("capture_sdpa", "pattern", "probes")
FLOOR_LABEL = "sdpa forward, pattern, probes: nothing else"


def median_ms(step: Callable[[], Any], repeats: int) -> float:
    """Median ms of `repeats` timed calls after an untimed warm-up. Results are dropped at once, as a run drops
    a batch's tensors before the next: holding them would time the allocator, not the step."""
    step()  # warm-up: first-call allocations and lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def profile_batch(model: str, texts: list[str], max_length: int, repeats: int = 3) -> dict[str, Any]:
    """Time every step on a batch `extractor run` would form from `texts` (the middle of the length range); ms."""
    from extractor.attribution.analysis import analyse_batch
    from extractor.attribution.measures import REGISTRY
    from extractor.attribution.registry import LayerInputs
    from extractor.core.capture import run_with_capture
    from extractor.core.encode import collate
    from extractor.core.models import load_model
    from extractor.core.probes import projection_errors, z_probe_errors
    from extractor.core.recompute import attention_pattern, layer_masks, per_query_head, recompute_attention
    from extractor.core.verify import layer_errors
    from extractor.corpus.batching import plan_batches
    from extractor.corpus.config import RunConfig
    from extractor.corpus.extraction import DENSE_ATTENTION_BUDGET, corpus_statistics, prepare_documents
    from extractor.corpus.matrices import matrices_table
    from extractor.corpus.readers import SourceRecord
    from extractor.corpus.storage import write_associations
    from extractor.corpus.tables import batch_association_table, batch_inputs

    torch.set_grad_enabled(False)
    loaded = load_model(model)
    config = RunConfig(model=model, max_length=max_length, plots=False, report=False)
    records = [SourceRecord(doc_id=i, source="bench", line=i + 1, text=t) for i, t in enumerate(texts)]
    documents = prepare_documents(records, loaded, config)

    def middle_batch(attention_budget: int) -> tuple[Any, list[int]]:
        """The batch in the middle of the length range, and its doc_ids (reading order, as a run has them)."""
        plan = plan_batches([[u.n_tokens for u in d.units] for d in documents], config.token_budget,
                            config.batch_size, True, attention_budget)
        group = plan[len(plan) // 2]
        batch = collate([documents[g].units[0] for g in group], loaded.tokenizer.pad_token_id)
        return batch, [documents[g].record.doc_id for g in group]

    batch, ids = middle_batch(config.attention_budget)
    dense_batch, dense_ids = middle_batch(DENSE_ATTENTION_BUDGET)
    causal = loaded.adapter.causal
    times: dict[str, float] = {}

    def forward() -> None:
        outputs = loaded.model(**batch.model_inputs, output_attentions=True)
        _ = [a.numpy() for a in outputs.attentions]

    times["forward"] = median_ms(forward, repeats)
    times["capture"] = median_ms(lambda: run_with_capture(loaded.adapter, batch.model_inputs), repeats)
    # Verification and the measures, each timed alone on inputs computed outside the timer (a difference of two
    # timings could come out negative in noise).
    capture = run_with_capture(loaded.adapter, batch.model_inputs)
    weights = loaded.adapter.all_layer_weights()
    masks = layer_masks(batch.attention_mask, loaded.adapter.causal, [w.sliding_window for w in weights],
                        capture.hidden_in[0].dtype)

    def verify() -> None:
        for layer, w in enumerate(weights):
            rec = recompute_attention(capture.hidden_in[layer], w, masks[layer], capture.position_embeddings[layer])
            layer_errors(capture.attentions[layer], rec.pattern, capture.z[layer], rec.z, batch.attention_mask)

    times["verify"] = median_ms(verify, repeats)
    times["capture_sdpa"] = median_ms(lambda: run_with_capture(loaded.adapter, batch.model_inputs, eager=False), repeats)
    kernel = run_with_capture(loaded.adapter, batch.model_inputs, eager=False)
    times["pattern"] = median_ms(lambda: [attention_pattern(q, k, w, masks[layer], scale_query=True)
                                          for layer, ((q, k, _), w) in enumerate(zip(kernel.kernel_inputs, weights, strict=True))], repeats)
    patterns = [attention_pattern(q, k, w, masks[layer], scale_query=True)[1]
                for layer, ((q, k, _), w) in enumerate(zip(kernel.kernel_inputs, weights, strict=True))]

    def probes() -> None:
        for layer, ((q, k, v), w) in enumerate(zip(kernel.kernel_inputs, weights, strict=True)):
            projection_errors(kernel.hidden_in[layer], w, q, k, v, kernel.position_embeddings[layer], seed=layer)
            z_probe_errors(patterns[layer], v, kernel.z[layer], batch.attention_mask, w, seed=layer)

    times["probes"] = median_ms(probes, repeats)
    specs = [REGISTRY[name] for name in config.measures]
    inputs = [LayerInputs(patterns[layer], per_query_head(kernel.kernel_inputs[layer][2], w), w)
              for layer, w in enumerate(weights)]

    def measures() -> None:
        for spec in specs:
            if spec.per_layer is not None:
                _ = [spec.function("per_layer")(layer_inputs) for layer_inputs in inputs]
            if spec.across_layers is not None:
                spec.function("across_layers")([layer_inputs.pattern for layer_inputs in inputs])

    times["measures"] = median_ms(measures, repeats)
    # the inputs of the later steps, computed once more outside the timers (see median_ms)
    analysis = analyse_batch(loaded, batch, config.measures, eager=False)
    stats = corpus_statistics(loaded, config)
    times["heads"] = median_ms(lambda: stats["heads"].update_batch(analysis), repeats)
    times["similarity"] = median_ms(lambda: stats["similarity"].update_batch(analysis), repeats)
    times["topk_table"] = median_ms(lambda: batch_association_table(analysis, ids, causal, top_k=config.top_k), repeats)
    topk = batch_association_table(analysis, ids, causal, top_k=config.top_k)
    # dense batches are smaller (DENSE_ATTENTION_BUDGET): timed on their own batch, scaled to this batch's tokens
    scale = batch.attention_mask.sum().item() / dense_batch.attention_mask.sum().item()
    dense_analysis = analyse_batch(loaded, dense_batch, config.measures, eager=False)
    dense_inputs = batch_inputs(dense_analysis, dense_ids)  # lengths, positions, doc_ids

    def dense_table() -> pa.Table:
        return matrices_table(dense_analysis.per_layer, *dense_inputs, causal)

    times["dense_table"] = scale * median_ms(dense_table, repeats)
    dense = dense_table()
    with tempfile.TemporaryDirectory(prefix="bench-steps-") as folder:
        out = Path(folder) / "part.parquet"
        times["topk_write"] = median_ms(lambda: write_associations(topk, out, ordered=True), repeats)
        times["dense_write"] = scale * median_ms(lambda: write_associations(dense, out, ordered=True), repeats)
    times = {key: times[key] for key in STEPS}  # in the table's order
    return {"documents": len(batch.docs), "longest": batch.attention_mask.shape[1],
            "tokens": int(batch.attention_mask.sum()), "ms": times}


def format_steps(profiles: dict[str, dict[str, Any]]) -> str:
    """One column per corpus: ms per batch and % of the forward pass (b)."""
    names = list(profiles)
    header = "| step | " + " | ".join(
        f"{n}: {p['documents']} docs × {p['longest']} tok, ms (% of b)" for n, p in profiles.items()) + " |"
    lines = [header, "|---|" + "---:|" * len(names)]
    for key, label in STEPS.items():
        cells = []
        for n in names:
            ms = profiles[n]["ms"][key]
            cells.append(f"{ms:,.0f} ({100 * ms / profiles[n]['ms']['forward']:.0f}%)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, steps in (("**sum for a probed topk batch** (sdpa forward … write)", PROBED_TOPK_BATCH),
                         (f"**floor of a verified batch** ({FLOOR_LABEL})", VERIFIED_FLOOR)):
        cells = []
        for n in names:
            ms = sum(profiles[n]["ms"][k] for k in steps)
            cells.append(f"{ms:,.0f} → {profiles[n]['ms']['forward'] / ms:.2f}× of (b)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
