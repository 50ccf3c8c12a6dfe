"""Read-only DuckDB over Parquet files: what `extractor query` and `RunFolder.sql` run on.

Queries cannot touch the file system: the views read the Parquet files through pyarrow, and DuckDB itself
may only spill into its own temporary directory, so `COPY ... TO`, `ATTACH` or `read_csv('/etc/...')` fail.
Which files a run folder holds is `extractor.corpus.run_folder`'s knowledge (`RunFolder.views`).
"""

from __future__ import annotations

import re
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from extractor.errors import UserError, first_line


def readable_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` with float16 (also inside lists) read as float32: DuckDB has no half-precision type."""
    def widened(kind: pa.DataType) -> pa.DataType:
        if kind == pa.float16():
            return pa.float32()
        if pa.types.is_list(kind):
            return pa.list_(widened(kind.value_type))
        return kind

    return pa.schema([f.with_type(widened(f.type)) for f in schema], metadata=schema.metadata)


def read_only_connection(views: Mapping[str, Sequence[Path]], derived: Mapping[str, str] | None = None,
                         ) -> Any:  # duckdb.DuckDBPyConnection
    """A DuckDB connection with one view per entry (name → its Parquet files), plus `derived` views (name → a
    query over those), locked so that SQL reads and writes no file (see the module docstring)."""
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
        paths = [Path(f).as_posix() for f in files]
        schema = readable_schema(ds.dataset(paths, format="parquet").schema)
        con.register(view, ds.dataset(paths, format="parquet", schema=schema))
    for view, sql in (derived or {}).items():
        con.execute(f"CREATE VIEW {view} AS {sql}")
    return con


def fetch(con: Any, sql: str, damaged: Callable[[], bool], missing: Callable[[str], str | None] = lambda _: None,
          ) -> pd.DataFrame:
    """Run `sql` on `con` → its rows (no rows for a statement that returns none); errors as `mapped_errors`."""
    with mapped_errors(damaged, missing):
        relation = run_sql(con, sql)
        return relation.df() if relation is not None else pd.DataFrame()


def stream(con: Any, sql: str, damaged: Callable[[], bool], missing: Callable[[str], str | None] = lambda _: None,
           rows: int = 1 << 16) -> Iterator[pa.RecordBatch]:
    """Run `sql` on `con` and yield its rows `rows` at a time (nothing for a statement that returns none), so a
    large result never sits in memory whole; errors (also those met while reading) as `mapped_errors`."""
    with mapped_errors(damaged, missing):
        relation = run_sql(con, sql)
        if relation is None:
            return
        yield from relation.to_arrow_reader(rows)


def run_sql(con: Any, sql: str) -> Any:
    """A DuckDB relation for a query (read lazily), None for a statement that returns no rows."""
    if not con.extract_statements(sql):
        raise UserError("the query is empty; give SQL such as 'SELECT * FROM documents LIMIT 5'")
    return con.sql(sql)


@contextmanager
def mapped_errors(damaged: Callable[[], bool], missing: Callable[[str], str | None]) -> Iterator[None]:
    """DuckDB's errors as one-line UserErrors (`missing(view)` explains a view the run lacks); a failure while
    some file is `damaged()` is raised as it is (`run_folder.reading` names the file)."""
    import duckdb

    try:
        yield
    except duckdb.PermissionException as exc:
        raise UserError(f"query failed: {first_line(exc)} (queries read the run's tables only)") from None
    except duckdb.CatalogException as exc:
        name = re.search(r"Table with name (\w+) does not exist", str(exc))
        reason = missing(name.group(1)) if name else None
        raise UserError(f"query failed: {first_line(exc)}" + (f" ({reason})" if reason else "")) from None
    except duckdb.Error as exc:
        if damaged():
            raise
        raise UserError(f"query failed: {first_line(exc)}") from None
