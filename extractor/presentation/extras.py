"""What a finished run adds to its folder for people to look at: the HTML report and the default figures.

With both asked for and more than one CPU, the report is written by a helper process while this one draws
the figures (each is single-threaded Python: side by side they take the time of the longer, not the sum).
The helper is `python -m extractor.presentation.extras FOLDER RUN_PID`, a fresh interpreter that imports only
the report: not multiprocessing's spawn, which would run the caller's own script again in the helper.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import threading
import time
from pathlib import Path

from extractor.corpus.config import RunConfig
from extractor.errors import UserError

HELPER_FAILED = 2  # the helper's exit status after a UserError (its one line is on its stderr)


def write_extras(folder: Path, config: RunConfig, only_missing: bool = False) -> list[str]:
    """OUTPUT/report.html and OUTPUT/plots/ (as `config.report` and `config.plots` ask); returns what was written.

    A problem with a figure cannot lose the report: it is finished (and its own error raised first) before the
    figures' error is. Each is moved into place whole, so an interrupted run leaves the finished report or
    figures, or none (then `--resume` writes them).
    """
    report = config.report and not (only_missing and (folder / "report.html").is_file())
    plots = config.plots and not (only_missing and (folder / "plots").is_dir())
    if report and plots and available_cpus() > 1 and sys.executable:  # (an embedded Python may have none)
        helper = subprocess.Popen([sys.executable, "-m", __name__, str(folder), str(os.getpid())],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, env=helper_environment())
        try:
            draw_figures(folder, config)
        finally:
            report_result(helper, folder)
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


def report_result(helper: subprocess.Popen[str], folder: Path) -> None:
    """Wait for the helper's report: its one-line error raised here, or one line if the helper died."""
    try:
        _, stderr = helper.communicate()
    except BaseException:  # Ctrl-C while waiting: the helper goes too
        helper.kill()
        raise
    if helper.returncode == HELPER_FAILED and stderr.startswith("error: "):
        raise UserError(stderr.strip().splitlines()[-1].removeprefix("error: "))
    if helper.returncode != 0:
        raise UserError(f"the process writing '{folder / 'report.html'}' died (exit status {helper.returncode}); "
                        f"write it with: extractor report {folder}")


def helper_environment() -> dict[str, str]:
    """This process's environment; when this `extractor` package is not installed in site-packages (a checkout
    on the path, an editable install), its folder goes first on the helper's PYTHONPATH, so the helper runs
    the same code. An installed package is left to site-packages' place after the standard library."""
    package_root = Path(__file__).resolve().parents[2]
    installed = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if package_root in installed:
        return dict(os.environ)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), path] if path else [str(package_root)])}


def available_cpus() -> int:
    """CPUs this process may run on (its affinity where the platform tells it, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def end_with(run_pid: int, every: float = 0.1) -> None:
    """End this process as soon as its parent, the run's process `run_pid`, is gone."""
    while os.getppid() == run_pid:
        time.sleep(every)
    os._exit(1)


def helper_main(folder: str, run_pid: int) -> int:
    """The helper process: write the report. It ends as soon as the run's process is gone (a killed run leaves
    nothing running), and a fault injected at phase 'report' kills the run with it."""
    from extractor.corpus import faults
    from extractor.presentation.report import write_report

    threading.Thread(target=end_with, args=(run_pid,), daemon=True).start()
    faults.kill_with_this_process(run_pid)
    try:
        write_report(folder)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return HELPER_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(helper_main(sys.argv[1], int(sys.argv[2])))
