"""Faults around a run: kill -9 at every phase (also after the manifest says complete), damaged part files,
a damaged manifest, a changed input, a full disk, a read-only folder and two writers at once.

Every case must end in the finished run (equal, table for table, to an uninterrupted one) or in one `error:`
line with nothing committed lost. Kills are deterministic: `EXTRACTOR_FAULT_AT=<phase>` makes the run SIGKILL
itself at that phase (extractor/faults.py), so no test depends on timing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner, Result

from extractor.cli import app
from extractor.corpus.faults import FAULT_VARIABLE
from tests.test_run import SAMPLE, associations, table, write_lines

TABLES = ("documents", "tokens", "heads", "head_similarity", "verification")
# Two documents per batch, so the run commits several parts; figures and report on, as `make run` has them.
SETTINGS = ["--batch-size", "2"]


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(app, args)


def run_args(model: str, corpus: Path, out: Path, *extra: str, quiet: bool = True) -> list[str]:
    return ["run", "--model", model, "-i", str(corpus), "-o", str(out), *SETTINGS, *extra,
            *(["--quiet"] if quiet else [])]


def killed_at(phase: str, args: list[str]) -> None:
    """Run the CLI in a real process that SIGKILLs itself at `phase`."""
    env = {**os.environ, FAULT_VARIABLE: phase}
    done = subprocess.run([sys.executable, "-m", "extractor", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -9, (phase, done.returncode, done.stderr[-2000:])


def one_error_line(result: Result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def snapshot(out: Path) -> dict[str, str]:
    """Every file under OUT (but the lock) → SHA-256 of its bytes."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"}


