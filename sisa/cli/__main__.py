"""``python -m sisa.cli``: the ``sisa`` command."""

import sys

from sisa.cli.main import main

sys.exit(main())
