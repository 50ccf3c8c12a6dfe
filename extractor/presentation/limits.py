"""How much the HTML report embeds by default (a light module: the CLI reads it for its help)."""

DEFAULT_MAX_DOCS = 50
DEFAULT_MAX_BYTES = 5_000_000
