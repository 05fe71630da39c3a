"""Methods that live at the model level and prepend learned vectors: prompt, prefix and P-tuning."""

from . import soft_prompts  # noqa: F401  (registers PROMPT_TUNING, PREFIX_TUNING, P_TUNING)
from . import adaption_prompt  # noqa: F401  (registers ADAPTION_PROMPT: gated prompts inside attention)
from . import cartridge  # noqa: F401  (registers CARTRIDGE: a trained prefix KV cache)
from . import multitask  # noqa: F401  (registers MULTITASK_PROMPT_TUNING: a shared prompt scaled per task)
from . import cpt  # noqa: F401  (registers CPT: a context of real tokens, changed within epsilon balls)
