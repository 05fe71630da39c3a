"""Methods that live at the model level and prepend learned vectors: prompt, prefix and P-tuning."""

from . import soft_prompts  # noqa: F401  (registers PROMPT_TUNING, PREFIX_TUNING, P_TUNING)
