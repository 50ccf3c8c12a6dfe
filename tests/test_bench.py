"""The benchmark's own plumbing (its figures are not tests): cases on a chosen device, the device check, the table."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from extractor.bench.throughput import check_device, format_table, measure, run_case, sample_sentences


def test_a_case_runs_on_the_device_it_is_given(tmp_path: Path) -> None:
    """(b) in this process and (e) in the benchmark's worker process, on the CPU by name: every document and
    token counted, no device memory figure (CPU only)."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sample_sentences()[:6]) + "\n", encoding="utf-8")
    forward = run_case("b", "minilm", str(corpus), 64, 4, 8192, device="cpu")
    summary = measure("e", "minilm", str(corpus), 64, 4, 8192, threads=None, device="cpu")
    assert forward["documents"] == summary["documents"] == 6
    assert forward["tokens"] == summary["tokens"] > 6
    assert forward["seconds"] > 0 and summary["seconds"] > 0
    assert "device_peak_mb" not in forward and "device_peak_mb" not in summary
    assert summary["peak_rss_mb"] > 100  # the worker's own


def test_a_device_this_machine_lacks_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU machine, wherever it runs
    for device, message in (("cuda", "this machine has no CUDA device (torch "), ("tpu", "choose cpu, cuda or cuda:N")):
        with pytest.raises(SystemExit) as exit_:
            check_device(device)
        assert exit_.value.code == 2
        assert capsys.readouterr().err.startswith(f"error: --device {device}: {message}")
    check_device("cpu")  # no exit


def test_the_table_shows_device_memory_when_a_case_reports_it() -> None:
    args = argparse.Namespace(model="minilm", batch_size=32, token_budget=8192, device="cpu")
    rows = [{"corpus": "len32", "case": "b", "tokens": 1000, "seconds": 1.0, "documents": 10, "bytes": 0,
             "peak_rss_mb": 700.0},
            {"corpus": "len32", "case": "c", "tokens": 1000, "seconds": 2.0, "documents": 10, "bytes": 5000,
             "peak_rss_mb": 800.0, "device_peak_mb": 1234.0}]
    lines = format_table(rows, args).splitlines()
    assert lines[2] == "| corpus | case | tokens/s | ratio to (b) | peak RSS MB | device peak MB | bytes written / doc | docs |"
    assert lines[5] == "| len32 | (c) extractor run, verify on, topk | 500 | 0.50 | 800 | 1234 | 500 | 10 |"
    assert "| nan |" in lines[4]  # (b) reported no device figure
    assert "device peak" not in format_table(rows[:1], args)


def test_the_step_table_adds_a_batch_and_its_verified_floor() -> None:
    """The step table's last rows sum the steps of a probed top-k batch and of its floor (the forward pass, the
    pattern and the probes), each as ms and as the ratio (b) / sum, per corpus."""
    from extractor.bench.steps import PROBED_TOPK_BATCH, STEPS, VERIFIED_FLOOR, format_steps

    ms = {key: 1.0 for key in STEPS} | {"forward": 100.0, "capture_sdpa": 80.0, "pattern": 10.0, "probes": 10.0,
                                          "topk_write": 45.0}
    table = format_steps({"len8": {"documents": 2, "longest": 8, "tokens": 16, "ms": ms}})
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
    assert set(VERIFIED_FLOOR) < set(PROBED_TOPK_BATCH)
    batch = 80 + 10 + 10 + 45 + (len(PROBED_TOPK_BATCH) - 4)  # the others took 1 ms each
    assert rows["**sum for a probed topk batch** (sdpa forward … write)"].endswith(
        f"| {batch} → {100 / batch:.2f}× of (b) |")
    assert rows["**floor of a verified batch** (sdpa forward, pattern, probes: nothing else)"].endswith(
        "| 100 → 1.00× of (b) |")
    assert rows["(b) HF forward, eager, output_attentions (to NumPy)"].endswith("| 100 (100%) |")
