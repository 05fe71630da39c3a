"""``deltatune export --adapter DIR --rank B``: a DyLoRA adapter's first B components, written
as the plain LoRA adapter of rank B it holds, in PEFT's format (PEFT, vLLM and SGLang load it).
Only the adapter's files are read: no base model is needed."""

from __future__ import annotations

from pathlib import Path

from ..adapters.low_rank.dylora import check_rank, cut_to_rank
from ..io import read_adapter_config, read_weights, weights_file, write_adapter_files


def export_rank(adapter_dir: str, out_dir: str, rank: int) -> Path:
    """Write the DyLoRA adapter in ``adapter_dir`` cut to ``rank`` as a PEFT LoRA adapter in
    ``out_dir``; returns the folder."""
    folder = Path(adapter_dir)
    config = read_adapter_config(folder)
    check_rank(config, rank, what=f"--rank (adapter {folder})")
    if Path(out_dir).resolve() == folder.resolve():
        raise ValueError(f"--out {out_dir} is the adapter's own folder; write the cut adapter elsewhere")
    lora, tensors = cut_to_rank(config, read_weights(weights_file(folder)), rank)
    return write_adapter_files(out_dir, lora, tensors)
