"""``python -m allmap`` is the ``allmap`` command."""

import sys

try:
    from allmap.cli import main
except KeyboardInterrupt:  # Ctrl-C while the command's modules load: a line, not an import traceback
    print("allmap: interrupted (Ctrl-C) while starting", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
