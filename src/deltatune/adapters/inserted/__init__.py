"""Small modules inserted beside or after a layer: bottleneck adapters (Houlsby, Pfeiffer)."""

from . import bottleneck  # noqa: F401  (registers BOTTLENECK)
