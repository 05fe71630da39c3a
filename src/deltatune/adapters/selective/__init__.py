"""Methods that train chosen parts of the base itself: biases (BitFit), whole top layers."""

from . import selective  # noqa: F401  (registers SELECTIVE)
from . import ln_tuning, trainable_tokens  # noqa: F401  (register LN_TUNING, TRAINABLE_TOKENS)
from . import beft  # noqa: F401  (registers BEFT: a learned bias vector on chosen linears)
