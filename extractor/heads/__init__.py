"""Per-head statistics over documents: metrics and detectors (`metrics`), head similarity, run-vs-run differences
(data only). May import `core` and `attribution`."""
