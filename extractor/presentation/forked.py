"""One piece of drawing in a forked copy of this process, beside the rest: two cores draw a run's figures at once.

A fork starts in a millisecond with everything already imported and warm (matplotlib, its fonts, DuckDB), which a
fresh process would spend a second on. The child runs one task, sends back what it returns (JSON) or its one-line
`UserError` through a pipe, and ends; `result()` waits for it. The child ends too as soon as its parent is gone
(`end_with_parent`, which the figure helper uses on its run as well: a killed run leaves nothing drawing). Where the platform cannot fork, the task simply runs in `result()`.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from extractor.errors import UserError

CAN_FORK = hasattr(os, "fork")
FAILED = 3  # the child's exit status after an unexpected error (its traceback is on stderr)


PR_SET_PDEATHSIG = 1  # Linux prctl: the signal this process gets when the thread that started it ends


def end_with_parent(parent: int, every: float = 0.1) -> None:
    """From now on, end this process as soon as its parent `parent` is gone (a figure helper whose run was
    killed, a forked copy whose helper was): nothing it draws may land after `--resume` has tidied the folder.

    On Linux the kernel kills it with its parent, at once (PR_SET_PDEATHSIG: the parent's starting thread is its
    main thread, which lives as long as it does); elsewhere, and as a fallback, a thread looks every `every` s.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl to call: the thread below still ends it
            pass
    if os.getppid() != parent:  # the parent was gone before the kernel was asked
        os._exit(1)
    threading.Thread(target=_poll_parent, args=(parent, every), daemon=True).start()


def _poll_parent(parent: int, every: float) -> None:
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


class Forked:
    """`task()` running in a forked child (see the module docstring); `result()` returns what it returned."""

    def __init__(self, task: Callable[[], Any], what: str) -> None:
        """`what`: the task in words, for the one line said if the child dies."""
        self.what = what
        self.task: Callable[[], Any] | None = None
        self.pid = 0
        if not CAN_FORK:
            self.task = task
            return
        read, write = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: run the task, report, end without the parent's clean-up
            os.close(read)
            end_with_parent(parent)
            try:
                message = {"result": task()}
            except UserError as exc:
                message = {"error": str(exc)}
            except BaseException:  # a bug: its traceback for whoever reads stderr, and a failed status
                traceback.print_exc()
                sys.stderr.flush()
                os._exit(FAILED)
            with os.fdopen(write, "w", encoding="utf-8") as pipe:
                json.dump(message, pipe)
            os._exit(0)
        os.close(write)
        self.pid, self.read = pid, read

    def result(self) -> Any:
        """Wait for the task; what it returned, or its `UserError` raised here (one line if the child died)."""
        if self.task is not None:
            return self.task()
        with os.fdopen(self.read, encoding="utf-8") as pipe:
            sent = pipe.read()
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        if status != 0 or not sent:
            raise UserError(f"the process drawing {self.what} died (exit status {os.waitstatus_to_exitcode(status)})")
        message = json.loads(sent)
        if "error" in message:
            raise UserError(message["error"])
        return message["result"]

    def cancel(self) -> None:
        """End the child now (the parent's own drawing failed); nothing if it has been waited for."""
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            os.close(self.read)
            self.pid = 0
