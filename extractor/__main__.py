"""`python -m extractor` and the `extractor` script: the command line, with Ctrl-C during its own imports
reported like any other interrupt (one line, exit 130) instead of a traceback."""

import sys


def main() -> None:
    try:
        from extractor.cli import main as cli_main
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    cli_main()


if __name__ == "__main__":
    main()
