"""Training on several processes under ``torchrun``: DDP or FSDP2 (``processes.py``) and the
sharded checkpoints of an FSDP2 run (``sharded_checkpoint.py``)."""

from .processes import AUTO_FSDP_SHARE, STRATEGIES, Distributed, device_memory_bytes

__all__ = ["AUTO_FSDP_SHARE", "STRATEGIES", "Distributed", "device_memory_bytes"]
