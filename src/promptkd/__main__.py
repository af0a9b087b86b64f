import sys

from promptkd.cli import main

sys.exit(main())
