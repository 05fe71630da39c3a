"""GGUF files for llama.cpp and Ollama: a merged model (or the plain base), and a LoRA adapter.

Written with the ``gguf`` package as llama.cpp's converters write them (``convert_hf_to_gguf.py``
for models, ``convert_lora_to_gguf.py`` for adapters): the same tensor names, metadata keys,
rotary layout and tensor types. Vectors (norms, biases) stay float32, as llama.cpp requires.
``q8_0`` and ``q4_0`` quantize matrices whose rows are a whole number of 32-value blocks; any
other matrix falls back to f16, and the report (and a log line) says which. In ``q4_0`` files the
token embedding and output head are ``q8_0``: llama.cpp's own quantizer also keeps them above
4 bits, since they cost the most quality.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import gguf
import numpy as np
import torch
from torch import nn

from ..files import write_atomically
from .gguf_arch import (
    add_hyperparameters, arch_for, gguf_name, permute_rows, rope_tensors, rotary_heads, tensor_names,
)
from .gguf_tokenizer import add_tokenizer

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
# --outtype -> (type of the matrices, general.file_type)
OUTTYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
ADAPTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # what llama.cpp's LoRA converter offers
KINDS = ("merged", "adapter", "base")
_EMBEDDING_AND_HEAD = ("token_embd.weight", "output.weight")


@dataclass
class GgufReport:
    """What was written: the file, its tensors by GGML type, and the tensors written in another
    type than asked (``"names: type (reason)"``, one entry per reason)."""

    path: str
    kind: str
    outtype: str
    tensors: int
    types: dict[str, int]
    bytes: int
    fallbacks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def check_outtype(outtype: str, kind: str = "merged") -> None:
    """A ValueError naming ``--outtype`` for a type this kind of file cannot be written in."""
    allowed = ADAPTER_OUTTYPES if kind == "adapter" else tuple(OUTTYPES)
    if outtype not in allowed:
        raise ValueError(f"--outtype {outtype!r} is not supported for a GGUF {kind} file; use one of "
                         f"{', '.join(allowed)}")


class _Encoder:
    """Turns tensors into GGUF data of the requested type, noting every fallback."""

    def __init__(self, outtype: str):
        self.outtype = outtype
        self.matrix_type = OUTTYPES[outtype][0]
        self.fallbacks: dict[str, list[str]] = {}  # "written as what, and why" -> tensor names
        self.types: dict[str, int] = {}

    def encode(self, name: str, tensor: torch.Tensor) -> tuple[np.ndarray, Q]:
        data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
        qtype = self.matrix_type
        if data.ndim <= 1 or name.endswith("_norm.weight"):
            qtype = Q.F32  # llama.cpp's kernels take vectors in float32 only
        elif self.outtype == "q4_0" and name in _EMBEDDING_AND_HEAD:
            qtype = Q.Q8_0
            self.fallbacks.setdefault("q8_0 (embedding and output head stay above 4 bits)", []).append(name)
        if qtype in (Q.Q8_0, Q.Q4_0):
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            if data.shape[-1] % block:
                why = f"f16 (rows of {data.shape[-1]} values are not whole {qtype.name} blocks of {block})"
                self.fallbacks.setdefault(why, []).append(name)
                qtype = Q.F16
        self.types[qtype.name] = self.types.get(qtype.name, 0) + 1
        return gguf.quants.quantize(data, qtype), qtype

    def report(self, path: Path, kind: str) -> GgufReport:
        notes = []
        for why, names in self.fallbacks.items():
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            notes.append(f"{', '.join(names[:3])}{more}: {why}")
        if notes:
            logger.warning("GGUF %s: not written as %s: %s", path.name, self.outtype, "; ".join(notes))
        return GgufReport(str(path), kind, self.outtype, sum(self.types.values()), dict(self.types),
                          path.stat().st_size, notes)


def _tied_head(model: nn.Module) -> bool:
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embedding is not None and head.weight.data_ptr() == embedding.weight.data_ptr()


def write_model_gguf(model: nn.Module, tokenizer, path: Union[str, os.PathLike], outtype: str = "f16",
                     name: Optional[str] = None) -> GgufReport:
    """Write a plain (unquantized, adapter-free) Hugging Face causal LM and its tokenizer as a GGUF
    model file, replacing ``path`` atomically."""
    check_outtype(outtype)
    config = model.config
    arch = arch_for(config)
    names = tensor_names(config, arch)
    path = Path(path)
    writer = gguf.GGUFWriter(path=None, arch=arch.name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or path.stem)
    add_hyperparameters(writer, config, arch)
    writer.add_file_type(OUTTYPES[outtype][1])
    encoder = _Encoder(outtype)
    tied = _tied_head(model)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if not value.is_floating_point():
                raise ValueError(f"{key} is {value.dtype}: write a dequantized model (quantized layers have no "
                                 "GGUF counterpart here)")
            target = gguf_name(names, key)
            if tied and target == "output.weight":
                continue  # llama.cpp reuses token_embd when the file has no output tensor
            heads = rotary_heads(config, arch, key.rpartition(".")[0])
            data, qtype = encoder.encode(target, permute_rows(value, heads) if heads else value)
            writer.add_tensor(target, data, raw_dtype=qtype)
        for target, value in rope_tensors(config, arch).items():
            writer.add_tensor(target, value.numpy(), raw_dtype=Q.F32)
    add_tokenizer(writer, tokenizer, config)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write(writer, path)
    return encoder.report(path, "model")


def write_lora_gguf(adapter_dir: Union[str, os.PathLike], model_config, path: Union[str, os.PathLike],
                    outtype: str = "f16", name: Optional[str] = None) -> GgufReport:
    """Write the plain LoRA adapter in ``adapter_dir`` (PEFT format) as a GGUF LoRA adapter for a
    base whose config is ``model_config``, replacing ``path`` atomically."""
    from .gguf_lora import lora_gguf_tensors

    check_outtype(outtype, "adapter")
    arch = arch_for(model_config)
    alpha, tensors = lora_gguf_tensors(adapter_dir, model_config, arch)
    path = Path(path)
    writer = gguf.GGUFWriter(path=None, arch=arch.name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name or Path(adapter_dir).resolve().name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    encoder = _Encoder(outtype)
    for target, value in tensors.items():
        data, qtype = encoder.encode(target, value)
        writer.add_tensor(target, data, raw_dtype=qtype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write(writer, path)
    return encoder.report(path, "adapter")


def _write(writer: gguf.GGUFWriter, path: Path) -> None:
    def write(tmp: str) -> None:
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, write)


def export_gguf(adapter_dir: Union[str, os.PathLike, None], path: Union[str, os.PathLike], *, kind: str = "merged",
                base: Union[str, os.PathLike, None] = None, quantize: Optional[str] = None,
                outtype: str = "f16") -> GgufReport:
    """Write a GGUF file of ``kind``: ``"merged"`` (the adapter folded into its base), ``"adapter"``
    (a GGUF LoRA adapter, for ``llama-cli -m base.gguf --lora adapter.gguf`` or Ollama's
    ``ADAPTER``) or ``"base"`` (the base alone, the file such an adapter is applied to).

    ``base``: a model folder or .gguf file (None: the embedded default). ``quantize``: the 4-bit or
    8-bit type the base had in training (QLoRA): the merged or base model is then written from the
    dequantized weights the adapter was trained against.
    """
    from ..loading import model_source

    if kind not in KINDS:
        raise ValueError(f"--gguf-kind {kind!r} is not one of {', '.join(KINDS)}")
    check_outtype(outtype, kind)
    if kind != "base":
        if not adapter_dir:
            raise ValueError(f"--adapter FOLDER is required for a GGUF {kind} file")
        if not Path(adapter_dir).is_dir():
            raise FileNotFoundError(f"--adapter {adapter_dir} is not a folder")
    folder, gguf_file = model_source(base)
    title = Path(gguf_file).stem if gguf_file else Path(folder).name
    if kind == "adapter":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {}))
        return write_lora_gguf(adapter_dir, config, path, outtype)
    model, tokenizer = _load_plain(base, quantize, adapter_dir if kind == "merged" else None)
    if kind == "merged":
        title = f"{title}-{Path(adapter_dir).resolve().name}"
    return write_model_gguf(model, tokenizer, path, outtype, name=title)


def _load_plain(base, quantize: Optional[str], adapter_dir) -> tuple[nn.Module, object]:
    """The base in float32 with the adapter in ``adapter_dir`` (if any) merged in, as a plain model."""
    from ..adapter_ops import merge, unload
    from ..io import load_adapter
    from ..loading import load_model
    from ..quant.convert import check_quant_type, dequantize_model

    check_quant_type(quantize or "")
    model, tokenizer = load_model(base, dtype=torch.float32, quantize=quantize or None)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir, name="default")
        merge(model, tokenizer=tokenizer)
        model = unload(model, merge=True)
    dequantize_model(model, torch.float32)
    return model, tokenizer
