"""``python -m securemetrics_e2e``: the same command as ``securemetrics-e2e``."""

import sys

from securemetrics_e2e.cli import main

if __name__ == "__main__":
    sys.exit(main())
