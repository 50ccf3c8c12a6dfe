"""`extractor query`: DuckDB over a run's Parquet files, with one view per table.

Queries cannot touch the file system: the views read the Parquet files through pyarrow, and DuckDB itself
may only spill into its own temporary directory, so `COPY ... TO`, `ATTACH` or `read_csv('/etc/...')` fail.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import pandas as pd

from extractor.corpus.run_folder import association_files, damaged_files, read_manifest
from extractor.errors import UserError, first_line

VIEWS = {
    "documents": "documents.parquet",
    "tokens": "tokens.parquet",
    "words": "words.parquet",
    "verification": "verification.parquet",
    "heads": "heads.parquet",
    "head_similarity": "head_similarity.parquet",
    "agreement": "agreement.parquet",
}


def connect(output_dir: str | Path):  # noqa: ANN201 - duckdb connection
    """A DuckDB connection with views `associations`, `tokens`, `words`, `documents`, `verification`, `heads`,
    `head_similarity`, locked so that SQL reads and writes no file (see the module docstring)."""
    import duckdb
    import pyarrow.dataset as ds

    folder = Path(output_dir)
    read_manifest(folder)  # a clear error when this is not a run's output folder
    # DuckDB creates this folder only if a query spills to disk, and removes it when the connection closes.
    spill = Path(tempfile.gettempdir()) / f"extractor-query-{uuid.uuid4().hex}"
    con = duckdb.connect(config={"temp_directory": str(spill)})
    quoted = str(spill).replace("'", "''")
    con.execute(f"SET allowed_directories = ['{quoted}']")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")  # SQL cannot turn the settings above back
    parts = association_files(folder)
    if parts:
        con.register("associations", ds.dataset([p.as_posix() for p in parts], format="parquet"))
    for view, name in VIEWS.items():
        if (folder / name).is_file():
            con.register(view, ds.dataset((folder / name).as_posix(), format="parquet"))
    return con


def run_query(output_dir: str | Path, sql: str) -> pd.DataFrame:
    import duckdb

    con = connect(output_dir)
    try:
        if not con.extract_statements(sql):
            raise UserError("the query is empty; give SQL such as 'SELECT * FROM documents LIMIT 5'")
        result = con.execute(sql)
        return result.fetchdf() if result.description is not None else pd.DataFrame()
    except duckdb.PermissionException as exc:
        raise UserError(f"query failed: {first_line(exc)} (queries read the run's tables only)") from None
    except duckdb.Error as exc:
        if damaged_files(output_dir):
            raise  # `outputs.reading` names the damaged file
        raise UserError(f"query failed: {first_line(exc)}") from None
    finally:
        con.close()
