"""Checks of LoRA's ``target_parameters`` field (LoRA on parameters rather than modules: the fused
3-D expert weights of mixture-of-experts models), with PEFT 0.21.2's refusals and reasons.

PEFT adapts such a parameter by adding ``scale · B A`` per expert to the weight before the module
runs, so anything that needs the layer's input on its own (dropout, DoRA's norms, input-side
variants) cannot apply: those settings are refused here, naming the field, before a model is touched.
"""

from __future__ import annotations

from typing import Any

# config field -> (the value that is fine, why another value is refused). PEFT refuses the first six
# in lora.ParamWrapper with "does not work with ..."; the others are deltatune's LoRA options whose
# layers need an input-side path that a parameter has not.
_REFUSED: dict[str, tuple[Any, str]] = {
    "lora_dropout": (0.0, "dropout acts on the layer's input, which cannot be factored out of a weight "
                          "update (PEFT: lora.ParamWrapper does not work with lora_dropout != 0)"),
    "fan_in_fan_out": (False, "the parameter's own layout decides (PEFT: lora.ParamWrapper does not work "
                              "with fan_in_fan_out)"),
    "lora_bias": (False, "a parameter has no output bias to train (PEFT: lora.ParamWrapper does not work "
                         "with lora_bias=True)"),
    "use_dora": (False, "DoRA is not supported on parameters (PEFT: lora.ParamWrapper does not work with "
                        "use_dora=True)"),
    "velora_config": (None, "PEFT: lora.ParamWrapper does not work when `velora_config` is set"),
    "kasa_config": (None, "PEFT: lora.ParamWrapper does not work when `kasa_config` is set"),
    "use_qalora": (False, "QA-LoRA pools the layer's input, which a parameter update never sees"),
    "use_bdlora": (None, "BD-LoRA's block layout is defined for linear layers only"),
    "alora_invocation_tokens": (None, "aLoRA switches the update per token, which a weight update cannot"),
    "monteclora_config": (None, "MonteCLoRA samples per forward on a linear layer's path"),
    "arrow_config": (None, "Arrow routes per token between linear-layer adapters"),
    "layer_replication": (None, "replicated layers would share the fused expert tensors"),
}

# Initialisations that read the weight as one (out, in) matrix (PiSSA, OLoRA, CorDA, LoftQ, ...) or
# data through a linear layer (EVA, LoRA-GA): PEFT's ParamWrapper calls them on a module weight
# the experts module has not.
_PARAMETER_INITS = (True, False, "gaussian")


def check_target_parameters(config: Any) -> None:
    """Raise ValueError naming the field when ``config`` sets ``target_parameters`` with a setting
    that LoRA on a parameter cannot honour (PEFT refuses the same, with the same reason)."""
    targets = getattr(config, "target_parameters", None)
    if targets is None:
        return
    name = type(config).__name__
    if isinstance(targets, str) or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"{name}.target_parameters must be a list of parameter names (e.g. "
                         f"['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']), got {targets!r}")
    if not targets:
        return
    if config.peft_type != "LORA":
        raise ValueError(f"{name}.target_parameters: only plain LoRA adapts parameters; "
                         f"{config.peft_type} adapts modules (use target_modules)")
    for key, (fine, why) in _REFUSED.items():
        value = getattr(config, key, fine)
        if value != fine and not (fine is None and not value) and not (fine is False and not value):
            raise ValueError(f"{name}.{key}={value!r} cannot be combined with target_parameters: {why}")
    if config.init_lora_weights not in _PARAMETER_INITS:
        raise ValueError(f"{name}.init_lora_weights={config.init_lora_weights!r} cannot be combined with "
                         "target_parameters: it reads a module's weight matrix; use True, False or 'gaussian'")
