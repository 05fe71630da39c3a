"""Low-rank weight updates: LoRA (with rsLoRA, DoRA, its initialisations in ``lora_inits/`` and its
options in ``lora_options/``), DyLoRA, AdaLoRA, the LyCORIS products (LoHa, LoKr), the shared-basis
methods (VeRA, PVeRA, NOLA, RandLoRA, VB-LoRA, Uni-LoRA), DeLoRA, GraLoRA, HiRA,
TinyLoRA, Lily (factors shared across layers, mixed by a router) and AdaMSS (updates per cluster
of output rows in the weight's top singular space)."""

from . import lora_method  # noqa: F401  (registers LORA before the methods built on it)
from . import adalora, dylora, lokr_loha, nola, vera  # noqa: F401  (register their methods)
from . import delora, randlora, vblora  # noqa: F401  (register DELORA, RANDLORA, VBLORA)
from . import gralora, unilora  # noqa: F401  (register GRALORA, UNILORA)
from . import hira, pvera  # noqa: F401  (register HIRA, PVERA)
from . import tinylora  # noqa: F401  (registers TINYLORA)
from . import lily  # noqa: F401  (registers LILY)
from . import adamss  # noqa: F401  (registers ADAMSS)
