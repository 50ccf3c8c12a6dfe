"""Read-only DuckDB over Parquet files: what `extractor query` and `RunFolder.sql` run on.

Queries cannot touch the file system: the views read the Parquet files through pyarrow, and DuckDB itself
may only spill into its own temporary directory, so `COPY ... TO`, `ATTACH` or `read_csv('/etc/...')` fail.
Which files a run folder holds is `extractor.corpus.run_folder`'s knowledge (`RunFolder.views`).
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from extractor.errors import UserError, first_line


def read_only_connection(views: Mapping[str, Sequence[Path]]) -> Any:  # duckdb.DuckDBPyConnection
    """A DuckDB connection with one view per entry (name → its Parquet files), locked so that SQL reads and
    writes no file (see the module docstring)."""
    import duckdb
    import pyarrow.dataset as ds

    # DuckDB creates this folder only if a query spills to disk, and removes it when the connection closes.
    spill = Path(tempfile.gettempdir()) / f"extractor-query-{uuid.uuid4().hex}"
    con = duckdb.connect(config={"temp_directory": str(spill)})
    quoted = str(spill).replace("'", "''")
    con.execute(f"SET allowed_directories = ['{quoted}']")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")  # SQL cannot turn the settings above back
    for view, files in views.items():
        con.register(view, ds.dataset([Path(f).as_posix() for f in files], format="parquet"))
    return con


def fetch(con: Any, sql: str, damaged: Callable[[], bool]) -> pd.DataFrame:
    """Run `sql` on `con` → its rows (no rows for a statement that returns none). Mistakes are one-line
    UserErrors; a failure while some file is `damaged()` is raised as it is (`run_folder.reading` names it)."""
    import duckdb

    try:
        if not con.extract_statements(sql):
            raise UserError("the query is empty; give SQL such as 'SELECT * FROM documents LIMIT 5'")
        result = con.execute(sql)
        return result.fetchdf() if result.description is not None else pd.DataFrame()
    except duckdb.PermissionException as exc:
        raise UserError(f"query failed: {first_line(exc)} (queries read the run's tables only)") from None
    except duckdb.Error as exc:
        if damaged():
            raise
        raise UserError(f"query failed: {first_line(exc)}") from None
