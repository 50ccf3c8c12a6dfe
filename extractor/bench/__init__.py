"""The benchmark (`python -m extractor.bench`): throughput ratios and a per-step profile, printed side by side."""
