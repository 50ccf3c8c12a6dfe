"""`extractor verify` and `extractor explain` through Typer's test runner: exit codes and what they print."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from extractor.cli import app
from extractor.core.adapters.bert import BertAdapter
from extractor.core.models import LoadedModel

IT_SENTENCE = "The animal didn't cross the street because it was too tired."
REPO_ROOT = Path(__file__).resolve().parent.parent
ROW_LINE = re.compile(r"^  (\S+)\s+(\d+\.\d{3})\s+(\d+\.\d{3})\s+(\d+\.\d{3})$")


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args))

    return invoke


def assert_user_error(result, *fragments: str) -> None:
    """Exit 2, exactly one line on stderr starting with 'error:', no traceback anywhere."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def head_rows(output: str) -> list[tuple[str, float, float, float]]:
    rows = []
    for line in output.splitlines():
        match = ROW_LINE.match(line)
        if match:
            label, *numbers = match.groups()
            rows.append((label, *(float(x) for x in numbers)))
    return rows


# --- verify -----------------------------------------------------------------------------------------------


def test_verify_passes(cli) -> None:
    result = cli("verify", "--text", "I love pets, especially cats.", "--text", IT_SENTENCE)
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.stdout
    assert "72 heads" in result.stdout  # 6 layers × 12 heads of the bundled MiniLM
    assert "eager" in result.stdout


def test_verify_tiny_model_folder(cli, tiny_model_dir) -> None:
    result = cli("verify", "--model", str(tiny_model_dir("gpt2")), "--text", IT_SENTENCE)
    assert result.exit_code == 0, result.output
    assert "PASSED: all 8 heads" in result.stdout


