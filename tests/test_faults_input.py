"""Bad input found by testers: each must end in one line `error: ...` on stderr and exit 2 (Ctrl-C: 130), never a
traceback, or be skipped with a reason when it is one record of a corpus.

The CLI is driven through Typer's runner, or a real process where a signal or the interpreter's start matters.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

import extractor
from extractor.cli import app

REPO_ROOT = Path(__file__).resolve().parent.parent


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def one_line_error(result: Result, code: int = 2) -> str:
    """The single `error:` line of a failed command; checks the exit code and that no traceback leaked."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return lines[0]


def python_m_extractor(*args: str) -> subprocess.Popen[str]:
    """`python -m extractor ARGS` in a child whose SIGINT is not ignored (as in a terminal)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "extractor", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


# --- 6. Ctrl-C, 12. --version -----------------------------------------------------------------------------


def test_version_flag() -> None:
    result = invoke("--version")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"attention-extractor {extractor.__version__}"
    assert extractor.__version__ != "unknown"


def test_interrupt_inside_a_command_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import extractor.models

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(extractor.models, "load_model", interrupted)
    line = one_line_error(invoke("verify", "--text", "hello"), code=130)
    assert line == "error: interrupted"


@pytest.mark.parametrize("delay", [0.4, 2.0])
def test_sigint_during_start_up_is_one_line(delay: float) -> None:
    """A real SIGINT while the CLI imports its modules (0.4 s) or loads torch and the model (2 s)."""
    child = python_m_extractor("verify", "--text", "hello there")
    time.sleep(delay)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    assert stderr.strip() == "error: interrupted"


def test_interrupt_while_importing_the_cli_is_one_line() -> None:
    """Ctrl-C while `python -m extractor` imports the CLI (forced: importing typer raises it)."""
    code = (
        "import sys, runpy\n"
        "class Stop:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'typer':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Stop())\n"
        "sys.argv = ['extractor', '--version']\n"
        "runpy.run_module('extractor', run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "error: interrupted"


# --- 1, 5. model folders: no tokenizer, a pickle that would run code, corrupt weights -------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def minilm_folder(folder: Path, *, tokenizer: bool, weights: bool) -> Path:
    """A save_pretrained-style folder from the bundled MiniLM: its config, and optionally its tokenizer files
    and weights (linked, not copied: 90 MB)."""
    from extractor.models import bundled_model_path

    source = bundled_model_path("minilm")
    folder.mkdir()
    shutil.copy(source / "config.json", folder)
    for name in TOKENIZER_FILES if tokenizer else ():
        shutil.copy(source / name, folder)
    if weights:
        (folder / "model.safetensors").symlink_to(source / "model.safetensors")
    return folder


class RunsCode:
    """Unpickling this calls os.system: a checkpoint that would run code if loaded with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_model_folder_without_tokenizer_files_is_refused(tmp_path: Path) -> None:
    folder = minilm_folder(tmp_path / "no-tokenizer", tokenizer=False, weights=True)
    line = one_line_error(invoke("verify", "--model", str(folder), "--text", "hello world"))
    assert line.startswith(f"error: model '{folder}' has no tokenizer files"), line


def test_pickle_that_runs_code_is_not_run(tmp_path: Path) -> None:
    folder = minilm_folder(tmp_path / "pickle", tokenizer=True, weights=False)
    marker = tmp_path / "code-ran"
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"embeddings.word_embeddings.weight": RunsCode(marker)}, handle)
    line = one_line_error(invoke("verify", "--model", str(folder), "--text", "hello world"))
    assert not marker.exists()
    assert line == (
        f"error: model '{folder}': pytorch_model.bin holds Python objects besides tensors, so the safe loader "
        "refused it (nothing in it was run); use a model saved as model.safetensors"
    )


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header", "Error while deserializing header"),
        ("pytorch_model.bin", b"", "EOFError"),
        ("pytorch_model.bin", b"PK\x03\x04 half a zip", "PytorchStreamReader failed reading zip archive"),
    ],
)
def test_corrupt_weights_are_one_line(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    folder = minilm_folder(tmp_path / "corrupt", tokenizer=True, weights=False)
    (folder / name).write_bytes(content)
    line = one_line_error(invoke("verify", "--model", str(folder), "--text", "hello world"))
    assert line.startswith(f"error: cannot read the weights of model '{folder}' from {name}"), line
    assert reason in line
