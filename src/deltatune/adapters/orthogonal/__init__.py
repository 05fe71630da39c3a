"""Methods that rotate or reflect what a layer computes with learned orthogonal maps."""

from . import boft, hra, oft, psoft  # noqa: F401  (register their methods)
