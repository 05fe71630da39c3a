"""QLoRA/QDoRA parity: the same 4-bit base + the same adapter gives the same logits in deltatune
as in transformers + bitsandbytes + PEFT (CPU, float32 compute), with files going both ways."""

import pytest
import torch

import deltatune as dt
from tiny_models import randomize_adapter, sample_ids, saved_tiny_llama_64

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")


def _bnb_base(folder, quant_type):
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=cfg, device_map="cpu",
                                                             dtype=torch.float32)


def _forward(model, ids):
    # train mode: bitsandbytes keeps its float32 path (see test_bnb_parity); dropout is 0.
    model.train()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("quant_type,arch", [("nf4", "llama"), ("fp4", "llama"), ("nf4", "gpt2")])
@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_logits_match_peft_both_ways(tmp_path, quant_type, arch, use_dora, parity_results):
    folder = saved_tiny_llama_64(tmp_path / "base", arch=arch)
    ids = sample_ids()
    theirs = peft.get_peft_model(_bnb_base(folder, quant_type), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora, init_lora_weights=False))
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    expected = _forward(theirs, ids)

    ours, _ = dt.load_model(folder, quantize=quant_type)
    dt.load_adapter(ours, tmp_path / "peft")
    got = _forward(ours, ids)
    case = f"q{'dora' if use_dora else 'lora'}-{quant_type}-{arch}"
    parity_results[f"{case}: PEFT file -> deltatune"] = (got - expected).abs().max().item()
    tolerance = 1e-5 if use_dora else 0.0  # LoRA: the same float ops, bit for bit
    assert torch.allclose(got, expected, atol=tolerance, rtol=0)

    dt.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_bnb_base(folder, quant_type), tmp_path / "ours")
    again = _forward(back, ids)
    parity_results[f"{case}: deltatune file -> PEFT"] = (again - got).abs().max().item()
    assert torch.allclose(again, got, atol=tolerance, rtol=0)
