"""LoRA's initialisations beyond B = 0: PiSSA and OLoRA, orthogonal and MiCA, LoftQ, and the
data-driven LoRA-GA, EVA and CorDA; and the conversion of a base-changing init to a plain LoRA."""
