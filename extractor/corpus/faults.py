"""Deterministic fault injection for the crash tests: `EXTRACTOR_FAULT_AT=<phase>` kills the run at that phase.

The kill is SIGKILL, as `kill -9` would deliver it: no handler, no `finally`, no flush. Phases, in the order
a run passes them:

    part:N           after part N's commit record is written (N counts from 0 in this process)
    folding          after documents.parquet is folded, before tokens and the per-head tables
    complete         after manifest.json says complete, before the part files are removed
    removing-parts   half-way through removing the part files
    report           after the report is rendered, before it is moved into place
    figures          after the first figure is written, before the figure folder is moved into place
"""

from __future__ import annotations

import os
import signal

FAULT_VARIABLE = "EXTRACTOR_FAULT_AT"


_killed_with_this_process: list[int] = []


def kill_with_this_process(pid: int) -> None:
    """In a helper process of a run (the figures'): a fault here kills the run's own process `pid` first, as
    a kill of the whole run would."""
    _killed_with_this_process.append(pid)


def checkpoint(phase: str) -> None:
    """Kill this process now if $EXTRACTOR_FAULT_AT names `phase` (a no-op otherwise)."""
    if os.environ.get(FAULT_VARIABLE) == phase:
        for pid in _killed_with_this_process:
            os.kill(pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
