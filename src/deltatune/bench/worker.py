"""One measurement of ``deltatune bench``, in its own process: ``python -m deltatune.bench.worker
SPEC_JSON OUT_JSON``. It builds the model, attaches the adapter with one tool, runs warm-up
steps, times ``steps`` training steps (forward, backward, AdamW) and writes what it measured.

Tools: ``deltatune`` (its adapter layers and its training loss, as ``deltatune train`` runs
them), ``peft`` (HF PEFT's ``get_peft_model`` and the model's own loss, as a plain loop runs
them), ``full`` (no adapter: every weight trained, the model's own loss).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from ..allocator import allocator_in_use
from .cases import Case, load_base, quantized_folder, sft_batch
from .moe import expert_notes, lora_targets


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_mib() -> float:
    """Resident memory now (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def _reset_peak_rss() -> bool:
    """Start a new resident-memory peak (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib(reset: bool) -> float:
    """The peak since ``_reset_peak_rss`` when it worked, else since the process started."""
    if reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _mib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def quantized(tool: str, model: torch.nn.Module, spec: dict, case: Case) -> torch.nn.Module:
    """``model`` with its linear layers in 4 bits, as ``tool`` stores them (the head stays dense)."""
    dtype = getattr(torch, spec["dtype"])
    if tool == "deltatune":
        from ..quant.convert import QuantizeConfig, quantize_model

        return quantize_model(model, QuantizeConfig(case.quantize, 64, True, dtype))
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    settings = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=case.quantize,
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    with tempfile.TemporaryDirectory() as scratch:
        folder = quantized_folder(spec["shape"], model, scratch)
        del model
        theirs = AutoModelForCausalLM.from_pretrained(folder, quantization_config=settings, dtype=dtype,
                                                      device_map=spec["device"], attn_implementation="sdpa")
    if case.recipe:
        import peft

        theirs = peft.prepare_model_for_kbit_training(
            theirs, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    return theirs


def _weights_mib(model: torch.nn.Module) -> float:
    """Parameters and buffers, plus the packed weights and scales deltatune's quantized layers keep
    as plain attributes (bitsandbytes keeps its packed bytes as parameters)."""
    from ..quant.layers import QuantLinear

    stored = sum(m.storage_bytes() for m in model.modules() if isinstance(m, QuantLinear)) / 2**20
    return _mib(model.parameters()) + _mib(model.buffers()) + stored


def attach(tool: str, model: torch.nn.Module, case: Case, r: int, alpha: int):
    """Make ``model`` trainable as ``tool`` does; returns ``loss_fn(batch) -> loss``."""
    for p in model.parameters():
        p.requires_grad_(tool == "full")
    if case.checkpointing and not (case.recipe and tool == "peft"):  # the recipe turns it on itself
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    settings = dict(r=r, lora_alpha=alpha, target_modules="all-linear", lora_dropout=case.dropout,
                    bias=case.bias, use_dora=case.method == "dora")
    if case.experts:
        settings.update(lora_targets())
    if tool == "full":
        return lambda batch: model(**batch, use_cache=False).loss
    if tool == "peft":
        import peft

        wrapped = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **settings),
                                      autocast_adapter_dtype=False)
        return lambda batch: wrapped(**batch, use_cache=False).loss
    import deltatune as dt
    from ..loss import TrainingLoss

    dt.add_adapter(model, dt.LoraConfig(task_type="CAUSAL_LM", **settings))
    return TrainingLoss(model)


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """Multiply-adds x 2 of one grouped GEMM: each output element sums over the inner dimension
    ``a_shape[-1]``, except where both inputs are 2-D (the weight gradient, one (K, N) result per
    group), where the groups split that inner dimension between them."""
    per_group = out_shape[1:] if len(a_shape) == 2 and len(b_shape) == 2 else out_shape
    count = 1
    for size in per_group:
        count *= size
    return 2 * count * a_shape[-1]


def _extra_flop_formulas() -> dict:
    """FLOP formulas PyTorch's counter lacks: the grouped GEMM (both tools' MoE experts run on it)
    would otherwise count as no work, and TFLOP/s would leave the experts out."""
    op = getattr(torch.ops.aten, "_grouped_mm", None)
    return {op: _grouped_mm_flops} if op is not None else {}


def measure(spec: dict) -> dict:
    device, tool = spec["device"], spec["tool"]
    case = Case(**spec["case"])
    dtype = getattr(torch, spec["dtype"])
    torch.manual_seed(spec["seed"])
    model = load_base(spec["shape"], dtype, device, spec["seed"])
    if case.quantize:
        model = quantized(tool, model, spec, case)
    model.train()
    batch = sft_batch(spec["batch"], spec["seq_len"], model.config.vocab_size, spec["labels"], device)
    torch.manual_seed(spec["seed"])
    loss_fn = attach(tool, model, case, spec["r"], spec["alpha"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    from ..train.optimizers import make_optimizer

    optimizer = make_optimizer(trainable, spec.get("optimizer", "adamw"), lr=1e-5, weight_decay=0.01)

    precision = spec.get("precision", "fp32")

    def step() -> float:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            if case.offload:
                with torch.autograd.graph.save_on_cpu(pin_memory=True):
                    loss = loss_fn(batch)
            else:
                loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    first_loss = step()  # also creates the optimizer state, so the memory below includes it
    for _ in range(spec["warmup"] - 1):
        step()
    _sync(device)
    rss_before = _rss_mib()
    reset = _reset_peak_rss()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _peak_rss_mib(reset)
    flops = None
    if spec.get("count_flops"):
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas()) as counter:
            step()
        flops = counter.get_total_flops()
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    parameters = _weights_mib(model)
    memory = {"parameters_mib": parameters, "gradients_mib": _mib(trainable), "optimizer_mib": _mib(state),
              "peak_mib": peak}
    if device.startswith("cuda"):
        memory["activations_mib"] = peak - parameters - memory["gradients_mib"] - memory["optimizer_mib"]
    else:  # what the timed steps added on top of everything that existed before them
        memory["activations_mib"] = max(0.0, peak - rss_before)
    median = statistics.median(times)
    tokens = spec["batch"] * spec["seq_len"]
    return {"tool": tool, "case": case.name, "allocator": allocator_in_use(), "precision": precision,
            "median_step_s": median,
            "step_seconds": times, "tokens_per_s": tokens / median, "peak_memory_mib": peak, "memory": memory,
            "first_loss": first_loss, "trainable_parameters": sum(p.numel() for p in trainable),
            "flops_per_step": flops, **(expert_notes(tool, model) if case.experts else {})}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(measure(spec), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
