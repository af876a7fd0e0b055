"""`python -m service`: the command line (service/cli/main.py)."""

import sys

from service.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
