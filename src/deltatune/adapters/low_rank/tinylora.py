"""TinyLoRA layers: a frozen truncated SVD of each weight, steered by a tiny vector the model shares.

Per targeted layer the rank-``r`` SVD ``W ≈ U_r Σ_r V_rᵀ`` is kept frozen as ``tinylora_A =
√Σ_r V_rᵀ`` (r, in) and ``tinylora_B = U_r √Σ_r`` (out, r), rounded to the base weight's dtype
(computed in float32, PEFT's call, so the same weights give PEFT's numbers and signs; a 4-bit
base is decomposed from its dequantized weight) and kept in float32 on a half-precision base.
The update is ``ΔW = B R A`` with ``R = Σ_i v[i] P[i]``: ``P`` (u, r, r) is fixed, drawn from
N(0, 1/r) by a CPU generator seeded with ``projection_seed`` + the layer's position among the
targets (of the first adapter that wrapped the layer, as PEFT numbers it); ``v`` (u,) is trained.
Files hold no scaling: there is none (PEFT's TinyLoRA has no alpha).

``v`` lives on the model (``TinyVectors``), one per group of neighbouring layers
(``weight_tying``), and is written as ``base_model.tinylora_v.<group>``, owned by no layer.
Files always carry each layer's ``tinylora_A``/``tinylora_B`` (they are loaded, not recomputed),
and ``tinylora_P`` when ``save_projection`` is set (otherwise it is redrawn from the seed). ``P``
is one tensor per layer, not one per adapter, so ``seeded_projections.py`` (VeRA's shared
projections) does not fit; ``v`` is held as Uni-LoRA holds its vector.
"""

from __future__ import annotations

import warnings
from typing import Iterator, Optional

import torch
from torch import nn

from ...config.low_rank import TinyLoraConfig
from ..linear_base import LinearAdapterLayer, check_linear_like
from ..method import FILE_PREFIX, LayerMethod, register_method
from ..shared import TrainedOncePerAdapter, UnsavedBuffers

VECTORS_ATTR = "deltatune_tinylora_v"
V_PREFIX = "base_model.tinylora_v."
FIXED_KINDS = ("tinylora_A", "tinylora_B", "tinylora_P")


class TinyVectors(TrainedOncePerAdapter):
    """Each TinyLoRA adapter's trained vectors, one per group of layers: ``tinylora_v[adapter][group]``."""

    attribute = "tinylora_v"

    def __init__(self) -> None:
        super().__init__(nn.ModuleDict())


def svd_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (√Σ_r V_rᵀ, U_r √Σ_r) of ``weight`` (out, in), in ``weight``'s dtype.

    The SVD runs in float32 on the weight's device and the factors are rounded to the weight's
    dtype before the square root is taken, in PEFT's order, so the bits agree with PEFT's."""
    dtype = weight.dtype
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
    U_r, S_r, V_r = U[:, :r].to(dtype), S[:r].to(dtype), Vh[:r, :].to(dtype)
    root = torch.sqrt(S_r)
    return (root.unsqueeze(1) * V_r).contiguous(), (U_r * root.unsqueeze(0)).contiguous()


def seeded_projection(u: int, r: int, seed: int) -> torch.Tensor:
    """P (u, r, r) from N(0, 1/r), float32, drawn by a CPU generator so every machine redraws it."""
    generator = torch.Generator().manual_seed(seed)
    return torch.normal(mean=0.0, std=1.0 / (r ** 0.5), size=(u, r, r), generator=generator)


def tying_groups(count: int, weight_tying: float) -> list[int]:
    """The group of each of ``count`` layers (in module order): ``weight_tying`` 0 gives each its
    own, 1 one group; in between, runs of neighbours, the last group taking the remainder."""
    groups = max(1, round(count * (1.0 - weight_tying)))
    size = max(1, count // groups)
    return [min(i // size, groups - 1) for i in range(count)]


def stored_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``v``, A, B and P: a float32/float64 base's own; float32 for half-precision
    bases (PEFT's default upcast of adapter tensors, after A, B and P are rounded to the base's)."""
    return base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32