def assert_same_run(out: Path, reference: Path) -> None:
    """The finished run equals the uninterrupted one: tables, association rows, figures and report present,
    nothing half-written left behind."""
    for name in TABLES:  # `source` is the input's path, which some tests change
        pd.testing.assert_frame_equal(table(out, name).drop(columns="source", errors="ignore"),
                                      table(reference, name).drop(columns="source", errors="ignore"))
    pd.testing.assert_frame_equal(associations(out), associations(reference))
    assert (out / "report.html").is_file()
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(p.name for p in (reference / "plots").iterdir())
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(("plots.", "_parts"))]
    assert leftovers == []


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> str:
    return str(tiny_model_dir("bert"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lines(tmp_path_factory.mktemp("corpus") / "c.txt", SAMPLE[:8])


@pytest.fixture(scope="module")
def reference(tiny: str, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run with the same settings."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = invoke(run_args(tiny, corpus, out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture()
def finished(tiny: str, corpus: Path, reference: Path, tmp_path: Path) -> Path:
    """A complete run folder (a copy of the reference)."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    return out


# -- kill -9 at every phase, then --resume ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["part:1", "folding", "complete", "removing-parts", "report", "figures"])
def test_kill_at_a_phase_then_resume_finishes_the_same_run(
    phase: str, tiny: str, corpus: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    killed_at(phase, run_args(tiny, corpus, out))
    result = invoke([*run_args(tiny, corpus, out), "--resume"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert_same_run(out, reference)


def test_resume_of_a_complete_run_deletes_nothing(tiny: str, corpus: Path, finished: Path) -> None:
    before = snapshot(finished)
    assert any(name.startswith("associations/part-") for name in before)
    result = invoke([*run_args(tiny, corpus, finished, quiet=False), "--resume"])
    assert result.exit_code == 0 and "is complete; nothing to do" in result.stderr
    assert snapshot(finished) == before
    query = invoke(["query", str(finished), "SELECT count(*) AS n FROM associations"])
    assert query.exit_code == 0 and int(query.stdout.split()[-1]) > 0


def test_refused_resume_of_a_complete_run_deletes_nothing(tiny: str, corpus: Path, finished: Path) -> None:
    before = snapshot(finished)
    line = one_error_line(invoke([*run_args(tiny, corpus, finished), "--resume", "--top-k", "3"]))
    assert "different settings" in line and "top_k" in line
    assert snapshot(finished) == before


def test_resume_redraws_missing_figures_and_report_only(tiny: str, corpus: Path, finished: Path) -> None:
    shutil.rmtree(finished / "plots")
    (finished / "report.html").unlink()
    kept = snapshot(finished)
    result = invoke([*run_args(tiny, corpus, finished, quiet=False), "--resume"])
    assert result.exit_code == 0 and "wrote the missing report and figures" in result.stderr
    after = snapshot(finished)
    assert {k: after[k] for k in kept} == kept  # the tables and association parts are untouched
    assert (finished / "report.html").is_file() and any((finished / "plots").iterdir())


# -- damaged files ------------------------------------------------------------------------------------------


def _damage(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["000000.done", "000001.state.pkl", "000000.documents.parquet",
                                     "../associations/part-000001.parquet"])
def test_resume_redoes_parts_whose_files_are_damaged(
    damaged: str, tiny: str, corpus: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    killed_at("part:2", run_args(tiny, corpus, out))
    _damage(out / "_parts" / damaged)
    result = invoke([*run_args(tiny, corpus, out), "--resume"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert_same_run(out, reference)


def test_a_damaged_manifest_is_refused_and_nothing_is_deleted(tiny: str, corpus: Path, finished: Path) -> None:
    (finished / "manifest.json").write_text('{"status": "compl')
    before = snapshot(finished)
    line = one_error_line(invoke([*run_args(tiny, corpus, finished), "--resume"]))
    assert "manifest.json' is damaged" in line and "--overwrite" in line
    assert snapshot(finished) == before


@pytest.mark.parametrize("command", [["report"], ["plot"], ["query", "SELECT count(*) FROM associations"]])
def test_a_truncated_association_part_is_one_error_line(command: list[str], finished: Path) -> None:
    part = sorted((finished / "associations").iterdir())[0]
    _damage(part)
    line = one_error_line(invoke([command[0], str(finished), *command[1:]]))
    assert f"'{part}' is damaged and cannot be read" in line


# -- the input changed between the interruption and --resume -------------------------------------------------


@pytest.mark.slow
def test_resume_refuses_a_changed_input(tiny: str, corpus: Path, reference: Path, tmp_path: Path) -> None:
    mine = write_lines(tmp_path / "c.txt", SAMPLE[:8])
    out = tmp_path / "out"
    killed_at("part:1", run_args(tiny, mine, out))
    write_lines(mine, ["A different first sentence.", *SAMPLE[1:8]])
    line = one_error_line(invoke([*run_args(tiny, mine, out), "--resume"]))
    assert "changed since the run started (record 0, line 1, differs)" in line
    write_lines(mine, [*SAMPLE[:8], "An appended sentence."])
    line = one_error_line(invoke([*run_args(tiny, mine, out), "--resume"]))
    assert "changed since the run started (it now has 9 records" in line
    write_lines(mine, SAMPLE[:8])
    result = invoke([*run_args(tiny, mine, out), "--resume"])
    assert result.exit_code == 0, result.output
    assert_same_run(out, reference)


# -- --overwrite ----------------------------------------------------------------------------------------------


def test_overwrite_refuses_an_output_folder_that_holds_the_input(tiny: str, finished: Path) -> None:
    inside = write_lines(finished / "corpus.txt", SAMPLE[:2])
    line = one_error_line(invoke(run_args(tiny, inside, finished, "--overwrite")))
    assert "is inside the output folder" in line
    assert inside.read_text() == "".join(f"{s}\n" for s in SAMPLE[:2])


# -- two writers at once ----------------------------------------------------------------------------------------


@pytest.fixture()
def held_lock(finished: Path) -> Iterator[int]:
    """Another process holding the run folder's lock; yields its PID."""
    code = ("import sys, time; from extractor.corpus.lock import FolderLock; "
            "lock = FolderLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(finished)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("command", ["run", "resume", "overwrite", "report", "plot"])
def test_a_second_writer_is_refused_naming_the_holder(
    command: str, held_lock: int, tiny: str, corpus: Path, finished: Path
) -> None:
    before = snapshot(finished)
    args = {"run": run_args(tiny, corpus, finished), "resume": [*run_args(tiny, corpus, finished), "--resume"],
            "overwrite": [*run_args(tiny, corpus, finished), "--overwrite"],
            "report": ["report", str(finished)], "plot": ["plot", str(finished)]}[command]
    line = one_error_line(invoke(args))
    assert f"in use by another extractor process (PID {held_lock})" in line
    assert snapshot(finished) == before


def test_the_lock_dies_with_its_holder(held_lock: int, finished: Path) -> None:
    os.kill(held_lock, 9)
    os.waitpid(held_lock, 0)
    result = invoke(["report", str(finished)])
    assert result.exit_code == 0, result.output


# -- a full disk, a read-only folder (need root: a tmpfs and a read-only bind mount) ------------------------------


def _mount(*args: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (grown later by the test); skipped where this process may not mount one."""
    point = tmp_path / "disk"
    point.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=256k", "tmpfs", str(point)):
        pytest.skip("a full disk needs a tmpfs: mount needs root (CI runs as root)")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_resume_finishes(
    small_disk: Path, tiny: str, corpus: Path, reference: Path
) -> None:
    out = small_disk / "out"
    line = one_error_line(invoke(run_args(tiny, corpus, out)))
    assert "the disk is full" in line and "--resume" in line
    assert _mount("-o", "remount,size=64m", str(small_disk))
    result = invoke([*run_args(tiny, corpus, out), "--resume"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert_same_run(out, reference)


@pytest.fixture()
def read_only(finished: Path, tmp_path: Path) -> Iterator[Path]:
    view = tmp_path / "read-only"
    view.mkdir()
    if not (_mount("--bind", str(finished), str(view)) and _mount("-o", "remount,ro,bind", str(view))):
        pytest.skip("a read-only folder for root needs a read-only bind mount: mount needs root (CI runs as root)")
    try:
        yield view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)


@pytest.mark.parametrize("command", ["report", "plot"])
def test_report_and_plot_on_a_read_only_run_are_one_line(command: str, read_only: Path) -> None:
    line = one_error_line(invoke([command, str(read_only)]))
    assert "is not writable" in line
