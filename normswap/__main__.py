"""``python -m normswap``: the ``normswap`` console script."""

import sys

from .cli import main

sys.exit(main())
