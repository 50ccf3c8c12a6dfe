"""Bad input found by testers: each must end in one line `error: ...` on stderr and exit 2 (Ctrl-C: 130), never a
traceback, or be skipped with a reason when it is one record of a corpus.

The CLI is driven through Typer's runner, or a real process where a signal or the interpreter's start matters.
"""

from __future__ import annotations

import codecs
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner, Result

import extractor
from extractor.cli import app
from extractor.corpus.config import RunConfig, load_config, read_yaml
from extractor.corpus.readers import count_records, read_documents

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
    import extractor.core.models

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(extractor.core.models, "load_model", interrupted)
    line = one_line_error(invoke("verify", "--text", "hello"), code=130)
    assert line == "error: interrupted"


def wait_for_library(pid: int, name: str, timeout: float = 60.0) -> None:
    """Wait until process `pid` has loaded a shared library whose path contains `name` (from /proc/PID/maps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if name in Path(f"/proc/{pid}/maps").read_text():
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not load {name} within {timeout} s")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to see what the child loaded")
@pytest.mark.parametrize(
    "library",
    [
        "_multiarray_umath",  # numpy: the CLI is importing its commands (cli_report → report → pandas)
        "libtorch_cpu",  # torch: `verify` is importing torch to load the model
    ],
)
def test_sigint_during_start_up_is_one_line(library: str) -> None:
    """A real SIGINT while the CLI imports its modules, or while a command imports torch."""
    child = python_m_extractor("verify", "--text", "hello there")
    try:
        wait_for_library(child.pid, library)
    finally:
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
    from extractor.core.models import bundled_model_path

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


# --- 2, 3, 4. corpus records: invisible text, UTF-16/32, an unclosed CSV quote, a lone surrogate ----------------


def records(path: Path, **options: str) -> list[tuple[int, str | None, str | None]]:
    """(line, text, reason) of every record."""
    return [(r.line, r.text, r.reason) for r in read_documents(str(path), **options)]


@pytest.mark.parametrize(
    "invisible",
    ["\x00", "\x00\x01\x1b\x7f", "\u200b", "\u200c\u200d", "\ufeff", "\u2060", "\u0301\u0302", " \u200b\t\u0300 "],
)
def test_documents_without_visible_characters_are_skipped(tmp_path: Path, invisible: str) -> None:
    txt = tmp_path / "corpus.txt"
    txt.write_text(f"visible\n{invisible}\ncafe\u0301 \u200bX\n", encoding="utf-8")
    assert records(txt) == [
        (1, "visible", None),
        (2, None, "no visible characters"),
        (3, "cafe\u0301 \u200bX", None),  # marks and zero-width characters beside visible ones are kept
    ]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text(json.dumps({"text": invisible}) + "\n", encoding="utf-8")
    assert records(jsonl) == [(1, None, "no visible characters")]


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_utf16_and_utf32_files_are_decoded_from_their_bom(tmp_path: Path, codec: str) -> None:
    bom = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE,
           "utf-32-le": codecs.BOM_UTF32_LE, "utf-32-be": codecs.BOM_UTF32_BE}[codec]
    txt = tmp_path / "corpus.txt"
    txt.write_bytes(bom + "Héllo wörld ✓\r\n\nĊ second\n".encode(codec))  # Ċ is U+010A: holds a 0x0A byte
    assert records(txt) == [(1, "Héllo wörld ✓", None), (2, None, "empty"), (3, "Ċ second", None)]
    assert count_records(str(txt)) is None  # a line count of the bytes would be wrong
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_bytes(bom + (json.dumps({"text": "Ünïcode"}, ensure_ascii=False) + "\n").encode(codec))
    assert records(jsonl) == [(1, "Ünïcode", None)]
    csv = tmp_path / "corpus.csv"
    csv.write_bytes(bom + 'id,text\n1,"a, b"\n2,c\n'.encode(codec))
    assert records(csv) == [(2, "a, b", None), (3, "c", None)]


def test_invalid_utf16_is_skipped_per_line(tmp_path: Path) -> None:
    txt = tmp_path / "corpus.txt"
    lone_high_surrogate = b"\x00\xd8"
    txt.write_bytes(codecs.BOM_UTF16_LE + "one\n".encode("utf-16-le") + lone_high_surrogate
                    + "x\nthree".encode("utf-16-le"))
    assert records(txt) == [(1, "one", None), (2, None, "invalid UTF-16"), (3, "three", None)]


@pytest.mark.parametrize("fmt, delimiter", [("csv", ","), ("tsv", "\t")])
def test_csv_quote_left_open_to_the_end_is_skipped(tmp_path: Path, fmt: str, delimiter: str) -> None:
    d = delimiter
    file = tmp_path / f"corpus.{fmt}"
    file.write_text(f'id{d}text\n1{d}ok\n2{d}"open quote\n3{d}next row\n4{d}third\n', encoding="utf-8")
    assert records(file) == [
        (2, "ok", None),
        (3, None, "unclosed quote: the record runs from line 3 to the end of the file (line 5); close the quote"),
    ]
    closed = tmp_path / f"closed.{fmt}"  # a last field that spans lines and is closed stays one document
    closed.write_text(f'id{d}text\n1{d}"two\nlines"', encoding="utf-8")
    assert records(closed) == [(2, "two\nlines", None)]


def test_csv_header_with_an_unclosed_quote_is_one_line(tmp_path: Path) -> None:
    file = tmp_path / "corpus.csv"
    file.write_text('id,"text\n1,ok\n2,more\n', encoding="utf-8")
    line = one_line_error(invoke("run", "-i", str(file), "-o", str(tmp_path / "out")))
    assert line == f"error: {file} line 1: the header opens a quote that is never closed"


def test_jsonl_lone_surrogate_is_skipped(tmp_path: Path) -> None:
    file = tmp_path / "corpus.jsonl"
    file.write_text('{"text":"\\ud800 x"}\n{"text":"x \\udfff"}\n{"text":"\\ud83d\\ude00 ok"}\n', encoding="utf-8")
    assert records(file) == [
        (1, None, "lone surrogate (not valid Unicode)"),
        (2, None, "lone surrogate (not valid Unicode)"),
        (3, "\U0001f600 ok", None),  # a surrogate pair is one valid character
    ]


def test_run_skips_bad_records_with_their_reasons(tmp_path: Path, tiny_model_dir) -> None:
    """Through `extractor run`: before the fix the surrogate crashed the run (TypeError in the tokenizer) and
    the invisible lines were analysed as documents with status ok."""
    corpus = tmp_path / "corpus.jsonl"
    lines = ['{"text": "The cat sat."}', '{"text": "\\ud800 x"}', '{"text": "\\u0000"}',
             '{"text": "\\u200b\\u2060\\ufeff"}', '{"text": "\\u0301"}', '{"text": "A dog ran."}']
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    result = invoke("run", "--model", str(tiny_model_dir("bert")), "-i", str(corpus), "-o", str(out),
                    "--set", "plots=false", "--set", "report=false", "--quiet")
    assert result.exit_code == 0, (result.output, result.exception)
    documents = pq.read_table(out / "documents.parquet").to_pandas().sort_values("doc_id")
    assert documents["status"].tolist() == ["ok", "skipped", "skipped", "skipped", "skipped", "ok"]
    assert documents["reason"].tolist()[1:5] == ["lone surrogate (not valid Unicode)"] + ["no visible characters"] * 3


# --- 6, 8, 11. extractor query: empty SQL, no file access, --format json vs jsonl ------------------------------


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of the tiny BERT over two documents, without plots or report."""
    folder = tmp_path_factory.mktemp("faults-run")
    corpus = folder / "corpus.txt"
    corpus.write_text("The cat sat on the mat.\n\nA dog ran home.\n", encoding="utf-8")
    result = invoke("run", "--model", str(tiny_model_dir("bert")), "-i", str(corpus), "-o", str(folder / "out"),
                    "--set", "plots=false", "--set", "report=false", "--quiet")
    assert result.exit_code == 0, (result.output, result.exception)
    return folder / "out"


