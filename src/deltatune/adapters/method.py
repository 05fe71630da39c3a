"""How each kind of adapter is added to a model and mapped to file keys: the ``Method`` protocol.

``deltatune.adapter_ops`` and ``deltatune.io`` only talk to methods through this protocol, so a new
method is a config class, a module in ``adapters/`` and one ``register_method`` call. Most
methods wrap chosen modules in an ``AdapterLayer`` (``LayerMethod`` does all of that work);
soft prompts live at the model level and implement the protocol themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from ..config import AdapterConfig, TargetedConfig
from ..module_tree import replace_module
from ..targeting import expand_target_modules, find_targets, modules_to_save_targets
from ..targeting_experts import warn_untargeted_experts
from .base import AdapterLayer, ModulesToSave, adapter_layers, base_parameters
from .linear_base import check_linear_like

FILE_PREFIX = "base_model.model."


class Method:
    """What a method does at the model level; the defaults suit methods without layers."""

    # False where a row's output depends on the other rows of its batch (Lily's router averages over
    # the batch): such an adapter is never routed per row beside others, and the server batches it alone
    rows_independent: bool = True

    def prepare(self, model: nn.Module, config: AdapterConfig) -> None:
        """Fill the config's model-dependent fields (resolved targets, sizes) before adding."""

    def inject(self, model: nn.Module, config: AdapterConfig, name: str, from_file: bool) -> None:
        """Create adapter ``name``; with ``from_file`` its values will be loaded, so skip initialisation."""
        raise NotImplementedError

    def remove(self, model: nn.Module, name: str) -> None:
        """Drop model-level state of adapter ``name`` (layers are cleaned by ``deltatune.adapter_ops``)."""

    def extra_parameters(self, model: nn.Module, name: str, config: AdapterConfig) -> Iterator[nn.Parameter]:
        """Base-model parameters that adapter ``name`` trains too (biases, for some configs)."""
        return iter(())

    def file_tensors(self, model: nn.Module, name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
        """File key -> live tensor for adapter ``name``, in the file's layout."""
        return {}

    def optional_file_keys(self, config: AdapterConfig) -> set[str]:
        """Keys of ``file_tensors`` that a file may leave out (values the method can rebuild)."""
        return set()

    def prepare_load(self, model: nn.Module, name: str, config: AdapterConfig,
                     tensors: dict[str, torch.Tensor]) -> None:
        """Adjust the model to a file's tensors after ``inject`` and before values are copied."""

    def loss_penalty(self, model: nn.Module, name: str, config: AdapterConfig) -> Optional[torch.Tensor]:
        """A term the training loop adds to the loss (AdaLoRA's orthogonality penalty)."""
        return None

    def auxiliary_loss(self, model: nn.Module, name: str, config: AdapterConfig,
                       batch: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """A term of the supervised loss that the training loop adds right after the forward of
        ``batch`` (ShadowPEFT's shadow network predicting ``batch["labels"]`` on its own)."""
        return None

    def before_step(self, model: nn.Module, name: str, config: AdapterConfig, step: int) -> None:
        """Called by the training loop before optimizer step ``step`` (0-based) takes its first
        micro-batch (DyLoRA draws the step's rank)."""

    def after_step(self, model: nn.Module, name: str, config: AdapterConfig, step: int) -> None:
        """Called by the training loop after each optimizer step, gradients still present."""

    def training_state(self, model: nn.Module, name: str, config: AdapterConfig) -> dict:
        """What a resumed run needs beyond the tensors (AdaLoRA's scores and ranks); tensors and plain values."""
        return {}

    def load_training_state(self, model: nn.Module, name: str, config: AdapterConfig, state: dict) -> None:
        """Restore ``training_state`` in a resumed run."""

    def companion_files(self, model: nn.Module, name: str,
                        config: AdapterConfig) -> dict[str, tuple[AdapterConfig, dict[str, torch.Tensor]]]:
        """Adapters saved in sub-folders beside adapter ``name``'s own files: sub-folder ->
        (config, file key -> tensor). X-LoRA keeps its LoRA experts there, as PEFT does."""
        return {}

    def locate_companions(self, config: AdapterConfig, folder: Path) -> None:
        """Point ``config``, just read from ``folder``, at the companion sub-folders saved there."""


class MethodConflict(TypeError):
    """A targeted module already holds adapters of another method (one method per module)."""


def _trained_biases(model: nn.Module, name: str, bias: str, layer_class: type,
                    only: str) -> Iterator[tuple[str, nn.Parameter]]:
    """(key, bias) that an adapter with ``bias`` = ``"all"`` or ``only`` trains."""
    if bias == "all":
        base = {id(p) for _, p in base_parameters(model)}
        # every name of a shared bias (layer_replication's copies), as PEFT's state dict has them
        for key, p in model.named_parameters(remove_duplicate=False):
            if key.endswith("bias") and id(p) in base:
                yield key, p
    elif bias == only:
        for key, layer in adapter_layers(model):
            b = getattr(getattr(layer, "base_layer", None), "bias", None)
            if isinstance(layer, layer_class) and layer.has_adapter(name) and b is not None:
                yield f"{key}.base_layer.bias", b


class LayerMethod(Method):
    """A method that wraps each targeted module in ``layer_class`` (made by ``make_layer``).

    ``bias_only``: the config's ``bias`` value (``"lora_only"``, ``"hra_only"``…) that trains the
    biases of the wrapped layers; with it, ``bias="all"`` trains every base bias. Trained biases are
    saved in the file, as PEFT saves them. Empty for methods whose configs have no such choice.
    """

    bias_only = ""  # a subclass may set it here instead of passing it

    def __init__(self, layer_class: type[AdapterLayer],
                 make_layer: Optional[Callable[[nn.Module, AdapterConfig, str], AdapterLayer]] = None,
                 bias_only: str = ""):
        self.layer_class = layer_class
        self.make_layer = make_layer or self._make
        if bias_only:
            self.bias_only = bias_only

    def _make(self, module: nn.Module, config: AdapterConfig, key: str) -> AdapterLayer:
        """The layer when no ``make_layer`` is given: ``layer_class(module)`` around a linear-like module."""
        check_linear_like(module, config.peft_type)
        return self.layer_class(module)

    def trained_biases(self, model: nn.Module, name: str, config: AdapterConfig) -> Iterator[tuple[str, nn.Parameter]]:
        """(key, bias) of the base biases adapter ``name`` trains (``bias_only``)."""
        if not self.bias_only:
            return iter(())
        return _trained_biases(model, name, getattr(config, "bias", "none"), self.layer_class, self.bias_only)

    def extra_parameters(self, model: nn.Module, name: str, config: AdapterConfig) -> Iterator[nn.Parameter]:
        for _, p in self.trained_biases(model, name, config):
            yield p

    def prepare(self, model: nn.Module, config: AdapterConfig) -> None:
        assert isinstance(config, TargetedConfig)
        config.target_modules = expand_target_modules(model, config)
        warn_untargeted_experts(model, config)  # fused expert weights no target reaches (MoE models)

    def inject(self, model: nn.Module, config: AdapterConfig, name: str, from_file: bool) -> None:
        assert isinstance(config, TargetedConfig)
        targets = find_targets(model, config)
        saved = modules_to_save_targets(model, config.modules_to_save or [])
        if not targets and not saved:
            sample = [k for k, m in model.named_modules() if k][:12]
            raise ValueError(
                f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}; "
                f"some module names: {sample}"
            )
        if config.modules_to_save and not saved:
            raise ValueError(f"modules_to_save={config.modules_to_save!r} matched no module")
        for key, module in targets:
            layer = module
            if isinstance(module, AdapterLayer) and not isinstance(module, self.layer_class):
                raise MethodConflict(
                    f"module {key!r} already holds a {type(module).__name__} adapter; one method per module "
                    f"(add the {config.peft_type} adapter to other modules, or delete the other adapter)"
                )
            if not isinstance(module, self.layer_class):
                try:
                    layer = self.make_layer(module, config, key)
                except TypeError as err:
                    raise TypeError(f"module {key!r}: {err}") from None
                replace_module(model, key, layer)
            layer.add(name, config, key, from_file=from_file)
            layer.train(module.training)  # new submodules start in train mode; follow the model's
        add_saved_copies(model, saved, name)

    def file_tensors(self, model: nn.Module, name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, layer in model.named_modules():
            if isinstance(layer, ModulesToSave) and name in layer.adapter_names:
                for sub, tensor in layer.modules_to_save[name].state_dict(keep_vars=True).items():
                    out[f"{FILE_PREFIX}{key}.{sub}"] = tensor
            elif isinstance(layer, self.layer_class) and layer.has_adapter(name):
                for sub, tensor in layer.file_tensors(name).items():
                    out[f"{FILE_PREFIX}{key}.{sub}"] = tensor
        for key, p in self.trained_biases(model, name, config):
            out[FILE_PREFIX + key] = p
        return out


METHODS: dict[str, Method] = {}


def register_method(peft_type: str, method: Method) -> None:
    METHODS[peft_type] = method


def method_for(config: AdapterConfig) -> Method:
    """The registered method of ``config``'s ``peft_type``, or a TypeError that lists the known ones."""
    method = METHODS.get(config.peft_type)
    if method is None:
        raise TypeError(f"unsupported config type {type(config).__name__}; known methods: {sorted(METHODS)}")
    return method


def add_saved_copies(model: nn.Module, saved: list[tuple[str, nn.Module]], name: str) -> None:
    """Give adapter ``name`` a trainable copy of each (key, module) in ``saved`` (PEFT's
    ``modules_to_save``), wrapping a module the first time."""
    for key, module in saved:
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        if wrapper is not module:
            replace_module(model, key, wrapper)
        wrapper.add(name)
        wrapper.train(module.training)
