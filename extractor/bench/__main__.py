"""`python -m extractor.bench`: the benchmark (see extractor/bench/throughput.py for its options)."""

from extractor.bench.throughput import main

main()
