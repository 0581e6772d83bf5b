"""``python -m llamalab.cli``: the same as the ``llamalab`` command."""

import sys

from llamalab.cli import main

sys.exit(main())
