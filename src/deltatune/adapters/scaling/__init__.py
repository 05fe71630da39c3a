"""Methods that rescale what a layer computes with learned vectors: (IA)³."""

from . import ia3  # noqa: F401  (registers IA3)
from . import road  # noqa: F401  (registers ROAD)
