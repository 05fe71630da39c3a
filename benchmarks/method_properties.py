"""What each `--method` can do, measured rather than declared: the docs' method table.

For every method `deltatune train --method NAME` knows (`train/methods.py`), on CPU:
- trainable parameters on the embedded default model with the method's recipe settings;
- merging on a tiny random model: the worst |logit difference| merged against unmerged, and
  whether `unmerge` restores the logits bit for bit (or the refusal, in the method's words);
- per-row routing: rows of one batch routed to two adapters and the base give what each gives
  alone (or the refusal);
- an NF4 base: the adapter on a 4-bit base equals it on the same weights dequantized (or the
  refusal);
- PEFT parity: the worst |logit difference| of the method's cases in
  `benchmarks/parity-cpu.json` (written by `benchmarks/parity.py`).

The tiny-model configs are the method matrix's (`tests/unit/test_method_matrix.py`), so this
table and the invariant tests check the same adapters.

    python benchmarks/method_properties.py          # writes benchmarks/method-properties-cpu.json
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "unit")]

import deltatune as dt  # noqa: E402
from deltatune.train.config import TrainConfig  # noqa: E402
from deltatune.train.methods import RECIPES, adapter_config  # noqa: E402
from test_method_matrix import METHODS as MATRIX  # noqa: E402
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model  # noqa: E402

# recipe name -> the method matrix's entry, where the names differ
# (the matrix spells the others with "-" for "_")
MATRIX_NAME = {"bottleneck": "bottleneck-houlsby", "pfeiffer": "bottleneck-pfeiffer-gpt2", "top_layers": "top-layer"}
# recipe name -> the prefixes of its cases in parity-cpu.json
PARITY_PREFIXES = {
    "lora": ("lora-", "qlora-", "rslora-", "conv1d-", "embedding-", "layers-to-transform-", "modules-to-save-"),
    "dora": ("dora-", "qdora-"), "prompt_tuning": ("prompt-tuning-",), "prefix_tuning": ("prefix-",),
    "p_tuning": ("p-tuning-",), "adaption_prompt": ("adaption-prompt-",), "ln_tuning": ("ln-",),
    "trainable_tokens": ("tokens-",), "road": ("road1-", "road2-", "road4-"), "xlora": ("xlora ",),
    "poly": ("poly-", "mhr-"), "multitask_prompt_tuning": ("mpt-",), "supertuning": ("super-", "supra-"),
}
# settings a recipe cannot supply by itself (what the user must give on the command line)
REQUIRED_OPTIONS: dict[str, dict] = {"trainable_tokens": {"token_indices": [0, 1, 2]}}
SCRATCH = Path(tempfile.mkdtemp(prefix="method-properties-"))


def lora_experts(model, folder: Path) -> dict[str, str]:
    """Two random LoRA adapters of ``model`` saved under ``folder``: the experts X-LoRA mixes."""
    paths = {}
    for i in range(2):
        expert = copy.deepcopy(model)
        dt.add_adapter(expert, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), name="expert")
        randomize_adapter(expert, seed=10 + i)
        paths[str(i)] = str(dt.save_adapter(expert, folder / str(i), name="expert"))
    return paths


def tiny_xlora_entry() -> tuple:
    """X-LoRA's tiny-model entry (the method matrix has none: its adapters need expert folders)."""
    paths = lora_experts(tiny_model("llama"), SCRATCH / "tiny")
    return "llama", lambda: dt.XLoraConfig(adapters=paths), True


def _refusal(err: Exception) -> str:
    """The refusal's reason, short: the clause after the last colon of its first sentence."""
    first = str(err).splitlines()[0].split(";")[0]
    reason = first.rsplit(": ", 1)[-1][:90]
    if reason.count("(") > reason.count(")"):  # an aside cut short: drop it
        reason = reason[:reason.rindex("(")].rstrip()
    return f"no: {reason}"


def trainable_on_default(name: str, model, examples: list) -> int | str:
    """The adapter's trainable parameters on ``model`` with the recipe's settings (and settings made
    from the default job's training ``examples``, as CPT's context), or why not."""
    cfg = TrainConfig(method=name, adapter=REQUIRED_OPTIONS.get(name, {}))
    try:
        adapter = adapter_config(cfg, "CAUSAL_LM", total_steps=100, examples=examples)
        dt.add_adapter(model, adapter, name="probe")
    except Exception as err:  # a method that needs more than a recipe (X-LoRA's adapter paths)
        return _refusal(err)
    count = dt.trainable_parameters(model)[0]
    dt.delete_adapter(model, "probe")
    return count


