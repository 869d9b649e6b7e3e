"""``python -m client``: the entry point is a thin shim so ``cli.main`` stays testable."""

import sys

from client.cli import main

if __name__ == "__main__":
    sys.exit(main())
