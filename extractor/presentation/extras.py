"""What a finished run adds to its folder for people to look at: the HTML report, then the default figures."""

from __future__ import annotations

from pathlib import Path

from extractor.corpus.config import RunConfig


def write_extras(folder: Path, config: RunConfig, only_missing: bool = False) -> list[str]:
    """OUTPUT/report.html, then OUTPUT/plots/ (as `config.report` and `config.plots` ask); returns what was written.

    The report comes first, so that a problem with a figure cannot lose it. Each is moved into place whole,
    so an interrupted run leaves the finished report or figures, or none (then `--resume` writes them).
    """
    written = []
    if config.report and not (only_missing and (folder / "report.html").is_file()):
        from extractor.presentation.report import write_report

        write_report(folder)
        written.append("report")
    if config.plots and not (only_missing and (folder / "plots").is_dir()):
        from extractor.presentation.plots import figure_formats, write_default_plots

        with figure_formats(config.plot_formats):  # the overview of the head metrics; `extractor plot` adds one
            write_default_plots(folder, per_metric=False)  # annotated heatmap per metric

        written.append("figures")
    return written
