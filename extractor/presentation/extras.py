"""What a finished run adds to its folder for people to look at: the HTML report and the default figures.

With both asked for and more than one CPU, the report is written by a second process while this one draws
the figures (each is single-threaded Python: side by side they take the time of the longer, not the sum).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from extractor.corpus.config import RunConfig
from extractor.errors import UserError


def write_extras(folder: Path, config: RunConfig, only_missing: bool = False) -> list[str]:
    """OUTPUT/report.html and OUTPUT/plots/ (as `config.report` and `config.plots` ask); returns what was written.

    A problem with a figure cannot lose the report: it is finished (and its own error raised first) before the
    figures' error is. Each is moved into place whole, so an interrupted run leaves the finished report or
    figures, or none (then `--resume` writes them).
    """
    report = config.report and not (only_missing and (folder / "report.html").is_file())
    plots = config.plots and not (only_missing and (folder / "plots").is_dir())
    if report and plots and available_cpus() > 1:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as helper:
            written = helper.submit(report_in_helper, str(folder), os.getpid())
            try:
                draw_figures(folder, config)
            finally:
                report_result(written, folder)
        return ["report", "figures"]
    if report:
        from extractor.presentation.report import write_report

        write_report(folder)
    if plots:
        draw_figures(folder, config)
    return ["report"] * report + ["figures"] * plots


def draw_figures(folder: Path, config: RunConfig) -> None:
    from extractor.presentation.plots import figure_formats, write_default_plots

    with figure_formats(config.plot_formats):  # the overview of the head metrics; `extractor plot` adds one
        write_default_plots(folder, per_metric=False)  # annotated heatmap per metric


def report_in_helper(folder: str, run_pid: int) -> None:
    """In the helper process: write the report. The helper ends as soon as the run's process is gone (killed:
    nothing of the run is left running), and a fault injected at phase 'report' kills the run with it."""
    from extractor.corpus import faults
    from extractor.presentation.report import write_report

    threading.Thread(target=end_with, args=(run_pid,), daemon=True).start()
    faults.kill_with_this_process(run_pid)
    write_report(folder)


def end_with(run_pid: int, every: float = 0.1) -> None:
    """End this process as soon as its parent, the run's process `run_pid`, is gone."""
    while os.getppid() == run_pid:
        time.sleep(every)
    os._exit(1)


def report_result(written: Future[None], folder: Path) -> None:
    """Wait for the helper's report; its error as raised there, or one line if the helper died."""
    try:
        written.result()
    except BrokenProcessPool as exc:
        raise UserError(f"the process writing '{folder / 'report.html'}' died; write it with: extractor report "
                        f"{folder}") from exc


def available_cpus() -> int:
    """CPUs this process may run on (its affinity where the platform tells it, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
