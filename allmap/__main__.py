"""``python -m allmap`` is the ``allmap`` command."""

import sys

from allmap.cli import main

sys.exit(main())
