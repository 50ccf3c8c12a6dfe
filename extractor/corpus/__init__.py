"""Corpus runs: config, readers, batching, tables, storage, the run folder (`run_folder`: the one reader of a run),
the run (`run`, `extraction`, `manifest`) and its engines (`engines`: a registry). May import `core`,
`attribution` and `heads`; never plotting."""
