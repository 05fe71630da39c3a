"""Numeric ops used by adapter layers. Layers import from here; this module picks the backend.

Only the PyTorch reference exists so far; fused GPU kernels will be dispatched here.
"""

from .reference import dora_factor, embed, embed_scale_of, embedding_delta, linear_no_bias, lora_delta

__all__ = ["dora_factor", "embed", "embed_scale_of", "embedding_delta", "linear_no_bias", "lora_delta"]
