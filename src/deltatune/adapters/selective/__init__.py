"""Methods that train chosen parts of the base itself: biases (BitFit), whole top layers."""

from . import selective  # noqa: F401  (registers SELECTIVE)
