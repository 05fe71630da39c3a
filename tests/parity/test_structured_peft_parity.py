"""PEFT parity for the structured methods (FourierFT, SHiRA, MiSS, C3A): files loaded both ways
give the same logits, the files carry PEFT's keys, shapes, dtypes and config fields (and the
seeded values PEFT stores, such as SHiRA's mask), one backward step gives PEFT's gradients, and
deltatune's merged model gives PEFT's merged logits."""

import copy

import pytest
import torch

import deltatune as dt
from peft_roundtrip import (assert_same_files, assert_same_gradients, deltatune_file_to_peft, load_peft_file,
                            merged_vs_peft_merged, peft_file_to_deltatune)
from tiny_models import randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")

# case -> (architecture, config class name (the same in PEFT and deltatune), fields given on both sides)
CASES = {
    "fourierft-llama": ("llama", "FourierFTConfig", dict(target_modules=["q_proj", "v_proj", "down_proj"],
                                                         n_frequency=40, scaling=10.0)),
    "fourierft-pattern-qwen2": ("qwen2", "FourierFTConfig", dict(target_modules="all-linear", n_frequency=30,
                                                                 scaling=8.0, random_loc_seed=5,
                                                                 n_frequency_pattern={"k_proj": 12})),
    "fourierft-gpt2": ("gpt2", "FourierFTConfig", dict(target_modules=["c_attn", "mlp.c_proj"], n_frequency=50,
                                                       scaling=10.0, fan_in_fan_out=True)),
    "fourierft-bias-qwen2": ("qwen2", "FourierFTConfig", dict(target_modules=["q_proj", "v_proj"], n_frequency=30,
                                                              scaling=10.0, bias="fourier_only")),
    "miss-bias-all-qwen2": ("qwen2", "MissConfig", dict(target_modules=["k_proj", "up_proj"], r=4, bias="all")),
    # PEFT's SHiRA and MiSS wrap nn.Linear only (not GPT-2's Conv1D): Llama and Qwen2
    "shira-llama": ("llama", "ShiraConfig", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=2,
                                                 init_weights=False)),
    "shira-seeded-qwen2": ("qwen2", "ShiraConfig", dict(target_modules="all-linear", r=3, random_seed=42,
                                                        init_weights=False)),
    "miss-llama": ("llama", "MissConfig", dict(target_modules="all-linear", r=8)),
    "miss-uneven-shards-qwen2": ("qwen2", "MissConfig", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=12,
                                                             init_weights=False)),
    "miss-bat-llama": ("llama", "MissConfig", dict(target_modules="all-linear", r=8, init_weights="bat")),
    "miss-mini-qwen2": ("qwen2", "MissConfig", dict(target_modules="all-linear", r=8, mini_r=4,
                                                    init_weights="mini")),
    # PEFT's C3A wraps nn.Linear only as well
    "c3a-llama": ("llama", "C3AConfig", dict(target_modules="all-linear", block_size=8)),
    "c3a-pattern-qwen2": ("qwen2", "C3AConfig", dict(target_modules=["q_proj", "k_proj", "down_proj"], block_size=16,
                                                     block_size_pattern={"down_proj": 4}, init_weights="gaussian")),
    "c3a-last-layer-llama": ("llama", "C3AConfig", dict(target_modules=["layers.1.mlp.down_proj"], block_size=4,
                                                        init_weights="gaussian")),
}
# PEFT's C3A backward (BlockCircularConvolution) returns a wrong gradient for the layer's input (its
# kernel gradient is right; see test_c3a_gradients_are_the_dense_update_s), so a C3A layer with another
# C3A layer before it sends PEFT wrong gradients there: one-step gradients are compared with PEFT only
# where one layer is adapted, and with the dense update's autograd gradients otherwise.
PEFT_GRADIENT_CASES = sorted(c for c in CASES if not c.startswith("c3a-") or c == "c3a-last-layer-llama")
ATOL = 1e-5


def _peft_model(base, case):
    _, cls, kwargs = CASES[case]
    return peft.get_peft_model(copy.deepcopy(base), getattr(peft, cls)(**kwargs))


def _dt_model(base, case):
    _, cls, kwargs = CASES[case]
    model = copy.deepcopy(base)
    dt.add_adapter(model, getattr(dt, cls)(**kwargs))
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saves_deltatune_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    diff = parity_results[f"{case}: PEFT file -> deltatune"] = peft_file_to_deltatune(base, theirs, tmp_path)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_saves_peft_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    ours = _dt_model(base, case)
    randomize_adapter(ours, seed=7)
    diff = parity_results[f"{case}: deltatune file -> PEFT"] = deltatune_file_to_peft(base, ours, tmp_path)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_have_peft_keys_shapes_dtypes_and_config_fields(case, tmp_path):
    base = tiny_model(CASES[case][0])
    ours, theirs = assert_same_files(_peft_model(base, case), _dt_model(base, case), tmp_path, CASES[case][2])
    for key, value in theirs.items():
        if not value.is_floating_point():  # seeded positions PEFT stores (SHiRA's mask): the same values
            assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("case", PEFT_GRADIENT_CASES)
def test_gradients_of_one_step_equal_peft(case, tmp_path):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    ours = load_peft_file(base, theirs, tmp_path, trainable=True)
    assert_same_gradients(theirs, ours, sample_ids(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_model_equals_peft_merged_and_unmerge_restores(case, tmp_path):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    assert merged_vs_peft_merged(base, theirs, tmp_path) <= ATOL


def test_c3a_gradients_are_the_dense_update_s(tmp_path):
    """C3A's FFT forward gives the gradients of the dense block-circulant update (autograd through
    a plain matmul); PEFT's custom backward gets the kernel gradient right and the input's wrong."""
    from peft.tuners.c3a.utils import BlockCircularConvolution

    from deltatune.adapters.linear_base import WeightDeltaLayer
    from deltatune.adapters.structured.c3a import C3ALinear, block_circulant_apply, block_circulant_dense

    base, ids = tiny_model("llama"), sample_ids()
    theirs = _peft_model(base, "c3a-llama")
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path)
    grads = []
    for dense in (False, True):
        ours = dt.load_adapter(copy.deepcopy(base), tmp_path, trainable=True).train()
        if dense:  # every C3A layer applies its dense ΔW with a matmul instead of FFTs
            for layer in ours.modules():
                if isinstance(layer, C3ALinear):
                    layer.apply = WeightDeltaLayer.apply.__get__(layer)
        ours(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in ours.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 7 * 2
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], atol=1e-6, rtol=1e-4, msg=name)

    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(2, 2, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 16, dtype=torch.float64)
    truth = torch.autograd.grad(x @ block_circulant_dense(kernel).T, (x, kernel), upstream)
    mine = torch.autograd.grad(block_circulant_apply(x, kernel), (x, kernel), upstream)
    peft_grads = torch.autograd.grad(BlockCircularConvolution.apply(x, kernel), (x, kernel), upstream)
    torch.testing.assert_close(mine, truth)
    torch.testing.assert_close(peft_grads[1], truth[1])
    assert (peft_grads[0] - truth[0]).abs().max() > 1e-2  # PEFT's input gradient is not the true one
