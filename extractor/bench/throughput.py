"""Benchmark: what the extractor costs next to the model's own forward pass, measured side by side.

    python -m extractor.bench [--model minilm] [--quick] [--json FILE] [--steps-only] [--no-smollm2] [--whole N]
                              [--device cpu|cuda|cuda:N]

Cases, on the same inputs and the same batches (length bucketing, token budget):
  (a) Hugging Face forward, sdpa, no attentions             the floor
  (b) Hugging Face forward, eager, output_attentions=True   what a user does by hand
  (c) extractor run: verification on, topk tables           the default
  (d) dense storage (float16, every pair)
  (e) summary storage (no pair tables; per-head metrics only)
  (f) (c) with documents in their original order (no length bucketing)
  (g) (c) with --measures attention,value_zeroing           the intervention's cost
  (h) (c) with --measures attention,alti,globenc            post-LayerNorm encoders only
Corpora: the shipped sample corpus; real text cut to 32, 128 and 512 tokens; a mixed-length corpus for (f);
len128/vz, the first documents of the 128-token corpus, for (g) and (h) (value zeroing re-runs each layer once
per key: about n forward passes of work per document of n tokens); len128/smollm2, 128-token documents for
SmolLM2-135M's (b), (c) and (e) (left out with --no-smollm2 or when --model is smollm2).
Every case runs in its own subprocess so peak memory (max RSS) is the case's own; every case, the baselines
too, runs with the allocator settings `extractor run` uses (`extractor.core.runtime`).
Then, in the same run, where the time goes: each step of a run timed alone on one batch of the 32-, 128- and
512-token corpora (`extractor.bench.steps`).

And the whole process side by side (`extractor.bench.whole_process`): a careful by-hand Hugging Face script and
`extractor run` (figures and report included), each a fresh process, on N real paragraphs (default 400; 0 skips).

On a GPU (`--device cuda`, `make bench-gpu`): the cases run there (model, batches, the run's tensors; (b) still
copies every attention to host memory, as a user would), each timed to the end of the device's work, with the
device's peak memory beside the process's RSS; the step profile and the whole-process comparison stay on the CPU.

Optional, with --ray [ADDRESS]: the 128-token corpus through `extractor run --engine ray` on 1 and on 2 workers
(ADDRESS: a running cluster, e.g. auto or HOST:PORT; 'local': a new local instance per run) and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample.txt"  # the repository's data/
CASES = {
    "a": "HF forward, sdpa, no attentions",
    "b": "HF forward, eager, output_attentions",
    "c": "extractor run, verify on, topk",
    "d": "extractor run, dense (float16)",
    "e": "extractor run, summary",
    "f": "(c) without length bucketing",
    "g": "(c) with measures attention,value_zeroing",
    "h": "(c) with measures attention,alti,globenc",
}
RUN_CASES = {  # case → (storage, bucketing, measures; None: the run's default)
    "c": ("topk", True, None),
    "d": ("dense", True, None),
    "e": ("summary", True, None),
    "f": ("topk", False, None),
    "g": ("topk", True, ["attention", "value_zeroing"]),
    "h": ("topk", True, ["attention", "alti", "globenc"]),
}
SMOLLM2 = "smollm2"


def sample_sentences() -> list[str]:
    return [line.strip() for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]


def corpus_of_length(tokenizer: Any, n_docs: int, n_tokens: int, seed: int) -> list[str]:
    """`n_docs` documents of real sentences joined until each has at least `n_tokens` tokens (cut by max_length)."""
    sentences = sample_sentences()
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts: list[str] = []
        while len(tokenizer(" ".join(parts))["input_ids"]) < n_tokens:
            parts.append(rng.choice(sentences))
        docs.append(" ".join(parts))
    return docs


def mixed_corpus(n_docs: int, seed: int) -> list[str]:
    """Documents of 1 to 30 sentences (about 10 to 500 tokens): real text's spread of lengths."""
    sentences = sample_sentences()
    rng = random.Random(seed)
    return [" ".join(rng.choice(sentences) for _ in range(rng.choice([1, 1, 2, 3, 5, 8, 13, 21, 30])))
            for _ in range(n_docs)]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_case(
    case: str, model: str, corpus_file: str, max_length: int, batch_size: int, token_budget: int, device: str = "cpu",
) -> dict[str, Any]:
    """Run one case in this process on `device`; returns seconds, tokens, documents, bytes written (and on CUDA
    the device's peak memory)."""
    import torch

    from extractor.api import run_extraction
    from extractor.core.encode import collate, tokenize, truncate
    from extractor.core.models import load_model
    from extractor.corpus.batching import plan_batches
    from extractor.corpus.config import RunConfig

    torch.set_grad_enabled(False)
    texts = [t for t in Path(corpus_file).read_text(encoding="utf-8").splitlines() if t.strip()]
    # (a), (b): only the tokenizer and the weights' folder, so the extractor's own copy stays off the device
    loaded = load_model(model, "cpu" if case in ("a", "b") else device)
    if case in ("a", "b"):
        from transformers import AutoModel

        source = loaded.provenance["resolved_path"] or model
        implementation = "sdpa" if case == "a" else "eager"
        hf = AutoModel.from_pretrained(source, attn_implementation=implementation, dtype=torch.float32).eval()
        hf = hf.to(device)
        start = time.perf_counter()
        docs = [truncate(d, max_length) for d in tokenize(loaded.tokenizer, texts)]
        # the same batches as the run cases: same budgets as RunConfig's defaults
        plan = plan_batches([[d.n_tokens] for d in docs], token_budget, batch_size, bucketing=True,
                            attention_budget=RunConfig().attention_budget)
        with torch.inference_mode():
            for group in plan:
                batch = collate([docs[g] for g in group], loaded.tokenizer.pad_token_id, device)
                out = hf(**batch.model_inputs, output_attentions=case == "b")
                if case == "b":
                    # what a user does by hand: bring every attention matrix to host memory as NumPy
                    _ = [a.cpu().numpy() for a in out.attentions]
        synchronize(device)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "tokens": sum(d.n_tokens for d in docs), "documents": len(docs), "bytes": 0,
                **device_peak(device)}
    storage, bucketing, measures = RUN_CASES[case]
    out_dir = Path(tempfile.mkdtemp(prefix=f"bench-{case}-"))
    config = RunConfig(model=model, input=corpus_file, output=str(out_dir), storage=storage, max_length=max_length,
                       batch_size=batch_size, token_budget=token_budget, bucketing=bucketing,
                       measures=measures or RunConfig().measures, plots=False, report=False, device=device)
    start = time.perf_counter()
    manifest = run_extraction(config, overwrite=True, quiet=True, loaded=loaded)
    synchronize(device)
    seconds = time.perf_counter() - start
    written = folder_bytes(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"seconds": seconds, "tokens": manifest["counts"]["tokens_processed"],
            "documents": manifest["counts"]["records"], "bytes": written, **device_peak(device)}


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that a timer stops at its end."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def device_peak(device: str) -> dict[str, float]:
    """On CUDA, the device's peak allocated memory in MB ({} on the CPU)."""
    import torch

    return {"device_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20} if device.startswith("cuda") else {}


def ray_run_seconds(model: str, corpus_file: str, max_length: int, workers: int, address: str) -> float:
    """Wall time of `extractor run --engine ray --workers N` in a subprocess (the driver, Ray's start included)."""
    out_dir = Path(tempfile.mkdtemp(prefix=f"bench-ray{workers}-"))
    args = [sys.executable, "-m", "extractor", "run", "--model", model, "--input", corpus_file, "--output",
            str(out_dir), "--max-length", str(max_length), "--engine", "ray", "--workers", str(workers),
            "--no-plots", "--no-report", "--quiet", "--overwrite"]
    if address != "local":
        args += ["--address", address]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    shutil.rmtree(out_dir, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ray run on {workers} workers failed:\n{proc.stderr[-2000:]}")
    return seconds


def ray_scaling(model: str, corpus_file: str, max_length: int, address: str) -> str:
    """The same corpus on 1 and on 2 Ray workers: seconds each and the ratio."""
    one, two = (ray_run_seconds(model, corpus_file, max_length, workers, address) for workers in (1, 2))
    return (f"ray engine ({address}), 128-token corpus: 1 worker {one:.1f}s, 2 workers {two:.1f}s, "
            f"speed-up {one / two:.2f}x (wall time, Ray start and model loads included)")


def measure(
    case: str, model: str, corpus_file: str, max_length: int, batch_size: int, token_budget: int, threads: int | None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run a case in a fresh subprocess; adds its peak RSS."""
    args = [sys.executable, "-m", "extractor.bench.throughput", "--worker", case, "--model", model, "--corpus", corpus_file,
            "--max-length", str(max_length), "--batch-size", str(batch_size), "--token-budget", str(token_budget),
            "--device", device]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_device(device: str) -> None:
    """A device this machine has, or one line that says why not (exit 2)."""
    import torch

    if device == "cpu" or (device.startswith("cuda") and torch.cuda.is_available()):
        return
    problem = ("choose cpu, cuda or cuda:N" if not device.startswith("cuda")
               else f"this machine has no CUDA device (torch {torch.__version__})")
    print(f"error: --device {device}: {problem}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--quick", action="store_true", help="fewer documents (a smoke run)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps-only", action="store_true", help="only the per-step profile (where the time goes)")
    parser.add_argument("--no-smollm2", action="store_true", help="leave out the SmolLM2 cases (b), (c), (e)")
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="also time the ray engine on 1 and 2 workers (ADDRESS: auto, HOST:PORT, or local)")
    parser.add_argument("--device", default="cpu", help="where the cases run: cpu (default), cuda or cuda:N")
    parser.add_argument("--whole", type=int, default=400, metavar="N",
                        help="whole-process comparison with a by-hand script on N real paragraphs (0: skip)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, default=512, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        from extractor.core.runtime import tune_allocator

        tune_allocator()  # every case, the baselines too, runs with the allocator settings `extractor run` uses
        if args.worker == "steps":
            from extractor.bench.steps import profile_batch

            texts = [t for t in Path(args.corpus).read_text(encoding="utf-8").splitlines() if t.strip()]
            print(json.dumps(profile_batch(args.model, texts, args.max_length)))
            return
        result = run_case(args.worker, args.model, args.corpus, args.max_length, args.batch_size, args.token_budget,
                          args.device)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    from extractor.core.models import load_model

    check_device(args.device)
    loaded = load_model(args.model)
    tokenizer = loaded.tokenizer
    scale = 4 if args.quick else 1
    work = Path(tempfile.mkdtemp(prefix="bench-corpora-"))
    corpora: dict[str, tuple[Path, int, str, str]] = {}  # name → (file, max_length, cases, model)

    def write(name: str, texts: list[str], max_length: int, cases: str, model: str = args.model) -> None:
        path = work / f"{name.replace('/', '-')}.txt"
        path.write_text("\n".join(texts) + "\n", encoding="utf-8")
        corpora[name] = (path, max_length, cases, model)

    # Enough documents for 8-16 batches per corpus, so that a run's fixed costs (output folder, consolidation,
    # manifest) weigh what they weigh on a real corpus, not on one batch.
    write("sample", sample_sentences(), 512, "abcde")
    write("len32", corpus_of_length(tokenizer, 512 // scale, 32, 1), 32, "abcde")
    len128 = corpus_of_length(tokenizer, 256 // scale, 128, 2)
    write("len128", len128, 128, "abcde")
    # value zeroing costs about n forward passes per document of n tokens: a few documents say what it costs
    post_norm = "h" if loaded.adapter.norm_placement == "post" else ""
    write("len128/vz", len128[: 16 // scale], 128, "bg" + post_norm)
    # dense at 512 tokens writes 150 matrices of 512² float16 per MiniLM document (79 MB; 5 GB for these 64
    # documents): left out on purpose; the step profile times one dense batch at 512 tokens instead
    write("len512", corpus_of_length(tokenizer, 64 // scale, 512, 3), 512, "abce")
    write("mixed", mixed_corpus(512 // scale, 4), 512, "bcf")
    if not args.no_smollm2 and args.model != SMOLLM2:
        write("len128/smollm2", corpus_of_length(load_model(SMOLLM2).tokenizer, 64 // scale, 128, 2), 128, "bce",
              SMOLLM2)

    rows = []
    for name, (path, max_length, cases, model) in corpora.items():
        for case in "" if args.steps_only else cases:
            result = measure(case, model, str(path), max_length, args.batch_size, args.token_budget, args.threads,
                             args.device)
            result.update(corpus=name, case=case, model=model)
            rows.append(result)
            print(f"  measured {name:<14} ({case}) {result['seconds']:.2f}s", file=sys.stderr, flush=True)
    scaling = ray_scaling(args.model, str(corpora["len128"][0]), 128, args.ray) if args.ray else ""
    steps = {}
    for name in ("len32", "len128", "len512"):
        path, max_length, _, _ = corpora[name]
        steps[name] = measure("steps", args.model, str(path), max_length, args.batch_size, args.token_budget,
                              args.threads)
        print(f"  profiled {name:<7} steps", file=sys.stderr, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    whole = None
    if args.whole and not args.steps_only:
        from extractor.bench.whole_process import whole_process

        whole = whole_process(args.model, args.whole // scale)
        print(f"  measured whole process ({whole['documents']} documents)", file=sys.stderr, flush=True)
    from extractor.bench.steps import format_steps

    if rows:
        print(format_table(rows, args))
        print()
    if scaling:
        print(scaling + "\n")
    if whole:
        from extractor.bench.whole_process import format_whole

        print(format_whole(whole, args.model) + "\n")
    print("Where the time goes (one batch, each step timed alone, median of 3):\n")
    print(format_steps(steps))
    if args.json:
        Path(args.json).write_text(json.dumps({"cases": rows, "steps": steps, "whole_process": whole}, indent=2))


def format_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    import platform

    import torch

    by_key = {(r["corpus"], r["case"]): r for r in rows}
    models = f" (len128/{SMOLLM2}: {SMOLLM2})" if (f"len128/{SMOLLM2}", "b") in by_key else ""
    device = args.device
    if device.startswith("cuda"):
        device = f"{device} ({torch.cuda.get_device_name(device)})"
    on_gpu = any("device_peak_mb" in r for r in rows)
    lines = [
        f"model {args.model}{models}; batch_size {args.batch_size}, token_budget {args.token_budget}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"cases on {device}",
        "",
        "| corpus | case | tokens/s | ratio to (b) | peak RSS MB |" + (" device peak MB |" if on_gpu else "")
        + " bytes written / doc | docs |",
        "|---|---|---:|---:|---:|" + ("---:|" if on_gpu else "") + "---:|---:|",
    ]
    for r in rows:
        rate = r["tokens"] / r["seconds"]
        base = by_key.get((r["corpus"], "b"))
        ratio = rate / (base["tokens"] / base["seconds"]) if base else float("nan")
        peak = f" {r.get('device_peak_mb', float('nan')):.0f} |" if on_gpu else ""
        lines.append(
            f"| {r['corpus']} | ({r['case']}) {CASES[r['case']]} | {rate:,.0f} | {ratio:.2f} | {r['peak_rss_mb']:.0f} |"
            f"{peak} {r['bytes'] / max(r['documents'], 1):,.0f} | {r['documents']} |"
        )
    lines.append("")
    for case in "bc":
        short, long = by_key.get(("len32", case)), by_key.get(("len512", case))
        if short and long:
            per_doc = (long["seconds"] / long["documents"]) / (short["seconds"] / short["documents"])
            lines.append(f"({case}) time per document grows {per_doc:.1f}× from 32 to 512 tokens (16× the tokens)")
    mixed_c, mixed_f = by_key.get(("mixed", "c")), by_key.get(("mixed", "f"))
    if mixed_c and mixed_f:
        lines.append(f"length bucketing speed-up on the mixed corpus, (c) vs (f): {mixed_f['seconds'] / mixed_c['seconds']:.2f}×")
    base = by_key.get(("len128/vz", "b"))
    for case, what in (("g", "value zeroing"), ("h", "ALTI + GlobEnc")):
        run = by_key.get(("len128/vz", case))
        if base and run:
            cost = (run["seconds"] / run["tokens"]) / (base["seconds"] / base["tokens"])
            lines.append(f"({case}) a run with {what} at 128 tokens takes {cost:.1f}× the time of the forward pass (b)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
