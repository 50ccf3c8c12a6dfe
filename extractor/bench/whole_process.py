"""Whole process, side by side: a careful by-hand Hugging Face script against `extractor run`, on real text.

Both run as fresh processes on the same few hundred real paragraphs, timed from process start to exit (imports,
model load, tokenisation, every forward pass; for the extractor also verification, tables, Parquet, per-head
metrics, figures and the report):

  by hand    eager attention, `output_attentions=True`, length-sorted batches of 32, every attention copied to
             NumPy, nothing written
  extractor  `extractor run --model M --input texts.txt --output O --storage topk`, defaults otherwise

The real text is offline and the same on every machine with the same Python: the prose paragraphs of Python's
own documentation (`pydoc_data.topics`, shipped with CPython), kept between 17 and 150 tokens.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BY_HAND = r'''
import sys, torch
from transformers import AutoModel, AutoTokenizer
path, corpus = sys.argv[1], sys.argv[2]
texts = [t for t in open(corpus, encoding="utf-8").read().splitlines() if t.strip()]
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
lengths = [len(ids) for ids in tokenizer(texts, truncation=True)["input_ids"]]
order = sorted(range(len(texts)), key=lengths.__getitem__)
with torch.inference_mode():
    for start in range(0, len(order), 32):
        batch = tokenizer([texts[i] for i in order[start:start + 32]], padding=True, truncation=True, return_tensors="pt")
        attentions = [a.numpy() for a in model(**batch, output_attentions=True).attentions]
'''


def real_paragraphs(tokenizer: Any, n_docs: int, low: int = 17, high: int = 150) -> list[str]:
    """`n_docs` prose paragraphs of Python's documentation with `low`..`high` tokens, in a fixed order."""
    import pydoc_data.topics as topics

    chosen = []
    for _, text in sorted(topics.topics.items()):
        for paragraph in re.split(r"\n\s*\n", text):
            words = paragraph.split()
            if len(words) < 8 or paragraph.lstrip().startswith((">>>", "...")) or paragraph.count("(") > 5:
                continue
            joined = " ".join(words)
            if low <= len(tokenizer(joined)["input_ids"]) <= high:
                chosen.append(joined)
            if len(chosen) == n_docs:
                return chosen
    return chosen


def timed(args: list[str]) -> float:
    """Wall seconds of a subprocess, start to exit; raises with its stderr when it fails."""
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} failed:\n{proc.stderr[-2000:]}")
    return seconds


def whole_process(model: str, n_docs: int, repeats: int = 2) -> dict[str, Any]:
    """Time both processes on `n_docs` real paragraphs (best of `repeats`); returns seconds each and the ratio
    (by hand / extractor)."""
    from extractor.core.models import load_model

    loaded = load_model(model)
    path = loaded.provenance["resolved_path"] or model
    work = Path(tempfile.mkdtemp(prefix="bench-whole-"))
    try:
        corpus = work / "texts.txt"
        texts = real_paragraphs(loaded.tokenizer, n_docs)
        corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
        by_hand = extractor = float("inf")
        for _ in range(repeats):  # alternated, best of `repeats` each: both see the same machine
            by_hand = min(by_hand, timed([sys.executable, "-c", BY_HAND, str(path), str(corpus)]))
            shutil.rmtree(work / "out", ignore_errors=True)
            extractor = min(extractor, timed([sys.executable, "-m", "extractor", "run", "--model", model, "--input",
                                              str(corpus), "--output", str(work / "out"), "--storage", "topk",
                                              "--quiet"]))
        figures = len(list((work / "out" / "plots").glob("*"))) if (work / "out" / "plots").exists() else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"documents": len(texts), "by_hand_s": by_hand, "extractor_s": extractor, "ratio": by_hand / extractor,
            "figures": figures}


def format_whole(result: dict[str, Any], model: str) -> str:
    return (f"whole process, {result['documents']} real paragraphs (Python's documentation, 17-150 tokens), {model}: "
            f"by-hand script {result['by_hand_s']:.1f}s, `extractor run` (topk, verification, metrics, "
            f"{result['figures']} figures, report) {result['extractor_s']:.1f}s → ratio {result['ratio']:.2f} "
            "(best of 2 each)")


def main(argv: list[str] | None = None) -> None:
    """`python -m extractor.bench.whole_process [--model M] [--docs N]`: only the whole-process comparison."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--docs", type=int, default=400, help="real paragraphs (default 400)")
    args = parser.parse_args(argv)
    print(format_whole(whole_process(args.model, args.docs), args.model))


if __name__ == "__main__":
    main()