def merge_check(arch: str, make) -> str:
    base, ids = tiny_model(arch), sample_ids()
    model = copy.deepcopy(base)
    dt.add_adapter(model, make())
    randomize_adapter(model)
    before = eval_logits(model, ids)
    try:
        dt.merge(model, verbose=False)
    except Exception as err:
        return _refusal(err)
    diff = (eval_logits(model, ids) - before).abs().max().item()
    dt.unmerge(model)
    exact = torch.equal(eval_logits(model, ids), before)
    return f"yes ({diff:.0e}; unmerge {'exact' if exact else 'NOT exact'})"


def routing_check(arch: str, make) -> str:
    base, ids = tiny_model(arch), sample_ids()
    model = copy.deepcopy(base)
    try:
        dt.add_adapter(model, make(), "a")
        dt.add_adapter(model, make(), "b")
    except Exception as err:
        return _refusal(err)
    randomize_adapter(model)
    alone = {}
    for name in ("a", "b"):
        dt.set_adapter(model, name)
        alone[name] = eval_logits(model, ids)
    try:
        with dt.adapter_per_row(model, ["b", None, "a"]):
            routed = eval_logits(model, ids)
    except Exception as err:  # maybe one adapter of the method among base rows still routes
        return _refusal(err) + one_adapter_routing(model, base, ids, alone["a"])
    worst = max((routed[0] - alone["b"][0]).abs().max().item(), (routed[1] - eval_logits(base, ids)[1]).abs().max().item(),
                (routed[2] - alone["a"][2]).abs().max().item())
    return f"yes ({worst:.0e})" if worst < 1e-4 else f"WRONG ({worst:.0e})"


def one_adapter_routing(model, base, ids, alone) -> str:
    """Rows of one adapter beside base rows: ``"; with base rows: yes (…)"`` or nothing."""
    try:
        with dt.adapter_per_row(model, ["a", None, "a"]):
            routed = eval_logits(model, ids)
    except Exception:
        return ""
    worst = max((routed[0] - alone[0]).abs().max().item(), (routed[1] - eval_logits(base, ids)[1]).abs().max().item())
    return f"; one beside base rows: yes ({worst:.0e})" if worst < 1e-4 else f"; one beside base rows: WRONG ({worst:.0e})"


def nf4_check(arch: str, make) -> str:
    from deltatune.quant import QuantizeConfig, dequantize_model, quantize_model

    quantized = quantize_model(tiny_model(arch), QuantizeConfig(quant_type="nf4"))
    reference = dequantize_model(copy.deepcopy(quantized))
    ids = sample_ids()
    try:
        for m in (quantized, reference):
            torch.manual_seed(0)
            dt.add_adapter(m, make())
            randomize_adapter(m)
        diff = (eval_logits(quantized, ids) - eval_logits(reference, ids)).abs().max().item()
    except Exception as err:
        return _refusal(err)
    return f"yes ({diff:.0e})" if diff < 1e-3 else f"WRONG ({diff:.0e})"


def worst_parity(name: str, parity: dict[str, float]) -> float | None:
    prefixes = PARITY_PREFIXES.get(name, (name + "-",))
    found = [diff for case, diff in parity.items() if case.startswith(prefixes)]
    return max(found) if found else None


def main() -> int:
    parity_file = HERE / "parity-cpu.json"
    parity = json.loads(parity_file.read_text()) if parity_file.exists() else {}
    default, tokenizer = dt.load_model()
    from deltatune.data import DataConfig, prepare_data
    from deltatune.train.loop import DEFAULT_DATA

    examples = prepare_data(DataConfig(path=str(DEFAULT_DATA / "train.jsonl"),
                                       validation_path=str(DEFAULT_DATA / "validation.jsonl")), tokenizer).train
    REQUIRED_OPTIONS["xlora"] = {"adapters": lora_experts(default, SCRATCH / "default")}
    extra_entries = {"xlora": tiny_xlora_entry()}
    rows = []
    for name, recipe in RECIPES.items():
        entry = MATRIX.get(MATRIX_NAME.get(name, name.replace("_", "-"))) or extra_entries.get(name)
        row = {"method": name, "peft_type": recipe.peft_type, "config": dt.config.CONFIG_REGISTRY[recipe.peft_type].__name__,
               "trainable_default_model": trainable_on_default(name, default, examples), "parity_worst": worst_parity(name, parity)}
        if entry is None:
            row.update(merge="not measured", routing="not measured", nf4="not measured")
        else:
            arch, make, _ = entry
            row.update(merge=merge_check(arch, make), routing=routing_check(arch, make), nf4=nf4_check(arch, make))
        print(row, flush=True)
        rows.append(row)
    out = HERE / "method-properties-cpu.json"
    out.write_text(json.dumps({"total_parameters_default_model": dt.trainable_parameters(default)[1], "methods": rows},
                              indent=2) + "\n")
    from tables import method_properties_table

    print(method_properties_table(json.loads(out.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
