"""Model access and the maths, torch only: loading, one adapter per family, capture hooks, the one recomputation,
verification, tokens and words. Imports nothing else of the package (but `errors`, `version`)."""
