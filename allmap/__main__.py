"""``python -m allmap`` and the ``allmap`` command."""

import sys


def run() -> None:
    """Load the CLI and run it; a Ctrl-C while torch and the CLI load is one line, not a traceback."""
    try:
        from allmap.cli import main
    except KeyboardInterrupt:
        print("allmap: interrupted (Ctrl-C) while starting", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())


if __name__ == "__main__":
    run()
