"""Networks that run in parallel with the decoder and steer it through hooks: ShadowPEFT."""

from . import shadow  # noqa: F401  (registers SHADOW: a shadow network beside the decoder, with its own loss)
