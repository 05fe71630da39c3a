"""OFT, BOFT and HRA beyond the method matrix: the maps are orthogonal where the method says so,
several adapters merge to what they compute unmerged, training-time block dropout and COFT's norm
bound act, and bad sizes fail early naming the field or the layer."""

import copy

import pytest
import torch

import deltatune as dt
from deltatune.adapters.orthogonal.boft import BOFTLinear, butterfly_permutation
from deltatune.adapters.orthogonal.hra import HRALinear
from deltatune.adapters.orthogonal.maps import cayley_neumann, skew_from_upper
from deltatune.adapters.orthogonal.oft import OFTLinear, nearest_divisor
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model


def _layers(model, cls):
    return [m for m in model.modules() if isinstance(m, cls)]


@pytest.mark.parametrize("make, cls", [
    (lambda: dt.OFTConfig(oft_block_size=8, use_cayley_neumann=False, target_modules=["q_proj", "down_proj"]),
     OFTLinear),
    (lambda: dt.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=3, target_modules=["q_proj", "down_proj"]),
     BOFTLinear),
    (lambda: dt.HRAConfig(r=5, init_weights=False, target_modules=["q_proj", "down_proj"]), HRALinear),
    (lambda: dt.HRAConfig(r=4, apply_GS=True, init_weights=False, target_modules=["q_proj", "down_proj"]), HRALinear),
])
def test_exact_maps_are_orthogonal(make, cls):
    model = dt.add_adapter(tiny_model("llama"), make())
    randomize_adapter(model)
    for layer in _layers(model, cls):
        m = layer.input_matrix("default").double()
        torch.testing.assert_close(m @ m.T, torch.eye(m.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)


def test_neumann_series_approximates_the_cayley_map():
    skew = skew_from_upper(torch.randn(3, 6) * 0.02, 4)
    eye = torch.eye(4).expand(3, 4, 4)
    exact = torch.linalg.solve(eye - skew, eye + skew, left=False)  # the map the series expands
    torch.testing.assert_close(cayley_neumann(skew, 8), exact, atol=1e-6, rtol=0)
    assert torch.equal(cayley_neumann(torch.zeros(2, 4, 4), 5), torch.eye(4).expand(2, 4, 4))


def test_new_hra_adapter_is_the_identity_up_to_rounding():
    base, ids = tiny_model("llama"), sample_ids()
    model = dt.add_adapter(copy.deepcopy(base), dt.HRAConfig(r=8, target_modules="all-linear"))
    torch.testing.assert_close(eval_logits(model, ids), eval_logits(base, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [
    lambda: dt.OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    lambda: dt.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "v_proj", "up_proj"]),
    lambda: dt.HRAConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]),
])
def test_several_adapters_merge_to_what_they_compute(make):
    """Maps do not commute: merging "a" then "b" must equal the unmerged forward with both active."""
    base, ids = tiny_model("llama"), sample_ids()
    model = copy.deepcopy(base)
    dt.add_adapter(model, make(), "a")
    dt.add_adapter(model, make(), "b")
    randomize_adapter(model)
    dt.set_adapter(model, ["a", "b"])
    both = eval_logits(model, ids)
    dt.set_adapter(model, "a")
    assert (both - eval_logits(model, ids)).abs().max() > 1e-3
    dt.set_adapter(model, ["a", "b"])
    dt.merge(model, verbose=False)
    torch.testing.assert_close(eval_logits(model, ids), both, atol=1e-5, rtol=1e-5)
    dt.unmerge(model)
    assert torch.equal(eval_logits(model, ids), both)


def test_oft_module_dropout_sets_blocks_to_the_identity_in_training_only():
    base, ids = tiny_model("llama"), sample_ids()
    model = dt.add_adapter(copy.deepcopy(base), dt.OFTConfig(oft_block_size=4, module_dropout=0.5,
                                                             target_modules=["q_proj"]))
    randomize_adapter(model)
    layer = _layers(model, OFTLinear)[0]
    x = torch.randn(2, 32)
    layer.eval()
    full = layer(x)
    torch.manual_seed(0)
    layer.train()
    dropped = layer(x)
    assert (dropped - full).abs().max() > 1e-4
    # exactly half of the 8 blocks are the identity in a training map, a different half each time
    maps = [layer.map_input("default", torch.eye(32), training=True) for _ in range(3)]
    identities = [[torch.equal(m[i * 4:(i + 1) * 4, i * 4:(i + 1) * 4], torch.eye(4)) for i in range(8)] for m in maps]
    assert all(sum(row) == 4 for row in identities)
    assert len({tuple(row) for row in identities}) > 1
    layer.eval()
    assert torch.equal(layer(x), full)


