"""Run configuration: shipped configs validate; a bad key or value is refused with the key and the fix named.

The CLI checks run `extractor run` through Typer's runner: a config error must print exactly one line
`error: ...` on stderr and exit 2, before any model is loaded or any output written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from extractor.cli import app
from extractor.corpus.config import RunConfig, load_config, parse_set, read_yaml, validate_config
from extractor.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ["default.yaml", "bert-base.yaml", "gpt2.yaml"]


def one_line_error(args: list[str]) -> str:
    """Run the CLI; check it failed as a user error (exit 2, one `error:` line, no traceback)."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate_and_are_commented(name: str) -> None:
    path = REPO_ROOT / "configs" / name
    config = load_config(str(path), {})
    assert isinstance(config, RunConfig)
    text = path.read_text(encoding="utf-8")
    header = [line for line in text.splitlines()[:3] if line.startswith("#")]
    assert len(header) >= 2, f"{name} should open with comments saying what it runs and how"


def test_default_yaml_equals_the_built_in_defaults_apart_from_the_output() -> None:
    values = read_yaml(REPO_ROOT / "configs" / "default.yaml")
    defaults = RunConfig().model_dump()
    for key, value in values.items():
        if key != "output":
            assert defaults[key] == value, key


def test_overrides_replace_file_values_and_none_is_ignored(tmp_path: Path) -> None:
    file = tmp_path / "run.yaml"
    file.write_text("top_k: 3\nstorage: dense\nverify: every:4\n", encoding="utf-8")
    config = load_config(str(file), {"top_k": 5, "storage": None})
    assert (config.top_k, config.storage, config.verify, config.verify_every) == (5, "dense", "every:4", 4)
    assert RunConfig(verify="off").verify_every == 0 and RunConfig().verify_every == 1
    assert RunConfig(output="outputs/abc").run_name == "abc"


def test_set_values_are_parsed_as_yaml() -> None:
    assert parse_set(
        ["top_k=5", "measures=[attention, rollout]", "max_length=", "name=my run", "verify=every:3"]
    ) == {
        "top_k": 5,
        "measures": ["attention", "rollout"],
        "max_length": None,
        "name": "my run",
        "verify": "every:3",
    }


@pytest.mark.parametrize("item", ["top_k", "=5", " =x"])
def test_set_without_key_value_is_refused(item: str) -> None:
    with pytest.raises(UserError, match=f"--set '{item}' must look like key=value"):
        parse_set([item])


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"stroage": "dense"}, r"unknown key 'stroage'; allowed keys: name, model, input, .*storage"),
        ({"storage": "all"}, r"key 'storage': .*'topk', 'dense', 'threshold' or 'summary' \(got 'all'\)"),
        ({"level": "sentence"}, r"key 'level': .*'token' or 'word'"),
        ({"long_documents": "split"}, r"key 'long_documents': .*'truncate' or 'window'"),
        (
            {"verify": "every:0"},
            r"key 'verify': must be 'on', 'off' or 'every:N' with N ≥ 1 \(got 'every:0'\)",
        ),
        ({"verify": "sometimes"}, r"key 'verify': must be 'on', 'off' or 'every:N'"),
        ({"measures": ["attention", "saliency"]}, r"key 'measures': unknown measure 'saliency'; choose from: attention, value_norm"),
        ({"measures": []}, r"key 'measures': give at least one of: attention, value_norm"),
        ({"batch_size": 0}, r"key 'batch_size': .*greater than or equal to 1"),
        ({"batch_size": "many"}, r"key 'batch_size': .*valid integer"),
        ({"max_length": 4}, r"key 'max_length': .*greater than or equal to 8"),
        ({"threshold": -0.1}, r"key 'threshold'"),
        ({"device": "gpu"}, r"key 'device': must be cpu, cuda, cuda:N or mps"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(values: dict, expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        validate_config(values)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text("model: minilm\nstorage: topk\ntop_k: [1, 2\nlevel: token\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.yaml' line \d+: invalid YAML"):
        read_yaml(file)
    with pytest.raises(yaml.YAMLError):  # the file really is invalid
        yaml.safe_load(file.read_text())
    tab = tmp_path / "tab.yaml"
    tab.write_text("model: minilm\n\ttop_k: 3\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"tab\.yaml' line 2: invalid YAML"):
        read_yaml(tab)


def test_config_must_be_a_mapping(tmp_path: Path) -> None:
    file = tmp_path / "list.yaml"
    file.write_text("- model\n- input\n", encoding="utf-8")
    with pytest.raises(UserError, match="must be a mapping of key: value"):
        read_yaml(file)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n", encoding="utf-8")
    assert load_config(str(empty), {}) == RunConfig()


# -- through the CLI ------------------------------------------------------------------------------------


def test_cli_unknown_key_in_config_file(tmp_path: Path) -> None:
    file = tmp_path / "run.yaml"
    file.write_text("model: minilm\ntopk: 3\n", encoding="utf-8")
    line = one_line_error(["run", str(file), "-o", str(tmp_path / "out")])
    assert f"config '{file}': unknown key 'topk'" in line and "top_k" in line
    assert not (tmp_path / "out").exists()


def test_cli_bad_storage_flag_names_allowed_values(tmp_path: Path) -> None:
    line = one_line_error(["run", "--storage", "everything", "-o", str(tmp_path / "out")])
    assert (
        "key 'storage'" in line
        and "'topk', 'dense', 'threshold' or 'summary'" in line
        and "'everything'" in line
    )
    assert not (tmp_path / "out").exists()


def test_cli_bad_verify_spec(tmp_path: Path) -> None:
    line = one_line_error(["run", "--verify", "every:x", "-o", str(tmp_path / "out")])
    assert "key 'verify'" in line and "every:N" in line


def test_cli_bad_set_syntax(tmp_path: Path) -> None:
    line = one_line_error(["run", "--set", "top_k", "-o", str(tmp_path / "out")])
    assert line == "error: --set 'top_k' must look like key=value"


def test_cli_unknown_set_key(tmp_path: Path) -> None:
    line = one_line_error(["run", "--set", "colour=blue", "-o", str(tmp_path / "out")])
    assert "unknown key 'colour'; allowed keys:" in line


def test_cli_invalid_yaml_with_line_number(tmp_path: Path) -> None:
    file = tmp_path / "run.yaml"
    file.write_text("model: minilm\nmeasures: [attention\n", encoding="utf-8")
    line = one_line_error(["run", str(file)])
    assert f"config file '{file}' line" in line and "invalid YAML" in line


def test_cli_missing_config_file(tmp_path: Path) -> None:
    line = one_line_error(["run", str(tmp_path / "nope.yaml")])
    assert line == f"error: config file '{tmp_path / 'nope.yaml'}' does not exist"
