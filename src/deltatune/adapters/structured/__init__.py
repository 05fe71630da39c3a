"""Methods whose update is a structured full-size matrix from few numbers: spectral, circulant, sparse, sharded."""

from . import c3a, fourierft, miss, shira  # noqa: F401  (register their methods)
from . import deft, peanut  # noqa: F401  (register DEFT, PEANUT)
from . import waveft  # noqa: F401  (registers WAVEFT)
from . import supertuning  # noqa: F401  (registers SUPERTUNING)
from . import glora  # noqa: F401  (registers GLORA)
