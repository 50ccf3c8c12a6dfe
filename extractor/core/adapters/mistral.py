"""Mistral: Llama's layout; when `config.sliding_window` is set, every layer attends within that window."""

from __future__ import annotations

from torch import nn

from extractor.core.adapters.rotary import RotaryAdapter


class MistralAdapter(RotaryAdapter):
    model_types = ("mistral",)
    family = "mistral"

    def sliding_window(self, attention: nn.Module) -> int | None:
        # MistralModel builds a sliding-window mask for all layers whenever the config has a window.
        window = getattr(self.config, "sliding_window", None)
        return None if window is None else int(window)
