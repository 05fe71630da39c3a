"""Low-rank weight updates: LoRA (with rsLoRA, DoRA and its initialisations), DyLoRA, AdaLoRA,
the LyCORIS products (LoHa, LoKr), and the shared-basis methods (VeRA, NOLA)."""

from . import lora_method  # noqa: F401  (registers LORA before the methods built on it)
from . import adalora, dylora, lokr_loha, nola, vera  # noqa: F401  (register their methods)
