"""``python -m deltatune.cli`` (as ``torchrun -m`` needs it) runs the ``deltatune`` command."""

import sys

from . import main

sys.exit(main())
