"""PEFT parity for TinyLoRA: the SVD factors and seeded projections are PEFT's values bit for bit,
files loaded both ways give the same logits (with and without projections in the file, with
no, partial and full weight tying), the files carry PEFT's keys, shapes, dtypes and config
fields, one backward step gives PEFT's gradients, and merging matches PEFT's merged model."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from peft_roundtrip import (assert_same_files, assert_same_gradients, deltatune_file_to_peft, load_peft_file,
                            merged_vs_peft_merged, peft_file_to_deltatune)
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore:fan_in_fan_out is set"),  # PEFT's notes on Conv1D / Linear
              pytest.mark.filterwarnings("ignore:Specified to not"),  # PEFT's notes on save_projection=False
              pytest.mark.filterwarnings("ignore:the TinyLoRA file has")]

ATOL = 1e-5

# case -> (architecture, fields given to both tools); v starts at zero (a no-op) and is randomised by the tests
CASES = {
    "tinylora-llama": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=2, u=8)),
    "tinylora-tied-half-no-projection-qwen2": ("qwen2", dict(target_modules="all-linear", r=4, u=6, weight_tying=0.5,
                                                             save_projection=False, projection_seed=7,
                                                             bias="tinylora_only")),
    "tinylora-tied-all-gpt2": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], r=3, u=5, weight_tying=1.0,
                                            fan_in_fan_out=True)),
    "tinylora-no-projection-gpt2": ("gpt2", dict(target_modules=["c_attn", "c_fc"], r=2, u=4, save_projection=False,
                                                 fan_in_fan_out=True, tinylora_dropout=0.1)),
    "tinylora-tied-all-no-projection-llama": ("llama", dict(target_modules=["q_proj", "k_proj", "up_proj"], r=40,
                                                            u=3, weight_tying=1.0, save_projection=False)),  # r capped
    "tinylora-tied-third-qwen2": ("qwen2", dict(target_modules=["q_proj", "o_proj", "gate_proj"], u=4,
                                                weight_tying=0.3)),  # 6 layers, 4 groups: the last takes the rest
}


def _peft_model(base, case):
    return peft.get_peft_model(copy.deepcopy(base), peft.TinyLoraConfig(**CASES[case][1]))


def _dt_model(base, case):
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.TinyLoraConfig(**CASES[case][1]))
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saves_deltatune_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    diff = parity_results[f"{case}: PEFT file -> deltatune"] = peft_file_to_deltatune(base, theirs, tmp_path,
                                                                                      min_change=1e-3)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_saves_peft_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    ours = _dt_model(base, case)
    randomize_adapter(ours, seed=7)
    diff = parity_results[f"{case}: deltatune file -> PEFT"] = deltatune_file_to_peft(base, ours, tmp_path,
                                                                                      min_change=1e-3)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_have_peft_keys_shapes_dtypes_values_and_config_fields(case, tmp_path):
    base = tiny_model(CASES[case][0])
    ours, theirs = assert_same_files(_peft_model(base, case), _dt_model(base, case), tmp_path, CASES[case][1])
    # the SVD factors (signs included) and the seeded projections are PEFT's bits; v starts at zero on both sides
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_model_equals_peft_merged_and_unmerge_is_exact(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    diff = parity_results[f"{case}: merged, deltatune vs PEFT"] = merged_vs_peft_merged(base, theirs, tmp_path)
    assert diff <= ATOL


def _canonical(name):
    """Parameter names without prefix and adapter name; PEFT lists each shared v under its first layer."""
    name = name.removeprefix("base_model.model.").replace(".default", "")
    return name[name.rindex("tinylora_v."):] if "tinylora_v." in name else name


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_of_one_step_equal_peft(case, tmp_path):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    ours = load_peft_file(base, theirs, tmp_path, trainable=True)
    for model in (theirs, ours):  # dropout draws differ between tools; the gradients are compared without it
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    assert_same_gradients(theirs, ours, sample_ids(), atol=1e-5, rtol=1e-4, their_name=_canonical,
                          our_name=_canonical, nonzero=True)


def test_a_file_without_projections_redraws_peft_s(tmp_path):
    """save_projection=true but no tinylora_P in the file: both tools redraw P from the seed."""
    base = tiny_model("llama")
    theirs = _peft_model(base, "tinylora-llama")
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(file).items() if not k.endswith("tinylora_P")}, file)
    with pytest.warns(UserWarning, match="no tinylora_P"):
        ours = dt.load_adapter(copy.deepcopy(base), tmp_path)
    ids = sample_ids()
    assert (eval_logits(ours, ids) - eval_logits(theirs, ids)).abs().max() <= ATOL


def test_uniform_init_draws_peft_s_vectors():
    base = tiny_model("qwen2")
    fields = dict(target_modules=["q_proj", "v_proj", "down_proj"], u=5, weight_tying=0.5, init_weights="uniform")
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.TinyLoraConfig(**fields))
    torch.manual_seed(3)
    ours = dt.add_adapter(copy.deepcopy(base), dt.TinyLoraConfig(**fields))
    ids = sample_ids()
    assert (eval_logits(ours, ids) - eval_logits(theirs, ids)).abs().max() <= ATOL
    assert not torch.equal(eval_logits(ours, ids), eval_logits(base, ids))


def test_starts_as_an_exact_no_op_and_trains_only_v():
    base, ids = tiny_model("llama"), sample_ids()
    model = dt.add_adapter(copy.deepcopy(base), dt.TinyLoraConfig(target_modules="all-linear", u=4, weight_tying=0.5))
    assert torch.equal(eval_logits(model, ids), eval_logits(base, ids))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".tinylora_v.default." in n for n in trainable)
    assert dt.trainable_parameters(model)[0] == 4 * 7  # 14 layers, 7 groups of 4 numbers


@pytest.mark.parametrize("make, message", [
    (lambda: dt.TinyLoraConfig(r=0), "TinyLoraConfig.r"),
    (lambda: dt.TinyLoraConfig(u=0), "TinyLoraConfig.u"),
    (lambda: dt.TinyLoraConfig(weight_tying=1.5), "TinyLoraConfig.weight_tying"),
    (lambda: dt.TinyLoraConfig(projection_seed=-1), "TinyLoraConfig.projection_seed"),
    (lambda: dt.TinyLoraConfig(init_v_bound=0), "TinyLoraConfig.init_v_bound"),
    (lambda: dt.TinyLoraConfig(init_weights="gaussian"), "TinyLoraConfig.init_weights"),
    (lambda: dt.TinyLoraConfig(tinylora_dropout=1.5), "TinyLoraConfig.tinylora_dropout"),
    (lambda: dt.TinyLoraConfig(bias="lora_only"), "TinyLoraConfig.bias"),
    (lambda: dt.TinyLoraConfig(exclude_modules=["q_proj"]), "TinyLoraConfig.exclude_modules"),
])
def test_bad_settings_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_embeddings_are_refused_clearly():
    with pytest.raises(TypeError, match="TinyLoRA cannot wrap a Embedding"):
        dt.add_adapter(tiny_model("llama"), dt.TinyLoraConfig(target_modules=["embed_tokens"]))


def test_a_bfloat16_base_gives_peft_s_float32_tensors_and_logits(tmp_path):
    """PEFT rounds A, B and P to the base's dtype, then upcasts them (and v) to float32: so does deltatune."""
    base = tiny_model("qwen2").to(torch.bfloat16)
    fields = dict(target_modules=["q_proj", "v_proj", "down_proj"], r=2, u=8, weight_tying=0.5)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.TinyLoraConfig(**fields))
    ours, saved = assert_same_files(theirs, dt.add_adapter(copy.deepcopy(base), dt.TinyLoraConfig(**fields)),
                                    tmp_path, fields)
    assert all(v.dtype == torch.float32 and torch.equal(v, saved[k]) for k, v in ours.items())
    randomize_adapter(theirs)
    loaded = load_peft_file(base, theirs, tmp_path / "random")
    ids = sample_ids()
    assert torch.equal(eval_logits(loaded, ids), eval_logits(theirs, ids))


def test_a_second_adapter_numbers_its_own_targets_as_peft_does(tmp_path):
    """Each adapter's seeds and groups count its own targets, some of them already wrapped by the first."""
    base = tiny_model("llama")
    first = dict(target_modules=["q_proj", "v_proj"], u=4)  # PEFT needs one save_projection for all adapters
    second = dict(target_modules=["v_proj", "down_proj"], u=3, weight_tying=0.5, projection_seed=5)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.TinyLoraConfig(**first))
    theirs.add_adapter("b", peft.TinyLoraConfig(**second))
    ours = dt.add_adapter(copy.deepcopy(base), dt.TinyLoraConfig(**first))
    dt.add_adapter(ours, dt.TinyLoraConfig(**second), "b")
    theirs.save_pretrained(tmp_path / "theirs", selected_adapters=["b"])
    dt.save_adapter(ours, tmp_path / "ours", name="b")
    a = load_file(tmp_path / "theirs" / "b" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(k.startswith("base_model.tinylora_v.") for k in a) == 2
