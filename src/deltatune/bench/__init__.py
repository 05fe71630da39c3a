"""``deltatune bench``: deltatune and HF PEFT timed on the same training step (see ``cli/bench.py``)."""
