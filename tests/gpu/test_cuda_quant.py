"""Quantized bases on CUDA: the reference quantizer on the GPU, bitsandbytes' CUDA kernels, QLoRA
parity with transformers + bitsandbytes + PEFT, paged 8-bit AdamW. Skipped without CUDA."""

import pytest
import torch

import deltatune as dt
from deltatune import quant
from deltatune.train import AdamW8bit
from tiny_models import randomize_adapter, sample_ids, saved_tiny_llama_64

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_reference_quantizer_gives_the_same_bytes_on_cuda(quant_type):
    w = torch.randn(512, 256, generator=torch.Generator().manual_seed(0))
    q_cpu, s_cpu = quant.quantize_4bit(w, quant_type)
    q_gpu, s_gpu = quant.quantize_4bit(w.cuda(), quant_type)
    assert torch.equal(q_gpu.cpu(), q_cpu) and torch.equal(s_gpu.absmax.cpu(), s_cpu.absmax)
    assert torch.equal(quant.dequantize_4bit(q_gpu, s_gpu).cpu(), quant.dequantize_4bit(q_cpu, s_cpu))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_close_to_bitsandbytes_cuda_kernels(quant_type):
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(1)).cuda()
    q_ref, s_ref = F.quantize_4bit(w, quant_type=quant_type, compress_statistics=True)
    q, s = quant.quantize_4bit(w, quant_type)
    # The 4-bit bytes follow the same rule; bitsandbytes' CUDA kernel rounds nested scales to
    # the exact nearest code value where the CPU (and deltatune) use a 65,536-point table.
    assert (q != q_ref).float().mean().item() < 1e-4
    assert (s.absmax != s_ref.absmax).float().mean().item() < 0.02
    # Dequantizing bitsandbytes' own bytes with deltatune gives bitsandbytes' values.
    ours = quant.dequantize_4bit(q_ref, quant.QuantState(
        s_ref.absmax, s_ref.shape, s_ref.dtype, s_ref.blocksize, quant_type, s_ref.code,
        quant.blockwise.NestedState(s_ref.state2.absmax, s_ref.state2.code, 256, s_ref.offset)))
    assert torch.equal(ours, F.dequantize_4bit(q_ref, s_ref))


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_parity_with_peft_on_cuda(tmp_path, use_dora):
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    import transformers

    folder = saved_tiny_llama_64(tmp_path / "base")
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=cfg, device_map="cuda",
                                                             dtype=torch.float32)
    base.save_pretrained(tmp_path / "bnb")  # bitsandbytes' CUDA bytes, read back by deltatune
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora,
                                                       init_lora_weights=False))
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    ours, _ = dt.load_model(tmp_path / "bnb", device="cuda")
    dt.load_adapter(ours, tmp_path / "adapter")
    ids = sample_ids().cuda()
    with torch.no_grad():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    assert diff < 1e-4


def test_paged_adamw8bit_keeps_states_on_the_cpu():
    w = torch.nn.Parameter(torch.randn(128, 64, device="cuda"))
    start = w.detach().norm().item()
    opt = AdamW8bit([w], lr=1e-2, paged=True)
    for _ in range(3):
        (w ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
    state = opt.state[w]
    assert state["q_exp_avg"].device.type == "cpu" and state["q_exp_avg"].is_pinned()
    assert w.device.type == "cuda" and w.detach().norm().item() < start  # minimizing |w|^2 shrinks w


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_dequantize_is_the_reference_bit_for_bit(quant_type, nested, blocksize, dtype):
    from deltatune.kernels import nf4_triton

    for shape in [(2048, 2048 + 96), (37, 131)]:
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).cuda()
        packed, state = quant.quantize_4bit(w, quant_type, blocksize, nested)
        assert torch.equal(nf4_triton.dequantize(packed, state, dtype), quant.dequantize_4bit(packed, state, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path,rows", [("fused", 300), ("dequantize", 300), ("", 7), ("", 1200)])
def test_gpu_layer_matches_the_reference_layer(dtype, path, rows, monkeypatch):
    from deltatune.kernels.four_bit import triton_kernels

    assert triton_kernels() is not None  # Triton runs compiled here
    monkeypatch.setenv("DELTATUNE_4BIT_KERNELS", path)  # empty: chosen by the row count
    torch.manual_seed(3)
    layer = quant.Linear4bit.from_linear(torch.nn.Linear(1024, 768, bias=True).cuda(), compute_dtype=dtype)
    x = torch.randn(1, rows, 1024, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(1, rows, 768, device="cuda", dtype=dtype)
    y = layer(x)
    (grad,) = torch.autograd.grad(y, x, g)
    monkeypatch.setenv("DELTATUNE_4BIT_KERNELS", "torch")  # the PyTorch reference path
    y_ref = layer(x)
    (grad_ref,) = torch.autograd.grad(y_ref, x, g)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    assert torch.allclose(y.float(), y_ref.float(), **tol)
    assert torch.allclose(grad.float(), grad_ref.float(), **tol)