def test_coft_keeps_each_block_within_its_norm_bound():
    eps = 1e-3
    model = dt.add_adapter(tiny_model("llama"), dt.OFTConfig(oft_block_size=8, coft=True, eps=eps,
                                                             target_modules=["q_proj"]))
    randomize_adapter(model)
    eval_logits(model, sample_ids())
    for layer in _layers(model, OFTLinear):
        skew = skew_from_upper(layer.oft_R["default"].detach(), 8)
        norms = torch.linalg.matrix_norm(skew)
        assert (norms <= eps / len(norms) ** 0.5 * (1 + 1e-5)).all()


def test_boft_butterfly_permutation_interleaves_chunks():
    # one group of 8 features in chunks of 2: chunks 0, 2 first, then 1, 3
    assert butterfly_permutation(8, 1, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    # two groups of 4 in chunks of 2: within each group the order stays
    assert butterfly_permutation(8, 2, 2).tolist() == list(range(8))


def test_oft_sizes_that_do_not_divide_move_to_the_nearest_divisor():
    assert nearest_divisor(32, 12) == 8 and nearest_divisor(64, 14) == 16 and nearest_divisor(32, 40) == 32
    with pytest.warns(UserWarning, match="oft_block_size=12 does not divide"):
        model = dt.add_adapter(tiny_model("llama"), dt.OFTConfig(oft_block_size=12, target_modules=["q_proj"]))
    assert _layers(model, OFTLinear)[0].oft_R["default"].shape == (4, 28)


def test_bad_sizes_fail_early_naming_the_field_or_layer():
    with pytest.raises(ValueError, match="OFTConfig: set exactly one of r"):
        dt.OFTConfig(r=8)  # oft_block_size defaults to 32 (PEFT's rule: give one, set the other to 0)
    with pytest.raises(ValueError, match="OFTConfig.module_dropout"):
        dt.OFTConfig(module_dropout=1.5)
    with pytest.raises(ValueError, match="BOFTConfig.bias must be"):
        dt.BOFTConfig(bias="lora_only")
    with pytest.raises(ValueError, match="HRAConfig.r must be a positive integer"):
        dt.HRAConfig(r=0)
    with pytest.raises(ValueError, match="q_proj.*boft_block_size=5 must divide"):
        dt.add_adapter(tiny_model("llama"), dt.BOFTConfig(boft_block_size=5, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="must be a multiple of 2"):
        dt.add_adapter(tiny_model("llama"), dt.BOFTConfig(boft_block_size=0, boft_block_num=2,
                                                          boft_n_butterfly_factor=3, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="needs at least 2\\^"):  # refused before 2**(10**12) is formed
        dt.add_adapter(tiny_model("llama"), dt.BOFTConfig(boft_n_butterfly_factor=10 ** 12, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="blocks of size 1, which have no parameters"):
        dt.add_adapter(tiny_model("llama"), dt.OFTConfig(r=32, oft_block_size=0, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="r=40 reflections exceed the input width 32"):
        dt.add_adapter(tiny_model("llama"), dt.HRAConfig(r=40, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="r=3 is odd"):
        dt.add_adapter(tiny_model("llama"), dt.HRAConfig(r=3, target_modules=["q_proj"]))


def test_trained_biases_are_saved_and_restored(tmp_path):
    base, ids = tiny_model("qwen2"), sample_ids()
    model = dt.add_adapter(copy.deepcopy(base), dt.HRAConfig(r=2, bias="hra_only", target_modules=["q_proj"]))
    assert any(n.endswith("q_proj.base_layer.bias") and p.requires_grad for n, p in model.named_parameters())
    randomize_adapter(model)
    dt.save_adapter(model, tmp_path)
    reloaded = dt.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(eval_logits(reloaded, ids), eval_logits(model, ids))
