"""The benchmark (`python -m extractor.bench`): throughput ratios side by side and a per-step profile. May import
the whole package."""