def test_verify_fails_with_exit_1_and_names_heads(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    original = BertAdapter.layer_weights

    def noisy(self, layer: int):
        weights = original(self, layer)
        if layer != 1:
            return weights
        noise = torch.randn(weights.W_Q.shape, generator=torch.Generator().manual_seed(1)) * weights.W_Q.std()
        return dataclasses.replace(weights, W_Q=weights.W_Q + noise)

    monkeypatch.setattr(BertAdapter, "layer_weights", noisy)
    result = cli("verify", "--text", IT_SENTENCE)
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.stdout
    named = set(re.findall(r"L(\d+)H(\d+)", result.stdout))
    assert named == {("1", str(h)) for h in range(12)}


# --- explain ----------------------------------------------------------------------------------------------


def hf_row(minilm: LoadedModel, layer: int, head: int, token: str) -> tuple[list[str], torch.Tensor]:
    inputs = minilm.tokenizer(IT_SENTENCE, return_tensors="pt")
    tokens = minilm.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    with torch.no_grad():
        attention = minilm.model(**inputs, output_attentions=True).attentions[layer][0, head]
    return tokens, attention[tokens.index(token)]


def test_explain_picks_sharp_heads(cli) -> None:
    result = cli("explain", "--token", "it", "--text", IT_SENTENCE)
    assert result.exit_code == 0, result.output
    assert "row 'it'" in result.stdout
    assert len(re.findall(r"^layer \d+ head \d+: row 'it'", result.stdout, flags=re.M)) == 3
    assert "Z = A·V" in result.stdout


def test_explain_one_head_shows_hugging_face_row(cli, minilm: LoadedModel) -> None:
    result = cli("explain", "--token", "it", "--text", IT_SENTENCE, "--layer", "2", "--head", "11")
    assert result.exit_code == 0, result.output
    tokens, row = hf_row(minilm, 2, 11, "it")
    assert f"layer 2 head 11: row 'it' (position {tokens.index('it')})" in result.stdout
    printed = head_rows(result.stdout)
    assert printed
    attentions = [a for _, a, _, _ in printed]
    assert attentions == sorted(attentions, reverse=True)  # strongest first
    top = row.sort(descending=True).values[: len(printed)]
    for (label, attention, _, _), expected in zip(printed, top.tolist(), strict=True):
        assert attention == pytest.approx(expected, abs=5.1e-4)
        # the printed label is a token whose attention has that value
        assert any(t == label and abs(float(row[j]) - attention) <= 5.1e-4 for j, t in enumerate(tokens))


def test_explain_value_norm_sorts_by_share(cli) -> None:
    result = cli(
        "explain",
        "--token",
        "it",
        "--text",
        IT_SENTENCE,
        "--layer",
        "2",
        "--head",
        "11",
        "--measure",
        "value_norm",
    )
    assert result.exit_code == 0, result.output
    printed = head_rows(result.stdout)
    shares = [s for _, _, _, s in printed]
    assert shares and shares == sorted(shares, reverse=True)
    assert sum(shares) <= 1.0 + 5e-3


def test_explain_rollout(cli) -> None:
    result = cli("explain", "--token", "it", "--text", IT_SENTENCE, "--measure", "rollout")
    assert result.exit_code == 0, result.output
    assert [int(x) for x in re.findall(r"rollout after layer (\d+): row 'it'", result.stdout)] == list(range(6))
    one = cli("explain", "--token", "it", "--text", IT_SENTENCE, "--measure", "rollout", "--layer", "2")
    assert one.exit_code == 0, one.output
    assert re.findall(r"rollout after layer (\d+)", one.stdout) == ["2"]


# --- user errors: exit 2, one line, no traceback ------------------------------------------------------------


def test_unknown_model_path(cli) -> None:
    assert_user_error(cli("verify", "--model", "./no/such/model", "--text", "hello"), "./no/such/model")


def test_unsupported_family(cli, tiny_model_dir) -> None:
    result = cli("verify", "--model", str(tiny_model_dir("bloom")), "--text", "hello")
    assert_user_error(result, "bloom", "bert", "gpt2", "distilbert", "llama")


def test_empty_text(cli) -> None:
    assert_user_error(cli("verify", "--text", "  "), "empty")
    assert_user_error(cli("explain", "--token", "it", "--text", "  "), "empty")


def test_token_not_in_text(cli) -> None:
    assert_user_error(cli("explain", "--token", "zebra", "--text", IT_SENTENCE), "zebra", "animal")


@pytest.mark.parametrize(("option", "value"), [("--layer", "6"), ("--head", "12"), ("--layer", "-1")])
def test_layer_or_head_out_of_range(cli, option: str, value: str) -> None:
    assert_user_error(cli("explain", "--token", "it", "--text", IT_SENTENCE, option, value), option, "out of range")


def test_bad_measure(cli) -> None:
    assert_user_error(cli("explain", "--token", "it", "--text", IT_SENTENCE, "--measure", "saliency"), "saliency")


# --- python -m extractor ----------------------------------------------------------------------------------


def test_python_dash_m_help() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "extractor", "--help"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "verify" in done.stdout and "explain" in done.stdout


def test_explain_refuses_occurrence_below_one(cli) -> None:
    result = cli("explain", "--token", "the", "--occurrence", "0", "--text", "The cat saw the dog.")
    assert result.exit_code == 2
    assert "counts from 1" in result.output


def test_explain_prints_tokens_as_the_text_has_them(cli, tiny_model_dir) -> None:
    """A byte-level BPE model (tiny GPT-2) marks a leading space with 'Ġ'; explain prints the text's own slice."""
    text = "The animal didn't cross the street because it was too tired."
    result = cli("explain", "--model", str(tiny_model_dir("gpt2")), "--token", "it", "--text", text,
                 "--layer", "1", "--head", "0")
    assert result.exit_code == 0, result.output
    assert "row 'it' (position" in result.stdout and "Ġ" not in result.stdout


@pytest.mark.parametrize(
    ("code", "status", "stderr"),
    [(None, 0, ""), (0, 0, ""), (2, 2, ""), ("error: a message", 1, "error: a message\n")],
)
def test_quick_exit_keeps_status_streams_and_atexit(code: object, status: int, stderr: str) -> None:
    """`exit_now` skips the interpreter's teardown but not what a process owes: the status `sys.exit` would
    give, the atexit handlers, and what is still buffered on stdout (a pipe is block-buffered)."""
    script = (
        "import atexit, sys\n"
        "from extractor.__main__ import exit_now\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "print('buffered')\n"
        f"exit_now({code!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (status, "buffered\natexit ran\n", stderr)


def test_quick_exit_waits_for_a_running_thread() -> None:
    """With another (non-daemon) thread alive, the usual exit: the thread finishes its work first."""
    script = (
        "import sys, threading, time\n"
        "from extractor.__main__ import exit_now\n"
        "threading.Thread(target=lambda: (time.sleep(0.5), print('thread done'))).start()\n"
        "exit_now(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (3, "thread done\n")
