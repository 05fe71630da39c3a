"""The fused LoRA op, the fused cross-entropy and the DoRA norm on a CUDA device, against the
plain PyTorch definitions (the CPU tests in tests/unit hold the same ops to the same
references); and one ``deltatune bench`` case on the GPU. Skipped without CUDA."""

import json

import pytest
import torch
import torch.nn.functional as F

from deltatune.kernels import dora_weight_norm, linear_cross_entropy, lora_linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_lora_linear_on_cuda(dtype, tol):
    g = torch.Generator(device="cuda").manual_seed(0)

    def t(*s, grad=True):
        return torch.randn(*s, generator=g, device="cuda", dtype=dtype).requires_grad_(grad)

    x, weight, bias, A, B = t(4, 64, 256), t(512, 256, grad=False), t(512, grad=False), t(16, 256), t(512, 16)
    fused = lora_linear(x, weight, bias, A, B, None, 2.0, 0.0)
    ref = F.linear(x, weight, bias) + F.linear(F.linear(x, A), B) * 2.0
    torch.testing.assert_close(fused.float(), ref.float(), rtol=tol, atol=tol * 10)
    grad = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(fused, (x, A, B), grad), torch.autograd.grad(ref, (x, A, B), grad)):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * 50)
    # dropout: the kept share of the input is 1 - p, and the op's output is finite
    out = lora_linear(x, weight, bias, A, B, None, 2.0, 0.05)
    assert torch.isfinite(out).all()


def test_cross_entropy_and_dora_norm_on_cuda():
    hidden = torch.randn(300, 64, device="cuda", requires_grad=True)
    weight = torch.randn(5000, 64, device="cuda")
    targets = torch.randint(0, 5000, (300,), device="cuda")
    fused = linear_cross_entropy(hidden, weight, None, targets)
    plain = F.cross_entropy(hidden @ weight.T, targets)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.autograd.grad(fused, hidden)[0], torch.autograd.grad(plain, hidden)[0],
                               rtol=1e-3, atol=1e-5)
    W, A, B = torch.randn(128, 96, device="cuda"), torch.randn(8, 96, device="cuda"), torch.randn(128, 8, device="cuda")
    torch.testing.assert_close(dora_weight_norm(W, A, B, 0.5), torch.linalg.norm(W + 0.5 * B @ A, dim=1),
                               rtol=1e-4, atol=1e-4)


def test_bench_on_cuda(tmp_path):
    pytest.importorskip("peft")
    from deltatune.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--device", "cuda", "--cases", "lora", "--seq-len", "512", "--steps", "3", "--warmup", "2",
                 "--output-dir", str(out)]) == 0
    line = json.loads((out / "bench.json").read_text())["summary"][0]
    assert line["same_first_loss"] and line["deltatune"]["mfu"] > 0


def test_activation_offload_gives_the_same_gradients_on_cuda():
    import deltatune as dt
    from deltatune.loss import TrainingLoss
    from tiny_models import randomize_adapter, sample_ids, tiny_model

    model = tiny_model("llama").cuda()
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapter(model)
    ids = sample_ids().cuda()
    batch = {"input_ids": ids, "labels": ids}
    params = [p for p in model.parameters() if p.requires_grad]
    plain = torch.autograd.grad(TrainingLoss(model)(batch), params)
    with torch.autograd.graph.save_on_cpu(pin_memory=True):
        offloaded = torch.autograd.grad(TrainingLoss(model)(batch), params)
    for a, b in zip(plain, offloaded):
        torch.testing.assert_close(a, b)
