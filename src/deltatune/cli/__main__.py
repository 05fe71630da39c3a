"""``python -m deltatune.cli`` (as ``torchrun -m`` needs it) runs the ``deltatune`` command.

Under torchrun (``WORLD_SIZE`` above 1) the process ends with ``os._exit`` once the command has
returned and its output is flushed: the process group is already destroyed by then, but gloo's
worker threads can outlive it, and the interpreter's own teardown then sometimes aborts a rank
("terminate called without an active exception", SIGABRT) after its work is done and saved, which
torchrun reports as a failed run.
"""

import logging
import os
import sys

from . import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code if isinstance(code, int) else 0)
sys.exit(code)
