"""Corpus runs: config, readers, batching, tables, storage, the run-folder reader, the run and its engines."""
