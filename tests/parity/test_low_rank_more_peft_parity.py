"""PEFT parity for RoAd, DeLoRA, RandLoRA and VB-LoRA: files loaded both ways give the same
logits, the files carry PEFT's keys, shapes, dtypes and config fields, merging gives PEFT's
merged model, and one backward step gives PEFT's gradients."""

import copy

import pytest
import torch

import deltatune as dt
from peft_roundtrip import (assert_same_files, assert_same_gradients, deltatune_file_to_peft, load_peft_file,
                            merged_vs_peft_merged, peft_file_to_deltatune, peft_name)
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:Specified to not save basis_A")  # PEFT's RandLoRA warning

# case -> (architecture, config class name (the same in PEFT and deltatune), fields,
#          fields added on both sides to start from a random (non-identity) adapter)
CASES = {
    "road1-llama": ("llama", "RoadConfig", dict(target_modules=["q_proj", "v_proj", "down_proj"], group_size=8),
                    dict(init_weights=False)),
    "road2-qwen2": ("qwen2", "RoadConfig", dict(target_modules=["q_proj", "k_proj", "up_proj"], variant="road_2",
                                                group_size=4), dict(init_weights=False)),
    "road4-llama": ("llama", "RoadConfig", dict(target_modules="all-linear", variant="road_4", group_size=16),
                    dict(init_weights=False)),
    "delora-llama": ("llama", "DeloraConfig", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4),
                     dict(init_weights=False)),
    "delora-qwen2-patterns-bias": ("qwen2", "DeloraConfig", dict(target_modules="all-linear", r=4, delora_lambda=5,
                                                                 rank_pattern={"k_proj": 2},
                                                                 lambda_pattern={"o_proj": 3}, bias="delora_only"),
                                   dict(init_weights=False)),
    "randlora-llama": ("llama", "RandLoraConfig", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4,
                                                       randlora_alpha=8), dict(init_weights=False)),
    "randlora-no-projection-qwen2": ("qwen2", "RandLoraConfig", dict(target_modules=["q_proj", "v_proj", "up_proj"],
                                                                     r=6, randlora_alpha=12, save_projection=False,
                                                                     projection_prng_key=7, bias="randlora_only"),
                                     dict(init_weights=False)),
    "randlora-sparse-gpt2": ("gpt2", "RandLoraConfig", dict(target_modules=["c_attn", "c_fc"], r=8, sparse=True,
                                                            randlora_alpha=16, fan_in_fan_out=True),
                             dict(init_weights=False)),
    "randlora-very-sparse-llama": ("llama", "RandLoraConfig", dict(target_modules=["k_proj", "o_proj"], r=4,
                                                                   very_sparse=True, save_projection=False,
                                                                   randlora_alpha=4), dict(init_weights=False)),
    "vblora-llama": ("llama", "VBLoRAConfig", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4,
                                                   num_vectors=16, vector_length=8), {}),
    "vblora-topk-qwen2": ("qwen2", "VBLoRAConfig", dict(target_modules="all-linear", r=2, num_vectors=300,
                                                        vector_length=16, topk=3, save_only_topk_weights=True,
                                                        bias="vblora_only"), {}),
    "vblora-gpt2": ("gpt2", "VBLoRAConfig", dict(target_modules=["c_attn", "c_fc"], r=4, num_vectors=32,
                                                 vector_length=16, fan_in_fan_out=True), {}),
}
ATOL = 1e-5


def _peft_model(base, case):
    _, cls, kwargs, extra = CASES[case]
    return peft.get_peft_model(copy.deepcopy(base), getattr(peft, cls)(**kwargs, **extra))


def _dt_model(base, case):
    _, cls, kwargs, extra = CASES[case]
    model = copy.deepcopy(base)
    dt.add_adapter(model, getattr(dt, cls)(**kwargs, **extra))
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
    # frozen tensors drawn from a seed (RandLoRA's bases) are PEFT's values, not just its shapes
    for key in [k for k in theirs if k.endswith(("randlora_A", "randlora_B"))]:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_model_equals_peft_merged_and_unmerge_is_exact(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    diff = parity_results[f"{case}: merged, deltatune vs PEFT"] = merged_vs_peft_merged(base, theirs, tmp_path)
    assert diff <= ATOL


def _shared_name(name):
    """A tensor shared by all layers (VB-LoRA's bank) is listed once, under whichever module holds it."""
    return "vblora_vector_bank" if name.endswith("vblora_vector_bank") else name


# a VB-LoRA file of top-k weights only cannot be trained further (both tools refuse; tested below)
TRAINABLE_CASES = sorted(c for c in CASES if not CASES[c][2].get("save_only_topk_weights"))


@pytest.mark.parametrize("case", TRAINABLE_CASES)
def test_gradients_of_one_step_equal_peft(case, tmp_path):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    ours = load_peft_file(base, theirs, tmp_path, trainable=True)
    assert_same_gradients(theirs, ours, sample_ids(), atol=1e-6, rtol=1e-4,
                          their_name=lambda n: _shared_name(peft_name(n)),
                          our_name=lambda n: _shared_name(n.replace(".default", "")))


def test_vblora_topk_file_is_refused_for_training_as_in_peft(tmp_path):
    base = tiny_model("qwen2")
    theirs = _peft_model(base, "vblora-topk-qwen2")
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path, trainable=True)
    ids = sample_ids()
    ours.train()
    with pytest.raises(RuntimeError, match="save_only_topk_weights"):
        ours(input_ids=ids, labels=ids)
    expected = eval_logits(ours, ids)  # inference works
    assert torch.isfinite(expected).all()
    dt.save_adapter(ours, tmp_path / "again")  # top-k weights again, from the rebuilt logits
    again = dt.load_adapter(copy.deepcopy(base), tmp_path / "again")
    torch.testing.assert_close(eval_logits(again, ids), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("make, message", [
    (lambda: dt.RoadConfig(variant="road_3"), "RoadConfig.variant"),
    (lambda: dt.RoadConfig(group_size=5), "RoadConfig.group_size must be even"),
    (lambda: dt.DeloraConfig(r=0), "DeloraConfig.r"),
    (lambda: dt.DeloraConfig(bias="lora_only"), "DeloraConfig.bias"),
    (lambda: dt.RandLoraConfig(randlora_dropout=1.5), "RandLoraConfig.randlora_dropout"),
    (lambda: dt.VBLoRAConfig(topk=5, num_vectors=4), "VBLoRAConfig.topk"),
])
def test_bad_settings_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("config, message", [
    (lambda: dt.RoadConfig(group_size=64, target_modules=["v_proj"]), "group_size=64 does not divide the 16 outputs"),
    (lambda: dt.VBLoRAConfig(vector_length=64, target_modules=["q_proj"]), "vector_length=64 must divide"),
])
def test_sizes_that_do_not_fit_a_layer_name_it(config, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        dt.add_adapter(model, config())
    # all or nothing: no adapter layer and no shared bank is left behind
    assert not any(hasattr(m, "base_layer") or n.startswith("deltatune") for n, m in model.named_modules())
