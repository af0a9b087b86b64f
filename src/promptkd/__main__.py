"""``python -m promptkd ...``: the same as the ``promptkd`` command."""

import sys

from promptkd.cli import main

sys.exit(main())
