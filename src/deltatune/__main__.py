"""``python -m deltatune`` runs the ``deltatune`` command."""

import sys

from .cli import main

sys.exit(main())
