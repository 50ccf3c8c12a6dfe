"""`extractor run --engine ray`: a local Ray instance (2 CPUs, two worker actors) against the local engine.

The runs use `buffer_size=16, batch_size=8, threads=1`: the Ray blocks are then exactly the local engine's
read-ahead buffers, so both engines form the same batches and must write the same tables. Faults are injected
through the engine's `EXTRACTOR_RAY_FAULT` hook: a worker fails right after committing a part of its block.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
import ray
from click.testing import Result
from typer.testing import CliRunner

from extractor.api import run_extraction
from extractor.cli import app
from extractor.corpus.config import RunConfig
from extractor.corpus.engines.ray import FAULT_ENV, INSTALL_HINT, split_blocks
from extractor.corpus.readers import SourceRecord
from extractor.errors import UserError

SAMPLE_CORPUS = Path(__file__).resolve().parent.parent / "data" / "sample.txt"

SETTINGS = ["plots=false", "report=false", "buffer_size=16", "batch_size=8", "threads=1", "model=minilm"]
FAULT_LIMIT = 32  # the fault tests read two blocks: block 0 (doc_id 0–15) and block 1 (doc_id 16–31)
KEYS = {
    "documents": ["doc_id"],
    "tokens": ["doc_id", "position"],
    "verification": ["layer", "head"],
    "associations": ["doc_id", "layer", "head", "query_pos", "key_pos"],
}


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[str]:
    """One small new Ray instance for the module (never a cluster already running on this machine); in-process
    runs join it instead of starting their own, other processes reach it at the address this returns."""
    context = ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2,
                       logging_level="WARNING")
    yield context.address_info["gcs_address"]
    ray.shutdown()


def run_args(output: Path, *options: str, engine: str = "local") -> list[str]:
    args = ["run", "--input", str(SAMPLE_CORPUS), "--output", str(output), "--quiet", "--engine", engine]
    for setting in SETTINGS:
        args += ["--set", setting]
    if engine == "ray":
        args += ["--workers", "2"]
    return [*args, *options]


def run_cli(output: Path, *options: str, engine: str = "local") -> Result:
    """`extractor run` through the CLI runner, in this process; returns the click result."""
    return CliRunner().invoke(app, run_args(output, *options, engine=engine))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the local engine over the whole sample corpus."""
    output = tmp_path_factory.mktemp("local")
    result = run_cli(output)
    assert result.exit_code == 0, result.output
    return output


@pytest.fixture
def faults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[Path]]:
    """`faults((block, times, kind), ...)`: the worker on `block` fails `times` times ('raise' or 'exit')
    right after committing a part of it; returns each fault's marker folder (one file per failure)."""

    def arm(*specs: tuple[int, int, str]) -> list[Path]:
        folders = [tmp_path / f"faults-{block}" for block, _, _ in specs]
        spec = [{"block": block, "times": times, "kind": kind, "markers": str(folder)}
                for (block, times, kind), folder in zip(specs, folders, strict=True)]
        monkeypatch.setenv(FAULT_ENV, json.dumps(spec))
        return folders

    return arm


def table(output: Path, name: str, limit: int | None = None) -> pd.DataFrame:
    """A table of a finished run (associations: every part), sorted by its key, cut to doc_id < limit."""
    path = output / "associations" if name == "associations" else output / f"{name}.parquet"
    frame = pd.read_parquet(path)
    if limit is not None:
        frame = frame[frame["doc_id"] < limit]
    return frame.sort_values(KEYS[name]).reset_index(drop=True)


def assert_same_tables(ray_output: Path, local_output: Path, limit: int | None = None) -> None:
    """Ray's tables equal the local engine's after sorting: keys exactly, values within 1e-5."""
    for name in ("documents", "tokens", "associations"):
        ours, theirs = table(ray_output, name, limit), table(local_output, name, limit)
        assert not ours.duplicated(KEYS[name]).any(), f"{name}: a row stored twice"
        pd.testing.assert_frame_equal(ours, theirs, check_exact=False, rtol=1e-5, atol=1e-5, obj=name)


def assert_each_document_once(output: Path, expected: int) -> None:
    documents = table(output, "documents")
    assert documents["doc_id"].tolist() == list(range(expected))
    assert set(table(output, "associations")["doc_id"]) == set(range(expected))


