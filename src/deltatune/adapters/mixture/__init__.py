"""Methods that mix several adapters with a learned gate."""

from . import xlora  # noqa: F401  (registers XLORA)
from . import poly  # noqa: F401  (registers POLY: LoRA skills mixed per task)
