"""Qwen2: Llama's layout with biases on q_proj, k_proj and v_proj (read by `split_linear`), none on o_proj.

Sliding windows, when `use_sliding_window` is on, apply to the layers Hugging Face marks "sliding_attention";
each such attention module carries its `sliding_window` (the shared default hook reads it).
"""

from __future__ import annotations

from extractor.core.adapters.rotary import RotaryAdapter


class Qwen2Adapter(RotaryAdapter):
    model_types = ("qwen2",)
    family = "qwen2"
