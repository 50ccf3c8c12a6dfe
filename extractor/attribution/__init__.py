"""Association measures: the registry (`measures.REGISTRY`, one entry per measure), one module per measure's maths,
the attribution pass (ALTI, GlobEnc, value zeroing), rank agreement, and `analysis`: one batch through capture →
recompute → verify → measures. May import `core`."""
