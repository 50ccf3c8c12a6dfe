"""Run configuration as validated data. YAML file → `--set key=value` overrides → flags → `RunConfig`.

Unknown keys and bad values are refused with the key, where it came from (file, --set, option) and the
allowed values named; the value itself is quoted at most QUOTE_LIMIT characters long.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from extractor.attribution.measures import MEASURES, RUN_MEASURES
from extractor.core.tolerance import DEFAULT_ATOL, default_atol
from extractor.corpus.engines import ENGINES
from extractor.corpus.readers import RecordKeys
from extractor.corpus.storage import DEFAULT_COMPRESSION, DOCUMENT_SCHEMA, Compression
from extractor.errors import UserError, quoted, shortened

FigureFormat = Literal["png", "svg"]


def comma_separated(text: str) -> list[str]:
    """'a, b,,c' → ['a', 'b', 'c']: how list settings are given on the command line (`--keep-fields a,b`)."""
    return [item.strip() for item in text.split(",") if item.strip()]


class RunConfig(BaseModel):
    """Everything `extractor run` needs. Each field is documented in configs/default.yaml."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str | None = Field(None, description="Run name; defaults to the output folder's name.")
    model: str = Field("minilm", description="Hub id, save_pretrained folder, .gguf file, or minilm / smollm2 (bundled, offline).")
    input: str = Field("data/sample.txt", description="Corpus: .txt .jsonl .csv .tsv .parquet, or '-' for stdin.")
    input_format: Literal["auto", "txt", "jsonl", "csv", "tsv", "parquet"] = Field(
        "auto", description="Input format; auto = from the file's suffix.")
    text_field: str = Field("text", description=".jsonl: the field holding the text.")
    text_column: str = Field("text", description=".csv/.tsv/.parquet: the column holding the text.")
    text_pair_field: str | None = Field(None, description="Sentence pairs: the field (.jsonl) or column (.csv/.tsv/.parquet) holding each record's second text, tokenised as tokenizer(text, text_pair) (BERT: [CLS] A [SEP] B [SEP]); encoders only.")
    id_field: str | None = Field(None, description="The field (.jsonl) or column (.csv/.tsv/.parquet) holding each record's own id: documents.parquet source_id (text; null where a record has none).")
    keep_fields: list[str] = Field(default_factory=list, description="Comma-separated fields (.jsonl) or columns (.csv/.tsv/.parquet) copied into documents.parquet, one text column each (labels to group heads by; null where a record has none).")
    output: str = Field("outputs/run", description="Output folder.")
    batch_size: int = Field(32, ge=1, description="Most documents in one forward pass.")
    token_budget: int = Field(8192, ge=16, description="Most padded tokens (batch × longest) in one forward pass.")
    attention_budget: int = Field(1 << 20, ge=1, description="Most attention cells per head (batch × longest²): bounds memory.")
    buffer_size: int = Field(512, ge=1, description="Documents read ahead and sorted by length before batching.")
    bucketing: bool = Field(True, description="Sort by length within the read-ahead buffer (off: original order).")
    max_length: int | None = Field(None, ge=8, description="Tokens per document (or window) incl. specials; default: the model's limit.")
    long_documents: Literal["truncate", "window"] = Field("truncate", description="Documents over max_length: truncate, or cover with overlapping windows.")
    window_stride: int = Field(64, ge=0, description="Window mode: tokens shared by consecutive windows.")
    storage: Literal["topk", "dense", "threshold", "summary"] = Field("topk", description="Association rows kept: top-k keys per row, every cell, cells ≥ threshold, or none (per-head metrics only).")
    top_k: int = Field(8, ge=1, description="storage topk: keys kept per query row and head.")
    threshold: float = Field(0.05, ge=0.0, description="storage threshold: keep cells with weight ≥ this.")
    compression: Compression = Field(DEFAULT_COMPRESSION, description="Codec of the association parts: lz4 writes them 25–30% faster, zstd 13–16% smaller.")
    level: Literal["token", "word"] = Field("token", description="Positions of the tables: tokens, or words (mean over query pieces, sum over key pieces).")
    measures: list[str] = Field(default_factory=lambda: list(RUN_MEASURES), description="Association measures to store.")
    value_zeroing_layers: list[int] | None = Field(None, description="value_zeroing only for these layers (comma-separated, 0-based), e.g. 0,3,5; null = every layer. Other layers get no value_zeroing (null; no rows when it is the only layer measure).")
    value_zeroing_every: int = Field(1, ge=1, description="value_zeroing only for documents whose doc_id is a multiple of N (every Nth input record, starting with the first; all windows of a document alike); 1 = every document.")
    similarity_rows: int | None = Field(4, ge=1, description="Query rows per document sampled for head similarity; null = every row.")
    agreement: bool = Field(False, description="Write agreement.parquet: per layer, the rank agreement (Spearman per query row) of every pair of measures, value_zeroing being the intervention. Costs about n³ per document, layer and pair.")
    limit: int | None = Field(None, ge=1, description="Read at most this many input records.")
    verify: str = Field("on", description="on | off | every:N (verify every Nth batch against Hugging Face).")
    hf_compare_every: int = Field(10, ge=1, description="Verified batches run Hugging Face's sdpa kernel and are probed (q, k, v against the weights, the pattern against the kernel's z); the first and every Nth run the eager kernel and are compared with its output_attentions. 1 = every batch eager (slowest, strongest).")
    atol: float = Field(DEFAULT_ATOL, gt=0.0, description="Verification tolerance (max abs error); bfloat16 defaults to 2e-2.")
    device: str = Field("cpu", description="cpu | cuda | cuda:N | mps.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights and activations dtype.")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: torch's.")
    plots: bool = Field(True, description="Write the default figures at the end of the run.")
    plot_formats: list[FigureFormat] = Field(default_factory=lambda: list[FigureFormat](["png"]), min_length=1, description="Formats of the end-of-run figures (svg: vector, about twice a PNG's drawing time; `extractor plot` writes both).")
    report: bool = Field(True, description="Write report.html at the end of the run.")
    engine: str = Field("local", description="Where batches run: " + ", ".join(ENGINES) + ".")
    address: str | None = Field(None, description="ray: 'auto' or HOST:PORT (the head's GCS port); default: $RAY_ADDRESS, else a local instance.")
    workers: int = Field(2, ge=1, description="ray: worker actors.")
    worker_resources: dict[str, float] = Field(default_factory=dict, description="ray: custom resources each worker needs, NAME=AMOUNT[,NAME=AMOUNT] (a resource of 1 per node: one worker per node).")

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
        unknown = [m for m in value if m not in MEASURES]
        if unknown:
            raise ValueError(f"unknown measure {', '.join(map(repr, unknown))}; choose from: {', '.join(MEASURES)}")
        if not value:
            raise ValueError(f"give at least one of: {', '.join(MEASURES)}")
        return list(dict.fromkeys(value))

    @field_validator("value_zeroing_layers", mode="before")
    @classmethod
    def _layer_list(cls, value: Any) -> Any:
        """`--value-zeroing-layers 0,3,5` gives one comma-separated string; `--set value_zeroing_layers=3` a number."""
        if isinstance(value, str):
            return comma_separated(value)
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("value_zeroing_layers")
    @classmethod
    def _layer_indices(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("give at least one layer (0-based), or null for every layer")
        if any(layer < 0 for layer in value):
            raise ValueError("layers are 0-based indices ≥ 0")
        return sorted(set(value))

    @field_validator("keep_fields", "plot_formats", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        """`--keep-fields label,topic`, `--plot-formats png,svg` (and `--set keep_fields=label`) give one
        comma-separated string."""
        return comma_separated(value) if isinstance(value, str) else value

    @field_validator("keep_fields")
    @classmethod
    def _kept_names(cls, value: list[str]) -> list[str]:
        taken = [name for name in value if name in DOCUMENT_SCHEMA.names]
        if taken:
            raise ValueError(f"{', '.join(map(repr, taken))} is already a documents.parquet column "
                             f"({', '.join(DOCUMENT_SCHEMA.names)}); keep other fields (the id goes in id_field)")
        return list(dict.fromkeys(value))

    @field_validator("engine")
    @classmethod
    def _engine(cls, value: str) -> str:
        if value not in ENGINES:
            raise ValueError(f"must be one of: {', '.join(ENGINES)}")
        return value

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and value.strip().lower().startswith("ray://"):
            raise ValueError(
                "Ray Client (ray://) is not supported: the driver must run on a node of the cluster (it locks and "
                "folds the output folder the workers write); run extractor there with --address auto or HOST:PORT"
            )
        return value

    @field_validator("worker_resources", mode="before")
    @classmethod
    def _resources(cls, value: Any) -> Any:
        """`--worker-resources slot=1,gpu_node=0.5` (the CLI hands over text) or a mapping (YAML, --set)."""
        if not isinstance(value, str):
            return value
        resources: dict[str, str] = {}
        for item in filter(None, (i.strip() for i in value.split(","))):
            name, sep, amount = item.partition("=")
            if not sep or not name.strip():
                raise ValueError("must look like NAME=AMOUNT[,NAME=AMOUNT], e.g. worker_slot=1")
            resources[name.strip()] = amount.strip()
        return resources

    @field_validator("worker_resources")
    @classmethod
    def _positive_resources(cls, value: dict[str, float]) -> dict[str, float]:
        if any(amount <= 0 for amount in value.values()):
            raise ValueError("every amount must be > 0")
        return value

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
    def record_keys(self) -> RecordKeys:
        """The input fields or columns read besides the text."""
        return RecordKeys(self.text_pair_field, self.id_field, tuple(self.keep_fields))

    @property
    def run_name(self) -> str:
        return self.name or Path(self.output).name


MAX_YAML_VALUES = 10_000  # a run config holds ~35 keys: far more values once aliases are expanded is a YAML bomb


def _describe(error: ErrorDetails) -> str:
    field = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key {quoted(field)}; allowed keys: {', '.join(RunConfig.model_fields)}"
    message = error["msg"].removeprefix("Value error, ")
    return f"key {quoted(field)}: {message} (got {quoted(error.get('input'))})"


def option_name(key: str) -> str:
    """The `extractor run` option that sets config key `key` (top_k → --top-k)."""
    return "--" + key.replace("_", "-")


def validate_config(values: dict[str, Any], origin: str = "config", sources: dict[str, str] | None = None) -> RunConfig:
    """Validate raw values; a `UserError` names the first bad key, where its value came from (`sources`: key →
    '--top-k' or '--set'; `origin` for the others) and what is allowed."""
    try:
        return RunConfig(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = str(error["loc"][0]) if error["loc"] else ""
        raise UserError(f"{(sources or {}).get(key, origin)}: {_describe(error)}") from None


class _YamlBomb(ValueError):
    """A YAML document whose aliases expand to too many values, or that contains itself."""


def _expanded_values(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values `node` holds once every alias is expanded; shared nodes are counted once per use but
    measured once, so a billion-laughs document is measured in microseconds."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise _YamlBomb("an alias refers to a value that contains it")
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    else:
        children = []
    open_nodes.add(id(node))
    size = 1 + sum(_expanded_values(child, sizes, open_nodes) for child in children)
    open_nodes.discard(id(node))
    if size > MAX_YAML_VALUES:
        raise _YamlBomb(f"its aliases expand to more than {MAX_YAML_VALUES} values; write the values out")
    sizes[id(node)] = size
    return size


def _safe_load(text: str) -> Any:
    """yaml.safe_load, measuring the document before building it: raises `_YamlBomb` instead of expanding
    nested aliases (a few hundred bytes can expand to gigabytes)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_values(node, {}, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file '{path}' does not exist")
    try:
        data = _safe_load(file.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"config file '{path}'{where}: invalid YAML ({shortened(problem)})") from None
    except _YamlBomb as exc:
        raise UserError(f"config file '{path}': {exc}") from None
    except RecursionError:
        raise UserError(f"config file '{path}': values are nested too deeply") from None
    except UnicodeDecodeError:
        raise UserError(f"config file '{path}' is not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must be a mapping of key: value")
    return data


def parse_set(assignments: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs; values are parsed as YAML scalars/lists (`top_k=5`, `measures=[attention]`);
    `key=null` and `key=` give None, which `load_config` applies (unlike an option left out)."""
    values: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set '{shortened(item)}' must look like key=value")
        try:
            values[key.strip()] = _safe_load(raw) if raw.strip() else None
        except (yaml.YAMLError, RecursionError):
            values[key.strip()] = raw
        except _YamlBomb as exc:
            raise UserError(f"--set {quoted(key.strip())}: {exc}") from None
    return values


def load_config(path: str | None, overrides: dict[str, Any], sets: dict[str, Any] | None = None) -> RunConfig:
    """Config file (optional), then `sets` (from --set: a None value is an explicit null and is applied), then
    `overrides` (command-line options: None means the option was not given). A bad value is blamed on the
    option (`--top-k`), on --set, or on the config file it came from."""
    values = read_yaml(path) if path else {}
    origin = f"config '{path}'" if path else "options"
    given = {k: v for k, v in overrides.items() if v is not None}
    sources = {**dict.fromkeys(sets or {}, "--set"), **{k: option_name(k) for k in given}}
    values.update(sets or {})
    values.update(given)
    return validate_config(values, origin, sources)
