"""Byte and value parity of deltatune.quant with bitsandbytes (CPU), and file compatibility
with transformers + bitsandbytes in both directions."""

import pytest
import torch

import deltatune as dt
from deltatune import quant
from tiny_models import sample_ids, saved_tiny_llama_64

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")
transformers = pytest.importorskip("transformers")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (rows, columns): block-aligned rows, rows not aligned to large blocks, an odd count with a
# zero row, a 1-D tensor with a partial last block.
SHAPES = ((96, 128), (513, 64), (33, 7), (4097,))


def _bnb_dequantizes_correctly(shape, blocksize):
    # bitsandbytes' CPU kernel indexes scales per row: right only when a row holds whole
    # blocks (or takes its generic path for odd rows / 1-D tensors). deltatune follows the
    # definition (code[i] * absmax of the flat block), as bitsandbytes' CUDA kernel does.
    return len(shape) == 1 or shape[-1] % 2 == 1 or shape[-1] % blocksize == 0


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 1024, 4096])
def test_4bit_bytes_and_values_match_bitsandbytes(quant_type, double_quant, blocksize):
    g = torch.Generator().manual_seed(blocksize)
    for shape in SHAPES:
        for dtype in DTYPES:
            w = (torch.randn(shape, generator=g) * torch.rand(shape, generator=g)).to(dtype)
            if len(shape) == 2:
                w[0] = 0
            q_ref, s_ref = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                           compress_statistics=double_quant)
            q, s = quant.quantize_4bit(w, quant_type, blocksize, double_quant)
            where = f"{quant_type} bs={blocksize} dq={double_quant} {shape} {dtype}"
            assert torch.equal(q, q_ref), where
            assert torch.equal(s.absmax, s_ref.absmax), where
            assert torch.equal(s.code, s_ref.code), where
            assert (s.shape, s.dtype, s.blocksize) == (s_ref.shape, s_ref.dtype, s_ref.blocksize), where
            if double_quant:
                assert torch.equal(s.nested.absmax, s_ref.state2.absmax), where
                assert torch.equal(s.nested.offset, s_ref.offset), where
                assert torch.equal(s.nested.code, s_ref.state2.code), where
            ours = quant.dequantize_4bit(q, s)
            if _bnb_dequantizes_correctly(shape, blocksize):
                theirs = F.dequantize_4bit(q_ref, s_ref)
                assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), where
            # Whatever the shape, each value is off by at most half the widest code gap times its
            # block's absmax, plus the error of the (double-quantized) scale itself.
            flat = w.float().reshape(-1)
            blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)
            true_max = blocks.abs().amax(1)
            scale_err = (s.block_scales() - true_max).abs()
            gap = (s.code.sort().values.diff().max() / 2).item()
            bound = (true_max * gap + scale_err).repeat_interleave(blocksize)[: flat.numel()]
            tolerance = 1e-2 * true_max.max() if dtype != torch.float32 else 1e-6  # output rounding
            assert ((ours.float().reshape(-1) - flat).abs() <= bound + tolerance).all(), where


def test_codes_match_bitsandbytes():
    assert torch.equal(quant.code_4bit("nf4"), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(quant.code_4bit("fp4"), F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(quant.dynamic_map(True), F.create_dynamic_map(signed=True))
    assert torch.equal(quant.dynamic_map(False), F.create_dynamic_map(signed=False))


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_8bit_blockwise_matches_bitsandbytes(blocksize):
    g = torch.Generator().manual_seed(3)
    for n in (1000, 4096 * 3 + 17, 70000):
        values = torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 3
        q_ref, s_ref = F.quantize_blockwise(values, blocksize=blocksize)
        q, absmax = quant.quantize_blockwise_8bit(values, blocksize)
        assert torch.equal(q, q_ref) and torch.equal(absmax, s_ref.absmax)
        assert torch.equal(quant.dequantize_blockwise_8bit(q, absmax, blocksize=blocksize),
                           F.dequantize_blockwise(q_ref, s_ref))


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_matches_bitsandbytes(dtype):
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(4)).to(dtype)
    w[3] = 0
    CB, SCB, _ = F.int8_vectorwise_quant(w.clone())
    q, row_max = quant.quantize_int8(w)
    assert torch.equal(q, CB) and torch.equal(row_max, SCB)
    assert torch.equal(quant.dequantize_int8(q, row_max), F.int8_vectorwise_dequant(CB, SCB))


def _bnb_model(folder, quant_type, double_quant=True):
    if quant_type == "int8":
        cfg = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                              bnb_4bit_use_double_quant=double_quant,
                                              bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=cfg, device_map="cpu",
                                                              dtype=torch.float32)
    # In eval mode with inputs that need no gradient, bitsandbytes repacks 4-bit weights for a
    # bfloat16 CPU kernel (on CPUs with AVX512-BF16); train mode keeps its float32 reference path.
    return model.train()


@pytest.mark.parametrize("quant_type,double_quant,arch", [
    ("nf4", True, "llama"), ("nf4", False, "llama"), ("fp4", True, "llama"), ("fp4", False, "llama"),
    ("int8", False, "llama"), ("nf4", True, "gpt2"), ("int8", False, "gpt2"),
])
def test_quantized_state_dict_equals_transformers_bitsandbytes(tmp_path, quant_type, double_quant, arch):
    folder = saved_tiny_llama_64(tmp_path / "base", arch=arch)  # gpt2: Conv1D layers, stored (out, in)
    theirs = _bnb_model(folder, quant_type, double_quant).state_dict()
    model, _ = dt.load_model(folder, quantize=quant_type, quant_double=double_quant)
    ours = model.state_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value.cpu()), key


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_4bit_logits_equal_transformers_bitsandbytes(tmp_path, quant_type, arch):
    folder = saved_tiny_llama_64(tmp_path / "base", arch=arch)
    ids = sample_ids()
    theirs = _bnb_model(folder, quant_type)
    model, _ = dt.load_model(folder, quantize=quant_type)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, theirs(ids).logits)


def test_files_cross_load(tmp_path):
    """A folder saved by transformers + bitsandbytes loads here, and ours loads there."""
    folder = saved_tiny_llama_64(tmp_path / "base")
    ids = sample_ids()
    theirs = _bnb_model(folder, "nf4")
    theirs.save_pretrained(tmp_path / "from-bnb")
    ours, _ = dt.load_model(tmp_path / "from-bnb")
    assert ours.deltatune_quantization.quant_type == "nf4"
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
    dt.quant.save_model(ours, tmp_path / "from-deltatune")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "from-deltatune", device_map="cpu").train()
    assert type(again.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours(ids).logits)
