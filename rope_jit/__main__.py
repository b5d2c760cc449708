"""``python -m rope_jit``: the ``rope-jit`` command (see rope_jit.cli)."""

import sys

from .cli import main

sys.exit(main())