@pytest.mark.parametrize("sql", ["", "   ", ";", "/* only a comment */"])
def test_query_empty_sql(run_dir: Path, sql: str) -> None:
    line = one_line_error(invoke("query", str(run_dir), sql))
    assert line == "error: the query is empty; give SQL such as 'SELECT * FROM documents LIMIT 5'"


def test_query_cannot_write_or_read_files(run_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "x.csv"
    documents = run_dir / "documents.parquet"
    before = documents.read_bytes()
    refused = [
        f"COPY (SELECT 1) TO '{target}'",
        "COPY (SELECT 1) TO '/tmp/x.csv'",
        f"COPY (SELECT 7 AS doc_id) TO '{documents}' (FORMAT parquet, USE_TMP_FILE false)",
        f"ATTACH '{tmp_path / 'db.duckdb'}' AS other",
        f"SELECT * FROM read_parquet('{documents}')",  # the views read the run; SQL itself reads no file
        "SET enable_external_access = true",
    ]
    for sql in refused:
        line = one_line_error(invoke("query", str(run_dir), sql))
        assert line.startswith("error: query failed:"), line
    assert not target.exists() and not (tmp_path / "db.duckdb").exists()
    assert documents.read_bytes() == before
    copy = one_line_error(invoke("query", str(run_dir), f"COPY (SELECT 1) TO '{target}'"))
    assert str(target) in copy and copy.endswith("(queries read the run's tables only)")
    ok = invoke("query", str(run_dir), "SELECT status, count(*) AS n FROM documents GROUP BY status ORDER BY status",
                "--format", "csv")
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.splitlines() == ["status,n", "ok,2", "skipped,1"]
    joined = invoke("query", str(run_dir), "SELECT count(*) AS n FROM associations a JOIN tokens t "
                    "ON t.doc_id = a.doc_id AND t.position = a.query_pos", "--format", "jsonl")
    assert joined.exit_code == 0 and json.loads(joined.stdout)["n"] > 0


def test_query_json_is_an_array_and_jsonl_is_lines(run_dir: Path) -> None:
    sql = "SELECT doc_id, status FROM documents ORDER BY doc_id"
    expected = [{"doc_id": 0, "status": "ok"}, {"doc_id": 1, "status": "skipped"}, {"doc_id": 2, "status": "ok"}]
    as_json = invoke("query", str(run_dir), sql, "--format", "json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout) == expected
    as_jsonl = invoke("query", str(run_dir), sql, "--format", "jsonl")
    assert as_jsonl.exit_code == 0 and [json.loads(line) for line in as_jsonl.stdout.splitlines()] == expected
    help_text = " ".join(invoke("query", "--help").stdout.replace("│", " ").split())
    assert "json: one JSON array of row objects" in help_text and "jsonl: JSON Lines" in help_text


# --- 6. extractor report --max-mb -----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "shown"), [("nan", "nan"), ("inf", "inf"), ("-inf", "-inf"), ("-1", "-1"), ("0", "0")])
def test_report_max_mb_must_be_a_positive_number(run_dir: Path, value: str, shown: str) -> None:
    line = one_line_error(invoke("report", str(run_dir), "--max-mb", value))
    assert line == f"error: --max-mb must be a number of megabytes > 0 (got {shown})"
    assert not (run_dir / "report.html").exists()


# --- 7. YAML alias bombs, and error lines that quote at most QUOTE_LIMIT characters of a value -----------------


def alias_bomb(levels: int) -> str:
    """Billion laughs: each level lists the previous one 9 times, so `levels` levels expand to 9**levels values."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    file = tmp_path / "bomb.yaml"
    file.write_text(alias_bomb(7), encoding="utf-8")  # 4.8 million values from 400 bytes
    line = one_line_error(invoke("run", str(file), "-o", str(tmp_path / "out")))
    assert line == f"error: config file '{file}': its aliases expand to more than 10000 values; write the values out"
    assert not (tmp_path / "out").exists()


def test_yaml_within_the_limit_still_uses_aliases(tmp_path: Path) -> None:
    file = tmp_path / "run.yaml"
    file.write_text("base: &m [attention, rollout]\n", encoding="utf-8")
    assert read_yaml(file) == {"base": ["attention", "rollout"]}
    file.write_text("measures: &m [attention, rollout]\nstorage: dense\n", encoding="utf-8")
    assert load_config(str(file), {}).measures == ["attention", "rollout"]


def test_yaml_alias_that_contains_itself_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "loop.yaml"
    file.write_text("measures: &m [attention, *m]\n", encoding="utf-8")
    line = one_line_error(invoke("run", str(file), "-o", str(tmp_path / "out")))
    assert line == f"error: config file '{file}': an alias refers to a value that contains it"


def test_alias_bomb_in_set_is_refused(tmp_path: Path) -> None:
    def ten(value: str) -> str:
        return "[" + ", ".join([value] * 10) + "]"

    bomb = f"[&a {ten('x')}, &b {ten('*a')}, &c {ten('*b')}, {ten('*c')}]"  # expands to 11,110 values
    line = one_line_error(invoke("run", "--set", f"measures={bomb}", "-o", str(tmp_path / "out")))
    assert line == "error: --set 'measures': its aliases expand to more than 10000 values; write the values out"


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "top_k=" + "9" * 5000 + "x"],
        ["--device", "gpu" * 5000],
        ["--set", "measures=[" + ", ".join(["attention"] * 5000) + ", saliency]"],
        ["--set", "name=" + "[" * 3 + "x" * 10000 + "]" * 3],
    ],
)
def test_error_lines_quote_values_at_most_about_200_characters(tmp_path: Path, args: list[str]) -> None:
    line = one_line_error(invoke("run", *args, "-o", str(tmp_path / "out")))
    assert len(line) < 500, len(line)


def test_huge_value_in_a_config_file_is_quoted_short(tmp_path: Path) -> None:
    file = tmp_path / "run.yaml"
    file.write_text("storage: " + "x" * 100_000 + "\n", encoding="utf-8")
    line = one_line_error(invoke("run", str(file), "-o", str(tmp_path / "out")))
    assert line.startswith(f"error: config '{file}': key 'storage':") and len(line) < 500, line[:600]


def test_reader_errors_quote_field_lists_short(tmp_path: Path) -> None:
    file = tmp_path / "corpus.jsonl"
    file.write_text(json.dumps({f"field{i}" * 20: i for i in range(2000)}) + "\n", encoding="utf-8")
    line = one_line_error(invoke("run", "-i", str(file), "-o", str(tmp_path / "out")))
    assert line.startswith(f"error: {file} line 1: no field 'text' (fields: field0") and len(line) < 500, line[:600]


# --- 9, 10. --set key=null applies; an error names the option that gave the value --------------------------


NON_NULL = {"name": "named", "max_length": 16, "similarity_rows": 2, "limit": 5, "threads": 1, "address": "auto",
            "id_field": "id", "text_pair_field": "pair", "value_zeroing_layers": [0]}


def nullable_keys() -> list[str]:
    return [key for key, field in RunConfig.model_fields.items() if type(None) in typing.get_args(field.annotation)]


def test_every_nullable_key_has_a_non_null_example() -> None:
    assert sorted(nullable_keys()) == sorted(NON_NULL)


def settings_from_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> RunConfig:
    """The RunConfig `extractor run ARGS` would run with (the extraction itself is replaced)."""
    import extractor.api

    seen: list[RunConfig] = []

    def record(settings: RunConfig, **kwargs: object) -> dict:
        seen.append(settings)
        return {}

    monkeypatch.setattr(extractor.api, "run_extraction", record)
    result = invoke("run", *args)
    assert result.exit_code == 0, (result.output, result.exception)
    return seen[0]


@pytest.mark.parametrize("key", sorted(NON_NULL))
@pytest.mark.parametrize("null", ["null", "~", ""])
def test_set_key_null_overrides_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, null: str) -> None:
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump(NON_NULL), encoding="utf-8")
    assert getattr(settings_from_cli(monkeypatch, str(file)), key) == NON_NULL[key]
    settings = settings_from_cli(monkeypatch, str(file), "--set", f"{key}={null}")
    assert getattr(settings, key) is None
    assert all(getattr(settings, k) == v for k, v in NON_NULL.items() if k != key)


def test_set_similarity_rows_null_over_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert RunConfig().similarity_rows == 4
    settings = settings_from_cli(monkeypatch, "--set", "similarity_rows=null", "-o", "unused")
    assert settings.similarity_rows is None


def test_set_null_on_a_key_that_needs_a_value_is_one_line(tmp_path: Path) -> None:
    line = one_line_error(invoke("run", "--set", "top_k=null", "-o", str(tmp_path / "out")))
    assert line == "error: --set: key 'top_k': Input should be a valid integer (got None)"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--top-k", "0"], "error: --top-k: key 'top_k': Input should be greater than or equal to 1 (got 0)"),
        (["--batch-size", "0"], "error: --batch-size: key 'batch_size': Input should be greater than or equal to 1 (got 0)"),
        (["--max-length", "4"], "error: --max-length: key 'max_length': Input should be greater than or equal to 8 (got 4)"),
        (["--measures", "attention,saliency"], "error: --measures: key 'measures': unknown measure 'saliency'; choose from: attention, value_norm, layer_value_norm, rollout, alti, globenc, alti_layer, globenc_layer, value_zeroing (got ['attention', 'saliency'])"),
        (["--set", "top_k=0"], "error: --set: key 'top_k': Input should be greater than or equal to 1 (got 0)"),
        # an option overrides --set, and the option is what the error names
        (["--set", "top_k=3", "--top-k", "0"], "error: --top-k: key 'top_k': Input should be greater than or equal to 1 (got 0)"),
    ],
)
def test_errors_name_the_option_that_gave_the_value(tmp_path: Path, args: list[str], expected: str) -> None:
    assert one_line_error(invoke("run", *args, "-o", str(tmp_path / "out"))) == expected


def test_errors_name_the_config_file_for_its_own_keys(tmp_path: Path) -> None:
    file = tmp_path / "run.yaml"
    file.write_text("top_k: 0\n", encoding="utf-8")
    line = one_line_error(invoke("run", str(file), "--batch-size", "2", "-o", str(tmp_path / "out")))
    assert line == f"error: config '{file}': key 'top_k': Input should be greater than or equal to 1 (got 0)"
