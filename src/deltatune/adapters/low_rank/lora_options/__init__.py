"""LoRA's options that change what an adapter computes (aLoRA, QA-LoRA, BD-LoRA, KaSA, VeLoRA,
MonteCLoRA, Arrow), behind the small ``LoraVariant`` hook, and ``layer_replication``."""
