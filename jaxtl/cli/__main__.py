"""``python -m jaxtl.cli``: the ``jaxtl`` command."""

import sys

from jaxtl.cli import main

if __name__ == "__main__":
    sys.exit(main())
