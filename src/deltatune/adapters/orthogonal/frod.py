"""FRoD layers: each targeted weight rebuilt as ``W' = U (S + diag(λ)) Vᵀ`` and trained through λ and S.

``V`` (in, in) is shared by the modules of one role (``frod_basis.role_of``) and ``S``'s
positions too; both are computed from the base weights when an adapter is made and live on the
model (``deltatune_shared`` buffers ``frod_V_<role>_<adapter>``, ``frod_s_indices_…``,
``frod_s_size_…``). Per layer ``U`` (out, in) is frozen and never saved: it is recomputed on every
load from the base weight and the ``V`` actually used (the file's); ``λ`` (in,) and ``S``'s values
are trained. A new adapter has ``S = 0`` and ``U diag(λ) Vᵀ = W`` up to rounding. (PEFT computes
``U`` from a ``V`` it recomputes from the base before reading the file's; both are the same bits
when the file was made on this base, and where they are not, e.g. another LAPACK flips an
eigenvector's sign, only the file's ``V`` keeps ``U`` consistent with it.)

Forward, as PEFT computes it: ``z = x V``, ``y = (z Sᵀ + z ⊙ λ) Uᵀ + b``; the base layer is not
called when one adapter acts alone (the rebuilt weight replaces ``W``). With several adapters
at once, dropout in training, or another adapter merged, each adds ``W'h − W h`` (``h`` the dropped
input, ``W`` the unmerged base weight), which is what merging folds in: ``ΔW = W' − W``.

Files (PEFT's keys): ``<layer>.frod_lambda_l`` and ``<layer>.frod_lambda_s_values`` per layer;
with ``save_projection``, ``base_model.frod_V.<role>`` (the base weight's dtype),
``base_model.frod_s_indices.<role>`` (2, count) and ``base_model.frod_s_size.<role>`` (2,), int64.
A 4-bit base is decomposed from its dequantized weight (PEFT cannot decompose a 4-bit layer).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

from ...config.frod import FrodConfig
from ..linear_base import LinearAdapterLayer, check_linear_like
from ..low_rank.tinylora import stored_dtype
from ..method import LayerMethod, register_method
from ..shared import SharedTensors, UnsavedBuffers, drop_shared, shared_tensors
from .frod_basis import factor_weight, role_of, role_projections, sparse_count

FILE_KINDS = {"frod_V": "base_model.frod_V.", "frod_s_indices": "base_model.frod_s_indices.",
              "frod_s_size": "base_model.frod_s_size."}
HALF = (torch.float16, torch.bfloat16)


class FrodLinear(LinearAdapterLayer):
    """A linear layer rebuilt as ``U(S + diag λ)Vᵀ`` from its role's shared basis (FRoD)."""

    adapter_dict_names = ("frod_lambda_l", "frod_lambda_s_values")

    def __init__(self, base_layer: nn.Module, shared: SharedTensors, fan_in_fan_out: bool = False):
        super().__init__(base_layer, fan_in_fan_out)
        self.frod_lambda_l = nn.ParameterDict()
        self.frod_lambda_s_values = nn.ParameterDict()
        self.frod_U = UnsavedBuffers()  # frozen, recomputed from the base weight on every load
        self.frod_dropout = nn.ModuleDict()
        self.role: dict[str, str] = {}
        self._shared = (shared,)  # a reference, not a submodule: the holder is registered once on the model

    def _forget(self, name: str) -> None:
        super()._forget(name)
        if name in self.frod_U:
            del self.frod_U[name]
        if name in self.frod_dropout:
            del self.frod_dropout[name]
        self.role.pop(name, None)

    def base_dtype(self) -> torch.dtype:
        weight = self.base_weight()
        return weight.dtype if weight.dtype.is_floating_point else torch.float32

    def add(self, name: str, config: FrodConfig, key: str, from_file: bool = False) -> None:
        """λ, S's values and a placeholder U; ``FrodMethod`` computes U and λ once the role's
        basis is known."""
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        weight = self.base_weight()
        if weight.is_meta:
            raise ValueError("FRoD decomposes the base weight, but this layer's weight is on the meta device "
                             "(not loaded yet); add the adapter once the weights are loaded")
        in_features, out_features = self.in_out
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        device = weight.device
        count = sparse_count(in_features, config.sparse_rate)
        self.role[name] = role_of(key)
        self.frod_U[name] = torch.zeros(out_features, in_features, dtype=dtype, device=device)
        self.frod_lambda_l[name] = nn.Parameter(torch.zeros(in_features, dtype=stored_dtype(dtype), device=device))
        self.frod_lambda_s_values[name] = nn.Parameter(torch.zeros(count, dtype=stored_dtype(dtype), device=device))
        p = config.frod_dropout
        self.frod_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.scaling[name] = 1.0

    def set_factors(self, name: str, basis: torch.Tensor, set_lambda: bool) -> None:
        """U (and, with ``set_lambda``, λ) from the unmerged base weight and ``basis``, rounded
        to the base's dtype as PEFT rounds them."""
        dtype = self.base_dtype()
        weight = self.canonical(self.unmerged_weight().detach())
        unit, norms = factor_weight(basis.to(dtype), weight)
        U = self.frod_U[name]
        self.frod_U[name] = unit.to(U.device, dtype)
        if set_lambda:
            with torch.no_grad():
                self.frod_lambda_l[name].copy_(norms.to(dtype))

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"frod_lambda_l": self.frod_lambda_l[name], "frod_lambda_s_values": self.frod_lambda_s_values[name]}

    # ----- the rebuilt weight ------------------------------------------------------------------
    def _shared_part(self, kind: str, name: str) -> torch.Tensor:
        return self._shared[0].get(f"{kind}_{self.role[name]}", name)

    def _sparse(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """S as a coalesced sparse (in, in) tensor (PEFT's form: positions summed where repeated)."""
        indices = self._shared_part("frod_s_indices", name).to(device)
        width = self._shared_part("frod_V", name).shape[0]  # frod_s_size holds it too; its shape needs no sync
        values = self.frod_lambda_s_values[name].to(device, dtype)
        # positions are checked when a file is read (_check_projection): the invariant check is skipped
        return torch.sparse_coo_tensor(indices, values, (width, width), check_invariants=False).coalesce()

    def rebuilt(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """``h W'ᵀ`` without the bias: ``z = h V``, ``(z Sᵀ + z ⊙ λ) Uᵀ``, in ``h``'s dtype."""
        V = self._shared_part("frod_V", name).to(h.device, h.dtype)
        U = self.frod_U[name].to(h.device, h.dtype)
        lam = self.frod_lambda_l[name].to(h.device, h.dtype)
        z = h.reshape(-1, h.shape[-1]) @ V
        if self.frod_lambda_s_values[name].numel() == 0:
            zs = torch.zeros_like(z)
        elif z.dtype in HALF:  # no half-precision sparse matmul everywhere: a dense S, as PEFT does
            zs = z @ self._sparse(name, z.dtype, z.device).to_dense().t()
        else:
            zs = torch.sparse.mm(self._sparse(name, z.dtype, z.device), z.t()).t()
        out = F.linear(zs + z * lam, U)
        return out.reshape(*h.shape[:-1], out.shape[-1])

    def rebuilt_weight(self, name: str) -> torch.Tensor:
        """``W' = U (S + diag(λ)) Vᵀ`` (out, in), float32."""
        U = self.frod_U[name].float()
        V = self._shared_part("frod_V", name).to(U.device, torch.float32)
        lam = self.frod_lambda_l[name].detach().to(U.device, torch.float32)
        S = self._sparse(name, torch.float32, U.device).detach().to_dense()
        return U @ (S + torch.diag_embed(lam)) @ V.T

    # ----- forward -----------------------------------------------------------------------------
    def _stochastic(self, name: str) -> bool:
        dropout = self.frod_dropout[name]
        return isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0

    def _alone(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The layer's output with adapter ``name`` replacing the base weight (base not called)."""
        out = self.rebuilt(name, x)
        bias = self.bias
        return out if bias is None else out + bias.to(out.dtype)

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` plus ``W'h − W h``: the adapter's change, beside others or under dropout."""
        h = self.frod_dropout[name](x)
        base = self.canonical(self.unmerged_weight()).to(h.device, h.dtype)
        return result + self.rebuilt(name, h) - F.linear(h, base)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled or self.merged_adapters:
            return super().forward(x, *args, **kwargs)
        if self.row_plan is not None:
            # each row group has one adapter on the plain base: its rebuilt weight replaces W there
            result = self.base_layer(x, *args, **kwargs)
            for name, rows in self.row_plan.groups(x.shape[0], x.device):
                if not self.has_adapter(name):
                    continue
                part = x.index_select(0, rows)
                routed = (self.apply(name, part, result.index_select(0, rows)) if self._stochastic(name)
                          else self._alone(name, part))
                if torch.is_grad_enabled():
                    result = result.index_copy(0, rows, routed.to(result.dtype))
                else:  # inference: this forward's own tensor, filled in place
                    result.index_copy_(0, rows, routed.to(result.dtype))
            return result
        live = [n for n in self.active_adapters if self.has_adapter(n)]
        if len(live) == 1 and not self._stochastic(live[0]):
            return self._alone(live[0], x).to(x.dtype)
        return super().forward(x, *args, **kwargs)

    # ----- merging -----------------------------------------------------------------------------
    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        delta = self.rebuilt_weight(name).to(weight.device) - self.canonical(original)
        return self.canonical(self.canonical(weight) + delta)


def frod_layers(model: nn.Module, name: str) -> list[tuple[str, FrodLinear]]:
    """(key, layer) of every layer holding adapter ``name``, in module order."""
    return [(k, m) for k, m in model.named_modules() if isinstance(m, FrodLinear) and m.has_adapter(name)]


class FrodMethod(LayerMethod):
    """FRoD behind the Method protocol: the shared bases per module role, then one layer per target."""

    def __init__(self) -> None:
        super().__init__(FrodLinear, self._make, bias_only="frod_only")
        self._holder: SharedTensors | None = None

    def _make(self, module: nn.Module, config: FrodConfig, key: str) -> FrodLinear:
        check_linear_like(module, "FRoD")
        return FrodLinear(module, self._holder, config.fan_in_fan_out)

    def inject(self, model: nn.Module, config: FrodConfig, name: str, from_file: bool) -> None:
        """Wrap the targets, then compute the roles' bases and positions and each layer's U and
        λ; a file that carries the bases (``save_projection``) gets them in ``prepare_load``."""
        holder = shared_tensors(model)
        self._holder = holder
        try:
            super().inject(model, config, name, from_file)
        finally:
            self._holder = None
        layers = frod_layers(model, name)
        for _, layer in layers:
            layer._shared = (holder,)  # layers made for an earlier adapter may hold an older holder
        if from_file and config.save_projection:  # placeholders of the right shapes, filled from the file
            for _, layer in layers:
                role, width = layer.role[name], layer.in_out[0]
                if f"frod_V_{role}_{name}" not in holder.owners:
                    count = layer.frod_lambda_s_values[name].numel()
                    self._put(holder, name, role, torch.zeros(width, width, dtype=layer.base_dtype()),
                              torch.zeros(2, count, dtype=torch.long), layer)
            return
        weights = [(key, layer.canonical(layer.unmerged_weight().detach())) for key, layer in layers]
        projections = role_projections(weights, config.regularization_alpha, config.sparse_rate,
                                       config.projection_prng_key)
        for role, (basis, positions) in projections.items():
            first = next(layer for _, layer in layers if layer.role[name] == role)
            # V in the dtype of the role's first weight, as PEFT stores it
            self._put(holder, name, role, basis.to(first.base_dtype()), positions, first)
        for _, layer in layers:
            layer.set_factors(name, layer._shared_part("frod_V", name), set_lambda=not from_file)
        if not from_file and not config.init_weights:  # PEFT's non-identity start (a test aid)
            for _, layer in layers:
                with torch.no_grad():
                    nn.init.normal_(layer.frod_lambda_s_values[name], std=0.1)
                    lam = layer.frod_lambda_l[name]
                    lam.add_(torch.randn_like(lam) * 0.1)

    @staticmethod
    def _put(holder: SharedTensors, name: str, role: str, basis: torch.Tensor, positions: torch.Tensor,
             layer: FrodLinear) -> None:
        device = layer.base_weight().device
        width = basis.shape[0]
        holder.put(f"frod_V_{role}", name, basis.to(device))
        holder.put(f"frod_s_indices_{role}", name, positions.to(device))
        holder.put(f"frod_s_size_{role}", name, torch.tensor([width, width], dtype=torch.long, device=device))

    def remove(self, model: nn.Module, name: str) -> None:
        drop_shared(model, name)

    def _roles(self, model: nn.Module, name: str) -> list[str]:
        return sorted({layer.role[name] for _, layer in frod_layers(model, name)})

    def file_tensors(self, model: nn.Module, name: str, config: FrodConfig) -> dict[str, torch.Tensor]:
        out = super().file_tensors(model, name, config)  # λ and S's values per layer, modules_to_save copies
        if config.save_projection:
            holder = shared_tensors(model, create=False)
            for role in self._roles(model, name):
                for kind, prefix in FILE_KINDS.items():
                    out[prefix + role] = holder.get(f"{kind}_{role}", name)
        return out

    def prepare_load(self, model: nn.Module, name: str, config: FrodConfig,
                     tensors: dict[str, torch.Tensor]) -> None:
        """With ``save_projection`` the file's bases and positions are checked, taken, and each
        layer's U is computed from the file's V (PEFT refuses a file without them); without it,
        bases in the file are ignored with a warning, as PEFT ignores them."""
        saved = [k for k in tensors if k.startswith(tuple(FILE_KINDS.values()))]
        if not config.save_projection:
            if saved:
                warnings.warn("the FRoD file has save_projection=false but carries frod_V/frod_s_indices/"
                              "frod_s_size tensors; they are ignored and recomputed from the base weights and "
                              "projection_prng_key, as PEFT does", stacklevel=2)
                for key in saved:
                    del tensors[key]
            return
        if not saved:
            raise ValueError("the FRoD file has save_projection=true but no frod_V/frod_s_indices/frod_s_size "
                             "tensors; set save_projection to false in its adapter_config.json to recompute them "
                             "from the base weights (the values then depend on this base being the original)")
        holder = shared_tensors(model, create=False)
        layers = frod_layers(model, name)
        for role in self._roles(model, name):
            for kind, prefix in FILE_KINDS.items():
                key = prefix + role
                if key not in tensors:
                    raise ValueError(f"key {key!r} is missing (the file carries other FRoD projections)")
                width = holder.get(f"frod_V_{role}", name).shape[0]
                _check_projection(key, kind, tensors[key], holder.get(f"{kind}_{role}", name), width)
            with torch.no_grad():
                for kind, prefix in FILE_KINDS.items():
                    live = holder.get(f"{kind}_{role}", name)
                    live.copy_(tensors[prefix + role].to(live.device, live.dtype))
        for _, layer in layers:
            layer.set_factors(name, layer._shared_part("frod_V", name), set_lambda=False)


def _check_projection(key: str, kind: str, value: torch.Tensor, live: torch.Tensor, width: int) -> None:
    """A file's V, positions or size: the model's shape and kind of number, positions inside S
    (``width`` × ``width``), since a position outside it would make the sparse product read
    outside its memory."""
    if tuple(value.shape) != tuple(live.shape):
        raise ValueError(f"key {key!r} has shape {tuple(value.shape)} in the file but {tuple(live.shape)} in the model")
    if kind == "frod_V":
        if not value.is_floating_point():
            raise ValueError(f"key {key!r} has dtype {value.dtype} in the file; a floating-point basis is expected")
        return
    if value.dtype != torch.long:
        raise ValueError(f"key {key!r} has dtype {value.dtype} in the file but torch.int64 in the model")
    if kind == "frod_s_size" and value.tolist() != [width, width]:
        raise ValueError(f"key {key!r} is {value.tolist()} in the file but S is {[width, width]} in the model")
    if kind == "frod_s_indices" and value.numel() and (value.min() < 0 or value.max() >= width):
        raise ValueError(f"key {key!r} holds positions outside S (0 .. {width - 1})")


register_method("FROD", FrodMethod())
