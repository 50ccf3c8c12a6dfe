"""`python -m extractor` and the `extractor` script: the command line, with Ctrl-C during its own imports
reported like any other interrupt (one line, exit 130) instead of a traceback, and a quick exit at the end."""

import atexit
import os
import sys
import threading
from typing import NoReturn


def main() -> None:
    try:
        from extractor.cli import main as cli_main
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    try:
        cli_main()
    except SystemExit as done:
        exit_now(done.code)
    exit_now(0)


def exit_now(code: str | int | None) -> NoReturn:
    """End the process with `code` (as `sys.exit` reads it) without the interpreter's teardown, which frees
    every module of torch and transformers one by one (about a second on 2 cores, for nothing): the atexit
    handlers still run and the standard streams are flushed. Every file the extractor writes is closed (and
    renamed into place) before its command returns. With another thread still running, the usual exit."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or stream: nothing more to say
            pass
    os._exit(status)


if __name__ == "__main__":
    main()