class TinyLoraLinear(LinearAdapterLayer):
    adapter_dict_names = FIXED_KINDS

    def __init__(self, base_layer: nn.Module, vectors: TinyVectors, fan_in_fan_out: bool = False):
        super().__init__(base_layer, fan_in_fan_out)
        for kind in FIXED_KINDS:
            setattr(self, kind, UnsavedBuffers())
        self.tinylora_dropout = nn.ModuleDict()
        self.vectors = (vectors,)  # a reference, not a submodule: the vectors are registered once on the model
        self.r: dict[str, int] = {}
        self.v_key: dict[str, str] = {}  # adapter -> its group's key in TinyVectors
        self.base_dtype: dict[str, torch.dtype] = {}  # the dtype the fixed tensors were rounded to
        # P's seed offset: this layer's position among the targets of the adapter that wrapped it
        # first, kept for every later adapter too (PEFT numbers a layer once, when it wraps it)
        self.seed_index: Optional[int] = None

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        return iter(())  # the layer trains nothing of its own; TinyVectors holds v

    def _forget(self, name: str) -> None:
        super()._forget(name)
        for kind in FIXED_KINDS:
            if name in getattr(self, kind):
                del getattr(self, kind)[name]
        if name in self.tinylora_dropout:
            del self.tinylora_dropout[name]
        self.r.pop(name, None)
        self.v_key.pop(name, None)
        self.base_dtype.pop(name, None)

    def add(self, name: str, config: TinyLoraConfig, key: str, from_file: bool = False) -> None:
        """The SVD factors now; ``P`` and the group are set by ``TinyLoraMethod`` once all targets are known."""
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        weight = self.base_weight()
        r = min(config.r, in_features, out_features)  # the SVD has no more directions than that
        base_dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        # rounded to the base's dtype, then kept (and saved) in float32 on a half-precision base,
        # where PEFT upcasts its adapter tensors
        dtype = stored_dtype(base_dtype)
        device = torch.device("cpu") if weight.is_meta else weight.device
        if from_file:  # the file carries A and B (PEFT writes them): no SVD to compute
            A, B = torch.zeros(r, in_features), torch.zeros(out_features, r)
        elif weight.is_meta:
            raise ValueError("TinyLoRA decomposes the base weight, but this layer's weight is on the meta "
                             "device (not loaded yet); add the adapter once the weights are loaded")
        else:
            A, B = svd_factors(self.canonical(weight.detach()), r)
        self.tinylora_A[name] = A.to(device, dtype)
        self.tinylora_B[name] = B.to(device, dtype)
        self.tinylora_P[name] = torch.zeros(config.u, r, r, dtype=dtype, device=device)
        p = config.tinylora_dropout
        self.tinylora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.r[name] = r
        self.base_dtype[name] = base_dtype
        self.scaling[name] = 1.0

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"tinylora_A": self.tinylora_A[name], "tinylora_B": self.tinylora_B[name]}

    def core(self, name: str) -> torch.Tensor:
        """R = Σ_i v[i] P[i] (r, r), in v's dtype."""
        v = self.vectors[0].tinylora_v[name][self.v_key[name]]
        return torch.einsum("i,ijk->jk", v, self.tinylora_P[name].to(v.device, v.dtype))

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        A, B = self.tinylora_A[name], self.tinylora_B[name]
        x = self.tinylora_dropout[name](x).to(A.dtype)
        h = nn.functional.linear(nn.functional.linear(x, A), self.core(name).to(A.dtype))
        # added in the wider dtype and rounded once, by the layer's forward, as PEFT rounds it
        return result + nn.functional.linear(h, B)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = B R A in (out, in) layout, float32."""
        A, B = self.tinylora_A[name].float(), self.tinylora_B[name].float()
        return B @ self.core(name).detach().float() @ A

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        return self.canonical(self.canonical(weight) + self.delta_weight(name).to(weight.device))


def tinylora_layers(model: nn.Module, name: str) -> list[tuple[str, TinyLoraLinear]]:
    """(key, layer) of every layer holding adapter ``name``, in module order (PEFT's numbering)."""
    return [(k, m) for k, m in model.named_modules() if isinstance(m, TinyLoraLinear) and m.has_adapter(name)]


class _EndingWith(set):
    """The keys a file may leave out: every layer's ``tinylora_P`` (redrawn from the seed)."""

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.endswith(".tinylora_P")


class TinyLoraMethod(LayerMethod):
    def __init__(self) -> None:
        super().__init__(TinyLoraLinear, self._make, bias_only="tinylora_only")
        self._vectors: Optional[TinyVectors] = None

    def _make(self, module: nn.Module, config: TinyLoraConfig, key: str) -> TinyLoraLinear:
        check_linear_like(module, "TinyLoRA")
        return TinyLoraLinear(module, self._vectors, config.fan_in_fan_out)

    def inject(self, model: nn.Module, config: TinyLoraConfig, name: str, from_file: bool) -> None:
        vectors = getattr(model, VECTORS_ATTR, None)
        if vectors is None:
            vectors = TinyVectors()
            setattr(model, VECTORS_ATTR, vectors)
        self._vectors = vectors
        try:
            super().inject(model, config, name, from_file)
        finally:
            self._vectors = None
        layers = tinylora_layers(model, name)
        groups = tying_groups(len(layers), config.weight_tying)
        trained = nn.ParameterDict()
        for index, ((_, layer), group) in enumerate(zip(layers, groups)):
            layer.vectors = (vectors,)  # layers made for an earlier adapter may hold an older holder
            layer.v_key[name] = str(group)
            if layer.seed_index is None:
                layer.seed_index = index
            projection = seeded_projection(config.u, layer.r[name], config.projection_seed + layer.seed_index)
            fixed = layer.tinylora_P[name]
            base_dtype = layer.base_dtype[name]
            layer.tinylora_P[name] = projection.to(fixed.device, base_dtype).to(fixed.dtype)
            if str(group) not in trained:  # the group's first layer sets v's dtype and device
                trained[str(group)] = nn.Parameter(self._first_v(config, fixed.device, base_dtype))
        vectors.tinylora_v[name] = trained

    @staticmethod
    def _first_v(config: TinyLoraConfig, device: torch.device, base_dtype: torch.dtype) -> torch.Tensor:
        v = torch.zeros(config.u, dtype=base_dtype)
        if config.init_weights == "uniform":  # drawn group by group from the global generator, as PEFT draws
            nn.init.uniform_(v, -config.init_v_bound, config.init_v_bound)
        # True: zero, so the adapter starts as a no-op; False: PEFT leaves the memory unset, zero here too
        return v.to(device, stored_dtype(base_dtype))

    def remove(self, model: nn.Module, name: str) -> None:
        vectors = getattr(model, VECTORS_ATTR, None)
        if vectors is None:
            return
        vectors.delete_adapter(name)
        if not vectors.adapter_names:
            delattr(model, VECTORS_ATTR)

    def file_tensors(self, model: nn.Module, name: str, config: TinyLoraConfig) -> dict[str, torch.Tensor]:
        out = super().file_tensors(model, name, config)  # A and B per layer, modules_to_save copies
        if config.save_projection:
            for key, layer in tinylora_layers(model, name):
                out[f"{FILE_PREFIX}{key}.tinylora_P"] = layer.tinylora_P[name]
        for group, v in getattr(model, VECTORS_ATTR).tinylora_v[name].items():
            out[V_PREFIX + group] = v
        return out

    def optional_file_keys(self, config: TinyLoraConfig) -> set[str]:
        return _EndingWith()

    def prepare_load(self, model: nn.Module, name: str, config: TinyLoraConfig,
                     tensors: dict[str, torch.Tensor]) -> None:
        """Projections follow ``save_projection`` as PEFT's loading does: saved ones are used when
        it is set (redrawn from the seed, with a warning, when the file lacks them) and ignored,
        with a warning, when it is not."""
        saved = [k for k in tensors if k.endswith(".tinylora_P")]
        if config.save_projection and not saved:
            warnings.warn("the TinyLoRA file has save_projection=true but no tinylora_P tensors; "
                          "the projections are redrawn from projection_seed", stacklevel=2)
        elif not config.save_projection and saved:
            warnings.warn("the TinyLoRA file has save_projection=false but carries tinylora_P tensors; "
                          "they are ignored and the projections redrawn from projection_seed, as PEFT does",
                          stacklevel=2)
            for key in saved:
                del tensors[key]


register_method("TINYLORA", TinyLoraMethod())