def test_blocks_are_the_local_engines_buffers() -> None:
    """Blocks close after every `size` readable records (skipped ones ride along in order); on resume, blocks
    keep committed documents (same batches) but only blocks with work are sent, on fresh part-id ranges."""

    def record(doc_id: int, skipped: bool = False) -> SourceRecord:
        return SourceRecord(doc_id, "corpus.txt", doc_id + 1, None if skipped else f"text {doc_id}", None)

    records = [record(0), record(1, skipped=True), record(2), record(3), record(4, skipped=True), record(5)]
    blocks = list(split_blocks(records, size=2, first_part_id=7, done=set()))
    assert [[r.doc_id for r in b.records] for b in blocks] == [[0, 1, 2], [3, 4, 5]]
    assert [(b.block_id, b.first_part_id, b.max_parts) for b in blocks] == [(0, 7, 3), (1, 10, 3)]

    resumed = [b for b in split_blocks(records, size=2, first_part_id=20, done={0, 1, 2, 3}) if b.todo]
    assert [(b.block_id, b.first_part_id, sorted(b.done)) for b in resumed] == [(1, 20, [3])]
    assert [r.doc_id for r in resumed[0].records] == [3, 4, 5]


def test_ray_run_equals_local_run(ray_instance: str, local_run: Path, tmp_path: Path) -> None:
    """`extractor run --engine ray --address HOST:PORT` joins a running cluster (two workers, four blocks)
    and writes the same documents, tokens, associations and verification, in the same layout."""
    args = run_args(tmp_path, "--address", ray_instance, engine="ray")
    command = [sys.executable, "-m", "extractor", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # --quiet: no Ray log line either (native ones included)
    assert ray.cluster_resources().get("CPU") == 2, "the run must leave the cluster it joined running"

    def layout(output: Path) -> set[str]:  # part files are numbered differently
        return {str(p.relative_to(output)) for p in output.rglob("*") if "associations/" not in str(p)}

    assert layout(tmp_path) == layout(local_run) and not (tmp_path / "_parts").exists()
    assert_same_tables(tmp_path, local_run)
    ours, theirs = table(tmp_path, "verification"), table(local_run, "verification")
    assert ours[["layer", "head", "passed", "n_docs"]].equals(theirs[["layer", "head", "passed", "n_docs"]])
    for errors in (ours, theirs):  # both within the tolerance; their exact values may differ by float noise
        assert (errors[["pattern_max_abs_err", "z_max_abs_err"]].max(axis=1) <= errors["atol"]).all()
    for name in ("heads", "head_similarity"):  # corpus-wide sums, merged in another order
        ours, theirs = (pd.read_parquet(run / f"{name}.parquet") for run in (tmp_path, local_run))
        pd.testing.assert_frame_equal(ours, theirs, check_exact=False, rtol=1e-5, atol=1e-6, obj=name)
    manifest, reference = (json.loads((p / "manifest.json").read_text()) for p in (tmp_path, local_run))
    assert manifest["status"] == "complete" and manifest["config"]["engine"] == "ray"
    assert manifest["provenance"]["weights_sha256"] == reference["provenance"]["weights_sha256"]
    assert {k: v for k, v in manifest["counts"].items() if k != "parts"} == {
        k: v for k, v in reference["counts"].items() if k != "parts"
    }
    query = CliRunner().invoke(app, ["query", str(tmp_path), "SELECT count(*) AS n FROM associations",
                                     "--format", "csv"])
    assert query.exit_code == 0 and query.output.split() == ["n", str(manifest["counts"]["association_rows"])]


def test_failed_workers_are_retried(
    ray_instance: str, local_run: Path, tmp_path: Path, faults: Callable[..., list[Path]]
) -> None:
    """Part-way through its block, one worker dies (Ray restarts it and runs the block again) and the other
    raises (it runs the block again itself): the run completes with every document exactly once."""
    markers = faults((0, 1, "exit"), (1, 1, "raise"))
    output = tmp_path / "run"
    result = run_cli(output, "--limit", str(FAULT_LIMIT), engine="ray")
    assert result.exit_code == 0, result.output
    assert [len(list(folder.iterdir())) for folder in markers] == [1, 1], "a fault did not fire"
    assert_each_document_once(output, FAULT_LIMIT)
    assert_same_tables(output, local_run, limit=FAULT_LIMIT)


def assert_block_0_and_part_of_block_1_committed(output: Path) -> None:
    """After block 1 failed part-way: its commit records hold all of block 0 and some of block 1."""
    committed = set()
    for marker in (output / "_parts").glob("*.done"):
        committed.update(json.loads(marker.read_text())["doc_ids"])
    assert set(range(16)) < committed < set(range(FAULT_LIMIT)), "block 0 and part of block 1 stay committed"


def test_block_failing_twice_is_reported_and_resume_completes(
    ray_instance: str, local_run: Path, tmp_path: Path, faults: Callable[..., list[Path]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both attempts fail: the run names the block and says to resume; what is committed stays committed, and
    `--resume` finishes with every document exactly once, as an uninterrupted run would have stored them."""
    (markers,) = faults((1, 2, "raise"))
    output = tmp_path / "run"
    result = run_cli(output, "--limit", str(FAULT_LIMIT), engine="ray")
    assert result.exit_code == 2, result.output
    assert len(list(markers.iterdir())) == 2, "the worker did not try the block twice"
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: 1 of 2 blocks failed (block 1 (doc_id 16–31): RuntimeError: injected")
    assert message.endswith("every other block is committed: run the same command with --resume to finish")
    assert json.loads((output / "manifest.json").read_text())["status"] == "running"
    assert_block_0_and_part_of_block_1_committed(output)

    monkeypatch.delenv(FAULT_ENV)
    result = run_cli(output, "--limit", str(FAULT_LIMIT), "--resume", engine="ray")
    assert result.exit_code == 0, result.output
    assert json.loads((output / "manifest.json").read_text())["status"] == "complete"
    assert_each_document_once(output, FAULT_LIMIT)
    assert_same_tables(output, local_run, limit=FAULT_LIMIT)


def faulty_run(
    faults: Callable[..., list[Path]], tmp_path: Path, fault: tuple[int, int, str], exit_code: int
) -> tuple[Path, str]:
    """A Ray run over the first FAULT_LIMIT documents with `fault` (block, times, kind) armed: it exits with
    `exit_code` after the fault fired `times` times; its output folder and the last line of its stderr."""
    (markers,) = faults(fault)
    output = tmp_path / "run"
    result = run_cli(output, "--limit", str(FAULT_LIMIT), engine="ray")
    assert result.exit_code == exit_code, result.output
    assert len(list(markers.iterdir())) == fault[1], "the fault did not fire as often as armed"
    return output, result.stderr.strip().splitlines()[-1]


def test_a_block_lost_with_its_worker_runs_again_on_a_new_pool(
    ray_instance: str, local_run: Path, tmp_path: Path, faults: Callable[..., list[Path]]
) -> None:
    """Block 1's worker dies twice (Ray's restart of the actor used its one retry): the block is lost with its
    worker, as on a lost node, and runs once more on a new pool. The run completes, saying so in one warning
    line, with every document once and the local engine's tables."""
    output, last_line = faulty_run(faults, tmp_path, (1, 2, "exit"), exit_code=0)
    assert last_line == (
        "warning: 1 block(s) lost with their worker (a crash, or a lost node); running them once more on a new pool")
    assert_each_document_once(output, FAULT_LIMIT)
    assert_same_tables(output, local_run, limit=FAULT_LIMIT)


def test_a_block_whose_worker_keeps_dying_is_reported_after_the_new_pool(
    ray_instance: str, tmp_path: Path, faults: Callable[..., list[Path]]
) -> None:
    """A block that kills its worker on every try (2 on the first pool, 2 on the new one) is reported in one
    line that says so; block 0 stays committed."""
    output, last_line = faulty_run(faults, tmp_path, (1, 4, "exit"), exit_code=2)
    assert last_line == (
        "error: 1 of 2 blocks failed (block 1 (doc_id 16–31): its worker died 2 times, then 2 times on a new pool); "
        "every other block is committed: run the same command with --resume to finish")
    assert_block_0_and_part_of_block_1_committed(output)


def test_a_check_that_needs_the_model_is_one_line_from_the_workers(ray_instance: str, tmp_path: Path) -> None:
    """A layer MiniLM does not have (value_zeroing_layers) is found by the workers once they load the model:
    the driver says it in the same one line as the local engine, and no block is run."""
    result = run_cli(tmp_path / "run", "--limit", "16", "--measures", "attention,value_zeroing",
                     "--value-zeroing-layers", "2,9", engine="ray")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        "error: value_zeroing_layers: 9 out of range; model 'minilm' has 6 layers, 0 to 5")
    assert not list((tmp_path / "run" / "_parts").glob("*.done"))


def test_without_ray_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray is an optional extra: without it, one line that says how to install it, exit 2, nothing written."""
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    output = tmp_path / "run"
    result = run_cli(output, engine="ray")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"error: {INSTALL_HINT}"]
    assert INSTALL_HINT == "the ray engine needs Ray: pip install 'attention-extractor[ray]'"
    assert not output.exists()
    with pytest.raises(UserError, match=r"pip install 'attention-extractor\[ray\]'"):
        run_extraction(RunConfig(input=str(SAMPLE_CORPUS), output=str(output), engine="ray"))
