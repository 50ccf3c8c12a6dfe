"""`extractor query`: DuckDB over a run's Parquet files, with one view per table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .errors import UserError
from .outputs import association_files, damaged_files, read_manifest

VIEWS = {
    "documents": "documents.parquet",
    "tokens": "tokens.parquet",
    "words": "words.parquet",
    "verification": "verification.parquet",
    "heads": "heads.parquet",
    "head_similarity": "head_similarity.parquet",
}


def connect(output_dir: str | Path):  # noqa: ANN201 - duckdb connection
    """A DuckDB connection with views `associations`, `tokens`, `words`, `documents`, `verification`, `heads`, `head_similarity`."""
    import duckdb

    folder = Path(output_dir)
    read_manifest(folder)  # a clear error when this is not a run's output folder
    con = duckdb.connect()
    parts = association_files(folder)
    if parts:
        files = ", ".join(f"'{p.as_posix()}'" for p in parts)
        con.execute(f"CREATE VIEW associations AS SELECT * FROM read_parquet([{files}])")
    for view, name in VIEWS.items():
        if (folder / name).is_file():
            con.execute(f"CREATE VIEW {view} AS SELECT * FROM read_parquet('{(folder / name).as_posix()}')")
    return con


def run_query(output_dir: str | Path, sql: str) -> pd.DataFrame:
    import duckdb

    con = connect(output_dir)
    try:
        return con.execute(sql).fetchdf()
    except duckdb.Error as exc:
        if damaged_files(output_dir):
            raise  # `outputs.reading` names the damaged file
        raise UserError(f"query failed: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()
