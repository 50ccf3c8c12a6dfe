"""Run configuration as validated data. YAML file → `--set key=value` overrides → flags → `RunConfig`.

Unknown keys and bad values are refused with the key and the allowed values named.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError
from .measures import MEASURES, RUN_MEASURES
from .verify import DEFAULT_ATOL

BF16_ATOL = 2e-2  # verification tolerance for dtype bfloat16 (float32 uses DEFAULT_ATOL, 1e-5)


def default_atol(dtype: str) -> float:
    """The verification tolerance that fits `dtype` when the user gives none."""
    return BF16_ATOL if dtype == "bfloat16" else DEFAULT_ATOL
Measure = Literal["attention", "value_norm", "layer_value_norm", "rollout", "alti", "globenc", "value_zeroing"]


class RunConfig(BaseModel):
    """Everything `extractor run` needs. Each field is documented in configs/default.yaml."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str | None = None  # run name; defaults to the output folder's name
    model: str = "minilm"  # Hub id, save_pretrained folder, or 'minilm' (bundled)
    input: str = "data/sample.txt"  # .txt | .jsonl | .csv | .tsv | .parquet | '-' (stdin)
    input_format: Literal["auto", "txt", "jsonl", "csv", "tsv", "parquet"] = "auto"
    text_field: str = "text"  # .jsonl: the field holding the text
    text_column: str = "text"  # .csv/.tsv/.parquet: the column holding the text
    output: str = "outputs/run"
    batch_size: int = Field(32, ge=1)  # most documents in one forward pass
    token_budget: int = Field(8192, ge=16)  # most padded tokens (batch × longest) in one forward pass
    attention_budget: int = Field(1 << 20, ge=1)  # most attention cells per head (batch × longest²): bounds memory
    buffer_size: int = Field(512, ge=1)  # documents read ahead and sorted by length before batching
    bucketing: bool = True  # sort by length within the buffer (False: original order)
    max_length: int | None = Field(None, ge=8)  # tokens per document (window) incl. specials; None = model limit
    long_documents: Literal["truncate", "window"] = "truncate"
    window_stride: int = Field(64, ge=0)  # window mode: tokens shared by consecutive windows
    storage: Literal["topk", "dense", "threshold", "summary"] = "topk"
    top_k: int = Field(8, ge=1)  # storage 'topk': keys kept per query row and head
    threshold: float = Field(0.05, ge=0.0)  # storage 'threshold': keep cells with weight ≥ this
    level: Literal["token", "word"] = "token"
    measures: list[Measure] = Field(default_factory=lambda: list(RUN_MEASURES))
    similarity_rows: int | None = Field(4, ge=1)  # query rows per document sampled for head similarity; None = all
    limit: int | None = Field(None, ge=1)  # read at most this many input records
    verify: str = "on"  # on | off | every:N (verify every Nth batch)
    atol: float = Field(DEFAULT_ATOL, gt=0.0)
    device: str = "cpu"  # cpu | cuda | cuda:N
    dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int | None = Field(None, ge=1)  # torch intra-op threads; None = torch's default
    plots: bool = True  # write the default figures at the end of the run
    report: bool = True  # write report.html at the end of the run
    engine: Literal["local", "ray"] = "local"
    address: str | None = None  # ray: 'auto' or ray://HOST:PORT; None starts a local instance
    workers: int = Field(2, ge=1)  # ray: worker actors

    @model_validator(mode="before")
    @classmethod
    def _dtype_tolerance(cls, values: Any) -> Any:
        """bfloat16 keeps ~3 significant digits: its default tolerance is BF16_ATOL unless atol is given."""
        if isinstance(values, dict) and values.get("dtype") == "bfloat16" and values.get("atol") is None:
            values = {**values, "atol": default_atol("bfloat16")}
        return values

    @field_validator("verify")
    @classmethod
    def _verify_spec(cls, value: str) -> str:
        if value in ("on", "off") or re.fullmatch(r"every:[1-9][0-9]*", value):
            return value
        raise ValueError("must be 'on', 'off' or 'every:N' with N ≥ 1")

    @field_validator("measures")
    @classmethod
    def _some_measures(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"give at least one of: {', '.join(MEASURES)}")
        return list(dict.fromkeys(value))

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if re.fullmatch(r"cpu|cuda(:[0-9]+)?|mps", value):
            return value
        raise ValueError("must be cpu, cuda, cuda:N or mps")

    @property
    def verify_every(self) -> int:
        """0 = never, 1 = every batch, N = every Nth batch."""
        if self.verify == "off":
            return 0
        return 1 if self.verify == "on" else int(self.verify.split(":")[1])

    @property
    def run_name(self) -> str:
        return self.name or Path(self.output).name


def _describe(error: dict[str, Any]) -> str:
    field = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key '{field}'; allowed keys: {', '.join(RunConfig.model_fields)}"
    got = error.get("input")
    message = error["msg"].removeprefix("Value error, ")
    return f"key '{field}': {message} (got {got!r})"


def validate_config(values: dict[str, Any], origin: str = "config") -> RunConfig:
    """Validate raw values; a `UserError` names the first bad key and what is allowed."""
    try:
        return RunConfig(**values)
    except ValidationError as exc:
        raise UserError(f"{origin}: {_describe(exc.errors()[0])}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"config file '{path}'{where}: invalid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise UserError(f"config file '{path}' is not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must be a mapping of key: value")
    return data


def parse_set(assignments: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs; values are parsed as YAML scalars/lists (`top_k=5`, `measures=[attention]`)."""
    values: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set '{item}' must look like key=value")
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            values[key.strip()] = raw
    return values


def load_config(path: str | None, overrides: dict[str, Any]) -> RunConfig:
    """Config file (optional), then overrides (from --set and flags; None values are ignored)."""
    values = read_yaml(path) if path else {}
    origin = f"config '{path}'" if path else "options"
    values.update({k: v for k, v in overrides.items() if v is not None})
    return validate_config(values, origin)
