"""``python -m atlasmtl``: the ``atlasmtl`` command line (:func:`atlasmtl.cli.main`), for when the console
script is not on ``PATH`` or belongs to another installation."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
