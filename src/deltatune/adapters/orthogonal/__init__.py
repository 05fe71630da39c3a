"""Methods that rotate or reflect what a layer computes with learned orthogonal maps."""

from . import boft, frod, hra, oft, psoft  # noqa: F401  (register their methods)
from . import osf  # noqa: F401  (OSF: a frozen top SVD part, a trained rest with projected gradients)
