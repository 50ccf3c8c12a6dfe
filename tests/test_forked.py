"""A piece of drawing in a forked child (`presentation.forked`): its result, its errors in one line, and no child
left behind when it is cancelled or its parent dies. And the run's figures drawn that way are the same set."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from extractor.errors import UserError
from extractor.presentation.forked import FAILED, Forked

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the platform cannot fork: tasks run in place")


def alive(pid: int) -> bool:
    """Whether `pid` still runs: a zombie (killed, not yet reaped by whoever adopted it) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # the state follows the command's ")"
    except (FileNotFoundError, IndexError):
        return not stat.parent.parent.is_dir()  # gone meanwhile; without /proc, os.kill's answer stands


def test_the_child_runs_the_task_and_sends_back_what_it_returns() -> None:
    forked = Forked(lambda: {"pid": os.getpid(), "values": [1, 2.5, "three"]}, "a test task")
    result = forked.result()
    assert result["pid"] != os.getpid()  # it ran in another process
    assert result["values"] == [1, 2.5, "three"]


def test_a_user_error_in_the_child_is_raised_in_the_parent_as_it_is() -> None:
    def task() -> None:
        raise UserError("run 'x' has no document 7")

    with pytest.raises(UserError, match="^run 'x' has no document 7$"):
        Forked(task, "a test task").result()


@pytest.mark.parametrize(("task", "status"), [
    (lambda: os.kill(os.getpid(), signal.SIGKILL), "-9"),
    (lambda: 1 / 0, str(FAILED)),  # a bug: its traceback on stderr, a failed status
])
def test_a_child_that_dies_is_one_line_naming_the_task(task, status: str, capfd: pytest.CaptureFixture) -> None:
    with pytest.raises(UserError) as error:
        Forked(task, "the figures of document 0").result()
    assert str(error.value) == f"the process drawing the figures of document 0 died (exit status {status})"
    if status == str(FAILED):
        assert "ZeroDivisionError" in capfd.readouterr().err


def test_cancel_ends_the_child_at_once() -> None:
    forked = Forked(lambda: time.sleep(60), "a slow task")
    pid = forked.pid
    assert alive(pid)
    start = time.perf_counter()
    forked.cancel()
    assert time.perf_counter() - start < 5 and not alive(pid)
    forked.cancel()  # a second cancel does nothing


def child_outlives_its_parent_by(tmp_path: Path, task: str, within: float) -> bool:
    """Start a parent process whose forked child runs `task` (Python source of a function body), kill the parent
    once the child has started, and say whether the child still runs `within` seconds later."""
    started, pid_file = tmp_path / "started", tmp_path / "child.pid"
    parent_code = textwrap.dedent(f"""
        import time
        from extractor.presentation.forked import Forked
        def task():
            open({str(started)!r}, "w").write("x")
        """) + textwrap.indent(textwrap.dedent(task), " " * 4) + textwrap.dedent(f"""
        forked = Forked(task, "a test task")
        open({str(pid_file)!r}, "w").write(str(forked.pid))
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    child = 0
    try:
        deadline = time.monotonic() + 60
        while not (started.is_file() and pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(pid_file.read_text())
        time.sleep(0.3)  # well inside the task
        assert alive(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + within
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        return alive(child)
    finally:
        parent.kill()
        if child and alive(child):
            os.kill(child, signal.SIGKILL)


def test_the_child_ends_when_its_parent_is_killed(tmp_path: Path) -> None:
    """A killed run (or figure helper) leaves no child drawing on: the child goes with its parent."""
    assert not child_outlives_its_parent_by(tmp_path, "time.sleep(60)", within=10)


def test_the_child_ends_at_once_even_while_it_holds_the_gil(tmp_path: Path) -> None:
    """The child goes with its parent at once, not at the next look of a thread: drawing runs long stretches of
    C code that hold the GIL, and a copy that outlived its run could write into the folder after `--resume` had
    tidied it (seen once in CI: a `plots.partial-*` folder left behind). Here the child sits in one C call that
    never releases the GIL (minutes long); it must still be gone within a second of its parent's kill."""
    assert not child_outlives_its_parent_by(tmp_path, "return sum(range(10**10))", within=1.0)


def test_the_default_figures_drawn_in_two_processes_are_the_same_set(tmp_path: Path, tiny_loaded) -> None:
    """`fork_document`: the document's figures come from the child, the rest from the parent; the same files,
    in the same order, as one process draws them, and nothing left of the partial folder."""
    import shutil

    from run_fixture import build_run_folder, sample_lines

    from extractor.presentation.plots import figure_formats, write_default_plots

    run = build_run_folder(tmp_path / "run", tiny_loaded("bert"), sample_lines(3))
    with figure_formats(["png"]):
        alone = [p.name for p in write_default_plots(run, per_metric=False)]
        shutil.rmtree(run / "plots")
        side_by_side = [p.name for p in write_default_plots(run, per_metric=False, fork_document=True)]
    assert side_by_side == alone
    assert any(name.endswith("_grid.png") for name in alone) and "heads_overview.png" in alone
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(alone)
    assert not list(run.glob("plots.*"))
