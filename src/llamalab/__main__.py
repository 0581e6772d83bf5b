"""``python -m llamalab``: the same as the ``llamalab`` command."""

import sys

from llamalab.cli import main

sys.exit(main())
