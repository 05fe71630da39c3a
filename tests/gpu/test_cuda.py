"""The engine on a CUDA device: PEFT parity in float32 and bf16, per-row routing, merge. Skipped without CUDA."""

import copy

import pytest
import torch

import deltatune as dt
from tiny_models import randomize_adapter, sample_ids, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
peft = pytest.importorskip("peft")

DTYPE_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_parity_on_cuda(dtype, use_dora, tmp_path):
    base = tiny_model("llama").to("cuda", dtype)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", use_dora=use_dora, init_lora_weights=False))
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    dt.load_adapter(ours, tmp_path)
    ids = sample_ids().cuda()
    with torch.no_grad():
        diff = (ours(ids).logits.float() - theirs(ids).logits.float()).abs().max().item()
    assert diff <= DTYPE_TOL[dtype]


def test_per_row_routing_and_merge_on_cuda():
    model = tiny_model("qwen2").cuda()
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), name="a")
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False),
                   name="b")
    randomize_adapter(model)
    ids = sample_ids(batch=3).cuda()
    with dt.adapter_per_row(model, ["a", "b", None]), torch.no_grad():
        mixed = model(ids).logits
    dt.set_adapter(model, "b")
    with torch.no_grad():
        only_b = model(ids[1:2]).logits
    torch.testing.assert_close(mixed[1:2], only_b, atol=1e-4, rtol=1e-4)
    dt.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids[1:2]).logits, only_b, atol=1e-4, rtol=1e-4)
    assert model.model.layers[0].self_attn.q_proj._original_weight.device.type == "cpu"  # no GPU copy kept
