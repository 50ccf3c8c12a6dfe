"""Model-family facts live in the adapters, and the shared code that reads them gets each fact right.

Each test checks an adapter's fact against what Hugging Face's model or tokenizer actually does: the longest
input the position embeddings take, the markers the family's tokenizer writes, the pad token it falls back to.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from extractor.core.adapters import ADAPTERS, SUBWORD_MARKERS
from extractor.core.encode import encode, model_max_length, strip_subword_markers, tokenize
from extractor.core.models import LoadedModel, ModelLoadError, load_model

POSITIONS = 40  # fewer position embeddings than the tokenizers' 512, so that the model's limit is the one that binds


@pytest.mark.parametrize("family", ["bert", "roberta", "electra", "distilbert", "gpt2"])
def test_model_max_length_is_the_longest_input_the_model_takes(tiny_loaded: Callable[..., LoadedModel],
                                                               family: str) -> None:
    """RoBERTa numbers positions from pad id + 1 (its adapter's position_offset): one position fewer fits."""
    loaded = tiny_loaded(family, max_position_embeddings=POSITIONS)
    limit = model_max_length(loaded.tokenizer, loaded.model.config)
    inputs = encode(loaded.tokenizer, ["the animal was tired " * 50], max_length=limit).model_inputs
    assert inputs["input_ids"].shape == (1, limit)
    with torch.no_grad():
        loaded.model(**inputs)  # the longest input runs
        longer = {name: torch.cat([value, value[:, -1:]], dim=1) for name, value in inputs.items()}
        with pytest.raises((IndexError, RuntimeError)):
            loaded.model(**longer)  # one token more has no position embedding


WORDS = "the councilmen refused the demonstrators a permit because they feared violence"


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama-gqa1"])
def test_an_adapters_subword_markers_are_the_ones_its_tokenizer_writes(
    tiny_loaded: Callable[..., LoadedModel], rotary_loaded: Callable[[str], LoadedModel], family: str
) -> None:
    """Without its family's markers, a document's pieces spell its words back (the test models pair bert and
    distilbert with a WordPiece tokenizer, gpt2 and llama with a byte-level BPE one; roberta's is WordPiece too,
    so it is left out: its adapter names real RoBERTa's "Ġ")."""
    loaded = rotary_loaded(family) if family.startswith("llama") else tiny_loaded(family)
    doc = tokenize(loaded.tokenizer, [WORDS])[0]
    pieces = [t for t, special in zip(doc.tokens, doc.is_special, strict=True) if not special]
    assert len(pieces) > len(WORDS.split())  # some words are split, so continuation markers show up
    markers = loaded.adapter.subword_markers
    assert "".join(strip_subword_markers(t, markers) for t in pieces) == WORDS.replace(" ", "")
    assert set(markers) <= set(SUBWORD_MARKERS)


def test_the_shared_marker_list_is_every_adapters() -> None:
    assert set(SUBWORD_MARKERS) == {m for adapter in ADAPTERS for m in adapter.subword_markers}


def test_gpt2_pads_with_its_end_of_text_token(tiny_loaded: Callable[..., LoadedModel]) -> None:
    loaded = tiny_loaded("gpt2")
    assert loaded.adapter.pad_token_fallback == "eos_token"
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token is not None
    batch = encode(loaded.tokenizer, ["a", "a longer text"])
    assert batch.model_inputs["input_ids"][0, -1].item() == loaded.tokenizer.eos_token_id


def test_an_encoder_whose_tokenizer_has_no_pad_token_is_refused(tiny_model_dir: Callable[..., Path],
                                                                 tmp_path: Path) -> None:
    """BERT-family adapters name no fallback: a tokenizer without a pad token is one clear error, not a crash."""
    folder = shutil.copytree(tiny_model_dir("bert"), tmp_path / "bert-no-pad")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="tokenizer without a pad token"):
        load_model(str(folder))
