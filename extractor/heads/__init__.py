"""Per-head statistics over documents: metrics and detectors, head similarity, run-vs-run differences (data only)."""
