"""Numeric ops used by adapter layers. Layers import from here; this module picks the backend.

``reference`` holds the plain PyTorch ground truth of every op. ``lora_fused`` holds the LoRA
linear as one autograd function (sparse dropout, in-place epilogues), built from PyTorch
matmuls, so it is the fast path on every device; ``dora_fused`` does the same for DoRA's
output, ``dora_dropout`` DoRA's output with dropout without a second dense base matmul,
``dora`` computes its norm from the factors, and ``cross_entropy`` fuses the loss
with the output projection. ``nf4_triton`` (Triton, not imported here: the 4-bit layers load it
on a GPU) decodes 4-bit weights inside its matmul tiles. The tests hold each to its plain
PyTorch definition.
"""

from .cross_entropy import linear_cross_entropy
from .dora import dora_norm_from_product, dora_weight_norm, weight_row_norms_sq
from .dora_dropout import dora_dropout_add
from .dora_fused import dora_add
from .lora_fused import dropout, lora_add, lora_linear
from .reference import dora_factor, embed, embed_scale_of, embedding_delta, linear_no_bias, lora_delta

__all__ = [
    "dora_add", "dora_dropout_add", "dora_factor", "dora_norm_from_product", "dora_weight_norm", "dropout", "embed",
    "embed_scale_of", "embedding_delta", "linear_cross_entropy", "linear_no_bias", "lora_add", "lora_delta",
    "lora_linear", "weight_row_norms_sq",
]
