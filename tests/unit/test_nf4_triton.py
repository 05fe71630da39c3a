"""The Triton 4-bit kernels against the PyTorch reference in ``quant.blockwise``.

Without a GPU they run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
on small shapes; ``tests/gpu/test_cuda_quant.py`` runs them compiled.
"""

import pytest
import torch

from deltatune.quant.blockwise import dequantize_4bit, quantize_4bit

pytest.importorskip("triton")
nf4_triton = pytest.importorskip("deltatune.kernels.nf4_triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _quantized(shape, quant_type, blocksize, nested, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    weight = torch.randn(*shape, dtype=dtype, device=DEVICE) * 0.1
    return quantize_4bit(weight, quant_type, blocksize, nested)


# odd element counts (a half-used last byte, a last block that is not whole) and blocks that
# straddle rows (in_features not a multiple of the block size) included
@pytest.mark.parametrize("shape", [(8, 64), (5, 7), (33, 96), (3, 4096 + 70)])
@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_dequantize_is_the_reference_bit_for_bit(shape, quant_type, nested, blocksize):
    packed, state = _quantized(shape, quant_type, blocksize, nested)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(nf4_triton.dequantize(packed, state, dtype), dequantize_4bit(packed, state, dtype))


@pytest.mark.parametrize("shape", [(48, 64), (40, 70), (17, 33)])
@pytest.mark.parametrize("quant_type,nested,blocksize", [("nf4", True, 64), ("fp4", False, 32), ("nf4", True, 128)])
def test_matmuls_match_a_matmul_of_the_reference_weight(shape, quant_type, nested, blocksize):
    packed, state = _quantized(shape, quant_type, blocksize, nested)
    weight = dequantize_4bit(packed, state, torch.float64)
    out_features, in_features = shape
    torch.manual_seed(1)
    x = torch.randn(2, 9, in_features, device=DEVICE)
    g = torch.randn(2, 9, out_features, device=DEVICE)
    y = nf4_triton.matmul_t(x, packed, state)
    dx = nf4_triton.matmul(g, packed, state)
    assert y.shape == (2, 9, out_features) and dx.shape == (2, 9, in_features)
    # float32 products summed in another order than the float64 check: a few float32 ulps of the sums
    assert torch.allclose(y.double(), x.double() @ weight.T, rtol=1e-5, atol=1e-5)
    assert torch.allclose(dx.double(), g.double() @ weight, rtol=1e-5, atol=1e-5)


def test_matmul_in_bfloat16_stays_within_bfloat16_rounding():
    packed, state = _quantized((64, 96), "nf4", 64, True, dtype=torch.bfloat16)
    torch.manual_seed(2)
    x = torch.randn(20, 96, device=DEVICE, dtype=torch.bfloat16)
    reference = x.float() @ dequantize_4bit(packed, state, torch.bfloat16).float().T
    got = nf4_triton.matmul_t(x, packed, state).float()
    # inputs and weight are the same bf16 values; only the output's rounding to bf16 differs
    assert torch.allclose(got, reference, rtol=2 ** -7, atol=1e-3)


def test_a_wrong_input_width_is_refused():
    packed, state = _quantized((8, 64), "nf4", 64, True)
    with pytest.raises(ValueError, match="64"):
        nf4_triton.matmul_t(torch.randn(3, 63, device=DEVICE), packed, state)


@pytest.mark.parametrize("path,rows", [("fused", 40), ("dequantize", 40), ("", 8), ("", 200)])
def test_gpu_layer_function_gives_the_reference_output_and_gradient(path, rows, monkeypatch):
    # the autograd function 4-bit layers use on a GPU, run here on the interpreted kernels
    from deltatune.kernels import four_bit
    from deltatune.quant import Linear4bit

    monkeypatch.setattr(four_bit, "_gpu", lambda packed: nf4_triton)  # as if the weight were on a GPU
    monkeypatch.setenv("DELTATUNE_4BIT_KERNELS", path)
    torch.manual_seed(4)
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 48).to(DEVICE))
    x = torch.randn(rows, 64, device=DEVICE, requires_grad=True)
    g = torch.randn(rows, 48, device=DEVICE)
    y = layer.matmul(x)
    (grad,) = torch.autograd.grad(y, x, g)
    weight = dequantize_4bit(layer.weight, layer.quant_state)
    assert torch.allclose(y, x @ weight.T, rtol=1e-5, atol=1e-5)
    assert torch.allclose(grad, g @ weight, rtol=1e-5, atol=1e-5)
    assert four_bit.fused_path(rows) == (path == "fused" or (path == "" and rows <= four_bit.FUSED_MAX_ROWS))
