"""What a finished run adds to its folder for people to look at: the HTML report and the default figures.

With both asked for and more than one CPU, the figures are drawn by a helper process while this one writes the
report (each is single-threaded Python: side by side they take the time of the longer, not the sum). The
helper is `python -m extractor.presentation.extras RUN_PID`, a fresh interpreter (not multiprocessing's spawn,
which would run the caller's own script again in the helper). `extractor run` starts it before it imports
torch, so the helper's own imports (matplotlib, the plotting module, a first draw that loads the fonts) use the
CPU that the run's start-up leaves idle; it then waits, without using any CPU, until the run's tables are final
and it is told the folder and the formats (one JSON line on its stdin), or until its stdin closes (no figures
needed: it ends). It then forks (`presentation.forked`): the copy draws the document's figures while the helper
draws the heads overview and the clustermap, so the figures take two cores' share beside the report instead of one.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from extractor.corpus.config import RunConfig
from extractor.errors import UserError

HELPER_FAILED = 2  # the helper's exit status after a UserError (its one line is on its stderr)


class FigureHelper:
    """A helper process that draws one run's default figures (see the module docstring)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process

    @classmethod
    def start(cls) -> FigureHelper | None:
        """A waiting helper, or None where one would not pay: one CPU, or a Python that does not know its own
        executable (an embedded one)."""
        if available_cpus() < 2 or not sys.executable:
            return None
        process = subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid())], stdin=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   env=helper_environment())
        return cls(process)

    def draw(self, folder: Path, formats: Sequence[str]) -> None:
        """Tell the helper to draw `folder`'s figures in `formats`; it starts at once."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps({"folder": str(folder), "formats": list(formats)}) + "\n")
            self.process.stdin.close()
        except OSError:  # the helper is gone already: `result` says so in one line
            pass

    def wait(self) -> str:
        """Wait for the helper to end; returns what it wrote on stderr. Ctrl-C while waiting ends it too."""
        assert self.process.stderr is not None
        try:
            stderr = self.process.stderr.read()  # to its end: the helper has ended, or closed it
            self.process.wait()
        except BaseException:
            self.process.kill()
            raise
        return stderr

    def result(self, folder: Path) -> None:
        """Wait for the figures: the helper's one-line error raised here, or one line if the helper died."""
        stderr = self.wait()
        if self.process.returncode == HELPER_FAILED and stderr.startswith("error: "):
            raise UserError(stderr.strip().splitlines()[-1].removeprefix("error: "))
        if self.process.returncode != 0:
            raise UserError(f"the process drawing the figures into '{folder / 'plots'}' died (exit status "
                            f"{self.process.returncode}); draw them with: extractor plot {folder}")

    def dismiss(self) -> None:
        """End the helper now (no figures to draw, or the run stops); a finished helper is left as it is."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdin, self.process.stderr):
            if stream is not None:
                stream.close()


def write_extras(folder: Path, config: RunConfig, only_missing: bool = False,
                 helper: FigureHelper | None = None) -> list[str]:
    """OUTPUT/report.html and OUTPUT/plots/ (as `config.report` and `config.plots` ask); returns what was written.

    `helper`: a helper started earlier (`FigureHelper.start`), which draws the figures while this process writes
    the report; without one, one is started here when both are asked for. A problem with a figure cannot lose
    the report: it is finished (and its own error raised first) before the figures' error is. Each is moved
    into place whole, so an interrupted run leaves the finished report or figures, or none (then `--resume`
    writes them).
    """
    from extractor.presentation.report import write_report

    report = config.report and not (only_missing and (folder / "report.html").is_file())
    plots = config.plots and not (only_missing and (folder / "plots").is_dir())
    if report and plots:
        helper = helper or FigureHelper.start()
    if helper is not None and not (report and plots):
        helper.dismiss()
        helper = None
    if helper is not None:
        helper.draw(folder, config.plot_formats)
        try:
            write_report(folder)
        except UserError:
            helper.wait()  # the figures still finish; the report's error is the one raised
            raise
        except BaseException:  # Ctrl-C, or a bug: the helper goes too
            helper.dismiss()
            raise
        helper.result(folder)
        return ["report", "figures"]
    if report:
        write_report(folder)
    if plots:
        draw_figures(folder, config.plot_formats)
    return ["report"] * report + ["figures"] * plots


def draw_figures(folder: Path, formats: Sequence[str], fork_document: bool = False) -> None:
    """The run's default figures; `fork_document` (the helper process): the document's figures on another core."""
    from extractor.presentation.plots import figure_formats, write_default_plots

    with figure_formats(formats):  # the overview of the head metrics; `extractor plot` adds one
        write_default_plots(folder, per_metric=False, fork_document=fork_document)  # annotated heatmap per metric


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


def warm_up() -> None:
    """Import the plotting code and the run folder's reader (DuckDB scans the association parts) and draw a
    small figure with text once: what a first figure costs besides its own drawing (the fonts are loaded then),
    paid while the run is still starting."""
    import duckdb  # noqa: F401 - imported now, not when the first document's figures read the run

    from extractor.presentation.plots import new_figure

    figure = new_figure((1, 1))
    figure.add_subplot().set_title("warm-up")
    figure.canvas.draw()  # type: ignore[attr-defined]


def helper_main(run_pid: int) -> int:
    """The helper process: get ready, then draw the figures its stdin asks for (nothing if it closes first). It
    ends as soon as the run's process is gone (a killed run leaves nothing running), and a fault injected at
    phase 'figures' kills the run with it."""
    from extractor.corpus import faults
    from extractor.presentation.forked import end_with_parent

    end_with_parent(run_pid)  # the run's process
    faults.kill_with_this_process(run_pid)
    warm_up()
    request = sys.stdin.readline()
    if not request:
        return 0
    asked = json.loads(request)
    try:
        draw_figures(Path(asked["folder"]), asked["formats"], fork_document=True)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return HELPER_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(helper_main(int(sys.argv[1])))
