"""Frozen linear layers with quantized weights: ``Linear4bit`` (NF4/FP4) and ``Linear8bit``.

The forward pass dequantizes the weight to ``compute_dtype`` and multiplies. The backward
pass (for the input's gradient, which adapters below need) dequantizes again instead of
keeping the dequantized weight alive between the passes, so training memory stays near the
quantized size. 4-bit layers call ``kernels.four_bit``, which picks how (Triton kernels on a
GPU, the PyTorch reference with reused buffers on CPU). State-dict keys and tensors are
bitsandbytes', so a saved model loads in transformers + bitsandbytes and a bitsandbytes
checkpoint loads here.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import four_bit
from .blockwise import NestedState, QuantState, quantize_4bit
from .codes import code_4bit, dynamic_map
from .int8 import dequantize_int8, quantize_int8


class _DequantizedMatmul(torch.autograd.Function):
    """``x @ W.T`` where ``W`` is rebuilt from the quantized layer in both passes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantLinear") -> torch.Tensor:
        ctx.layer = layer
        return x @ layer.dequantize(x.dtype).T

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_out @ ctx.layer.dequantize(grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None


class QuantLinear(nn.Module):
    """Common part of the quantized linear layers: shape, bias, compute dtype, device moves."""

    quant_type: str = ""

    def __init__(self, in_features: int, out_features: int, bias: Optional[torch.Tensor],
                 compute_dtype: torch.dtype):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The (out, in) weight this layer stands for, in ``dtype`` (default: compute dtype)."""
        raise NotImplementedError

    def set_weight(self, weight: torch.Tensor) -> None:
        """Re-quantize a new (out, in) weight into this layer with the same settings."""
        raise NotImplementedError

    def requantized(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> "QuantLinear":
        """A new layer with this layer's settings storing ``weight`` (out, in) and ``bias``."""
        raise NotImplementedError

    def _move(self, device: torch.device) -> None:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def storage_bytes(self) -> int:
        """Bytes of everything stored for the weight (packed values and scales)."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` without the bias; the dequantized ``W`` is not kept for backward."""
        return _DequantizedMatmul.apply(x, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x.to(self.compute_dtype))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def _apply(self, fn, recurse: bool = True):
        # ``model.to(dtype)`` must not cast the packed bytes or scales (that would change what
        # they mean); only the device follows, and the compute dtype follows a float cast.
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.device))
        if probe.device != self.device:
            self._move(probe.device)
        if probe.dtype.is_floating_point:
            self.compute_dtype = probe.dtype
        return self

    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight."""
        dtype = dtype or self.compute_dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant={self.quant_type}, compute_dtype={self.compute_dtype}")


class Linear4bit(QuantLinear):
    """A linear layer stored as blockwise NF4/FP4 (optionally with double-quantized scales)."""

    def __init__(self, packed: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor] = None,
                 compute_dtype: torch.dtype = torch.float32):
        out_features, in_features = state.shape
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.weight = packed
        self.quant_state = state
        self.quant_type = state.quant_type

    @classmethod
    def from_linear(cls, linear: nn.Module, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: Optional[torch.dtype] = None) -> "Linear4bit":
        weight = linear.weight.detach()
        packed, state = quantize_4bit(weight, quant_type, blocksize, double_quant)
        return cls(packed, state, linear.bias, compute_dtype or weight.dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        if self.weight.is_meta:  # a layer not yet loaded (FSDP2 quantizes it into shards later)
            return torch.empty(self.quant_state.shape, dtype=dtype or self.compute_dtype, device="meta")
        return four_bit.dequantize(self.weight, self.live_state(), dtype or self.compute_dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return four_bit.matmul(x, self.weight, self.live_state())

    # ----- sharding ------------------------------------------------------------------------------
    def expose_to_sharding(self) -> None:
        """Hold the packed bytes and the block scales as frozen parameters, so FSDP2 cuts them into
        rows with the other weights and gathers them whole only while the block runs. Both are
        uint8 (float32 scales as their bytes), so a bfloat16 mixed-precision policy, which casts
        floating-point parameters, leaves them as they are."""
        if isinstance(self._parameters.get("weight"), nn.Parameter):
            return
        packed = self.__dict__.pop("weight")
        self.weight = nn.Parameter(packed, requires_grad=False)
        state = self.quant_state
        self.absmax = nn.Parameter(state.absmax.contiguous().view(torch.uint8), requires_grad=False)
        self._absmax_dtype = state.absmax.dtype
        # the scales live in the parameter (an empty stand-in on the CPU for a layer still on meta,
        # which has no data to move when the model is given storage)
        stand_in = torch.empty(0, dtype=state.absmax.dtype, device="cpu" if packed.is_meta else packed.device)
        self.quant_state = dataclasses.replace(state, absmax=stand_in)

    def live_state(self) -> QuantState:
        """The quantization state, with the block scales the ``absmax`` parameter holds right now
        when ``expose_to_sharding`` moved them there."""
        scales = self._parameters.get("absmax")
        if scales is None:
            return self.quant_state
        return dataclasses.replace(self.quant_state, absmax=scales.view(self._absmax_dtype))

    def set_weight(self, weight: torch.Tensor) -> None:
        s = self.quant_state
        packed, state = quantize_4bit(weight.to(s.dtype), s.quant_type, s.blocksize, s.nested is not None)
        self.weight, self.quant_state = packed, state

    def requantized(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> "Linear4bit":
        s = self.quant_state
        packed, state = quantize_4bit(weight.to(s.dtype), s.quant_type, s.blocksize, s.nested is not None)
        return Linear4bit(packed, state, bias, self.compute_dtype)

    def _move(self, device: torch.device) -> None:
        if "weight" not in self._parameters:  # parameters (under sharding) were moved by nn.Module
            self.weight = self.weight.to(device)
        self.quant_state = self.quant_state.to(device)

    def storage_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.live_state().storage_bytes()

    # ----- bitsandbytes' state-dict layout -----------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias (and, sharded, weight, absmax)
        destination.pop(prefix + "absmax", None)
        destination.update(bnb_4bit_tensors(self.weight, self.live_state(), prefix + "weight"))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = [k for k in state_dict if k.startswith(prefix + "weight")]
        if prefix + "weight" in state_dict:
            packed, state = state_from_tensors({k[len(prefix):]: state_dict.pop(k) for k in keys}, prefix)
            self.weight, self.quant_state = packed.to(self.device), state.to(self.device)
            self.quant_type = state.quant_type
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for k in keys:
            if k in missing_keys:
                missing_keys.remove(k)


class Linear8bit(QuantLinear):
    """A linear layer stored as row-wise int8 with float32 row maxima (``SCB``)."""

    quant_type = "int8"

    def __init__(self, weight: torch.Tensor, row_max: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 compute_dtype: torch.dtype = torch.float32):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.weight = weight
        self.SCB = row_max

    @classmethod
    def from_linear(cls, linear: nn.Module, compute_dtype: Optional[torch.dtype] = None) -> "Linear8bit":
        weight = linear.weight.detach()
        q, row_max = quantize_int8(_as_half(weight))
        return cls(q, row_max, linear.bias, compute_dtype or weight.dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_int8(self.weight, self.SCB, dtype or self.compute_dtype)

    def set_weight(self, weight: torch.Tensor) -> None:
        self.weight, self.SCB = quantize_int8(_as_half(weight))

    def requantized(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> "Linear8bit":
        return Linear8bit(*quantize_int8(_as_half(weight)), bias, self.compute_dtype)

    def _move(self, device: torch.device) -> None:
        self.weight, self.SCB = self.weight.to(device), self.SCB.to(device)

    def storage_bytes(self) -> int:
        return self.weight.numel() + self.SCB.numel() * 4

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight
        destination[prefix + "SCB"] = self.SCB
        destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)  # "row"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "weight" in state_dict:
            weight, scb = state_dict.pop(prefix + "weight"), state_dict.pop(prefix + "SCB", None)
            fmt = state_dict.pop(prefix + "weight_format", torch.tensor(0))
            if scb is None or weight.dtype != torch.int8:
                raise ValueError(f"{prefix}weight: an int8 layer needs an int8 'weight' and a float32 'SCB'")
            if int(fmt) != 0:
                raise ValueError(f"{prefix}weight_format={int(fmt)}: only the row-wise format (0) is supported")
            self.weight, self.SCB = weight.to(self.device), scb.float().to(self.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for k in (prefix + "weight", prefix + "SCB", prefix + "weight_format"):
            if k in missing_keys:
                missing_keys.remove(k)


def _as_half(weight: torch.Tensor) -> torch.Tensor:
    """LLM.int8 quantizes from float16 (bitsandbytes casts first); doing the same gives its bytes."""
    return weight.to(torch.float16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bnb_4bit_tensors(packed: torch.Tensor, s: QuantState, key: str) -> dict[str, torch.Tensor]:
    """bitsandbytes' state-dict entries of one 4-bit tensor stored under ``key``: the packed bytes,
    ``key.absmax``, ``key.quant_map``, the nested scales and the JSON record of the settings."""
    out = {key: packed, f"{key}.absmax": s.absmax, f"{key}.quant_map": s.code}
    extra = {"quant_type": s.quant_type, "blocksize": s.blocksize, "dtype": _dtype_name(s.dtype),
             "shape": list(s.shape)}
    if s.nested is not None:
        out[f"{key}.nested_absmax"] = s.nested.absmax
        out[f"{key}.nested_quant_map"] = s.nested.code
        extra.update(nested_blocksize=s.nested.blocksize, nested_dtype="float32",
                     nested_offset=s.nested.offset.item())
    record = json.dumps(extra).encode("utf-8")
    out[f"{key}.quant_state.bitsandbytes__{s.quant_type}"] = torch.tensor(list(record), dtype=torch.uint8)
    return out


def state_from_tensors(tensors: dict[str, torch.Tensor], where: str = "") -> tuple[torch.Tensor, QuantState]:
    """Rebuild ``(packed, QuantState)`` from bitsandbytes' keys (``weight``, ``weight.absmax``, ...)."""
    packed_keys = [k for k in tensors if k.startswith("weight.quant_state.bitsandbytes__")]
    if len(packed_keys) != 1:
        raise ValueError(f"{where}weight: expected one 'weight.quant_state.bitsandbytes__<type>' entry, "
                         f"found {packed_keys or 'none'}")
    try:
        extra = json.loads(bytes(tensors[packed_keys[0]].tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where}{packed_keys[0]}: not a JSON quantization record ({err})") from None
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in extra:
            raise ValueError(f"{where}{packed_keys[0]}: field {field!r} is missing")
    for key in ("weight", "weight.absmax"):
        if key not in tensors:
            raise ValueError(f"{where}{key} is missing")
    quant_type = extra["quant_type"]
    code = tensors.get("weight.quant_map", code_4bit(quant_type))
    nested = None
    if "nested_offset" in extra:
        if "weight.nested_absmax" not in tensors:
            raise ValueError(f"{where}weight.nested_absmax is missing (the record says the scales are nested)")
        nested = NestedState(tensors["weight.nested_absmax"].float(),
                             tensors.get("weight.nested_quant_map", dynamic_map()).float(),
                             int(extra.get("nested_blocksize", 256)), torch.tensor(float(extra["nested_offset"])))
    state = QuantState(tensors["weight.absmax"], torch.Size(extra["shape"]), getattr(torch, extra["dtype"]),
                       int(extra["blocksize"]), quant_type, code.float(), nested)
    expected = (state.shape.numel() + 1) // 2
    if tensors["weight"].numel() != expected:
        raise ValueError(f"{where}weight: {tensors['weight'].numel()} packed bytes, but shape "
                         f"{list(state.shape)} needs {expected}")
    return tensors["weight"], state
