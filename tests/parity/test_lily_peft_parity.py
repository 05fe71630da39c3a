"""PEFT parity for Lily: files loaded both ways give the same logits, the files carry PEFT's keys
(shared tensors repeated under every layer), shapes, dtypes and config fields, layers share
PEFT's modules (A per ``stride_A`` adjacent layers of a target suffix, B per suffix), one seed
gives PEFT's start, one backward step gives PEFT's gradients, and what PEFT refuses (GPT-2's
Conv1D, ``num_B`` < 2) and what the batch-averaged router rules out (merging, per-row routing)
are refused with the reason."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from peft_roundtrip import (assert_same_files, assert_same_gradients, deltatune_file_to_peft, load_peft_file,
                            peft_file_to_deltatune)
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")

ATOL = 1e-5

# case -> (architecture, LilyConfig fields, the same on both sides; init_weights=False starts B random)
CASES = {
    "lily-llama-stride1-numB2": ("llama", dict(r=4, stride_A=1, num_B=2, target_modules=["q_proj", "v_proj"])),
    "lily-llama-stride2-numB3": ("llama", dict(r=4, stride_A=2, num_B=3, scaling=0.5,
                                               target_modules=["q_proj", "v_proj", "down_proj"])),
    # None: the architecture's default targets (q, v), as PEFT resolves them
    "lily-llama-default-targets-stride2": ("llama", dict(r=3, stride_A=2, num_B=4)),
    # a regular expression groups every layer of one weight shape together (q and o here), in module order
    "lily-qwen2-regex-stride3-numB2": ("qwen2", dict(r=4, stride_A=3, num_B=2,
                                                     target_modules=r".*\.(q_proj|o_proj|k_proj)")),
    # all-linear resolves to full module names: each name is its own group, as in PEFT
    "lily-qwen2-all-linear-stride2-numB4": ("qwen2", dict(r=2, stride_A=2, num_B=4, scaling=2.0,
                                                          target_modules="all-linear")),
    "lily-qwen2-stride2-numB2-layer1": ("qwen2", dict(r=4, stride_A=2, num_B=2, target_modules=["k_proj", "up_proj"],
                                                      layers_to_transform=[1])),
}


def _peft_model(base, case, **extra):
    return peft.get_peft_model(copy.deepcopy(base), peft.LilyConfig(**CASES[case][1], init_weights=False, **extra))


def _dt_model(base, case, **extra):
    return dt.add_adapter(copy.deepcopy(base), dt.LilyConfig(**CASES[case][1], init_weights=False, **extra))


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
    fields = ["r", "stride_A", "num_B", "scaling", "init_weights", "target_modules", "layers_to_transform"]
    ours, theirs = assert_same_files(_peft_model(base, case), _dt_model(base, case), tmp_path, fields)
    assert all(".lily_" in k for k in ours)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_seed_same_start_and_same_sharing_as_peft(case):
    base, ids = tiny_model(CASES[case][0]), sample_ids()
    torch.manual_seed(3)
    theirs = _peft_model(base, case)
    torch.manual_seed(3)
    ours = _dt_model(base, case)
    torch.testing.assert_close(eval_logits(ours, ids), eval_logits(theirs, ids), atol=0, rtol=0)
    # the same tensors are shared: parameter names (each shared tensor under its first user) match
    their_names = {n.removeprefix("base_model.model.").replace(".default", "")
                   for n, p in theirs.named_parameters() if p.requires_grad}
    our_names = {n.replace(".default", "") for n, p in ours.named_parameters() if p.requires_grad}
    assert our_names == their_names
    assert dt.trainable_parameters(ours)[0] == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


GRADIENT_CASES = ["lily-llama-stride2-numB3", "lily-qwen2-regex-stride3-numB2", "lily-llama-stride1-numB2"]


@pytest.mark.parametrize("case", GRADIENT_CASES)
def test_gradients_of_one_step_equal_peft(case, tmp_path):
    base, ids = tiny_model(CASES[case][0]), sample_ids()
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    ours = load_peft_file(base, theirs, tmp_path, trainable=True)
    assert_same_gradients(theirs, ours, ids, atol=1e-6, rtol=1e-4, nonzero=True)


def test_stride_groups_adjacent_layers_per_suffix():
    model = dt.add_adapter(tiny_model("llama"), dt.LilyConfig(r=4, stride_A=2, num_B=2,
                                                              target_modules=["q_proj", "v_proj"]))
    layers = model.model.layers
    q0, q1, v0 = layers[0].self_attn.q_proj, layers[1].self_attn.q_proj, layers[0].self_attn.v_proj
    assert q0.lily_A["default"] is q1.lily_A["default"] and q0.lily_B["default"] is q1.lily_B["default"]
    assert q0.lily_router["default"] is not q1.lily_router["default"]  # routers stay per layer
    assert q0.lily_A["default"] is not v0.lily_A["default"]  # suffixes never share
    apart = dt.add_adapter(tiny_model("llama"), dt.LilyConfig(r=4, stride_A=1, target_modules=["q_proj"]))
    q0, q1 = apart.model.layers[0].self_attn.q_proj, apart.model.layers[1].self_attn.q_proj
    assert q0.lily_A["default"] is not q1.lily_A["default"] and q0.lily_B["default"] is q1.lily_B["default"]
    assert q0.lily_B["default"].weight.shape == (2 * 4, 32) and not q0.lily_B["default"].weight.any()  # B = 0


def test_a_file_with_only_the_first_copies_of_shared_tensors_loads(tmp_path):
    base, ids = tiny_model("llama"), sample_ids()
    theirs = _peft_model(base, "lily-llama-stride2-numB3")
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    for kind in ("lily_A", "lily_B"):  # layer 1's copies of layer 0's tensors
        del tensors[f"base_model.model.model.layers.1.self_attn.q_proj.{kind}.weight"]
    save_file(tensors, weights)
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(eval_logits(ours, ids), eval_logits(theirs, ids), atol=ATOL, rtol=0)
    q1 = ours.model.layers[1].self_attn.q_proj
    assert q1.lily_A["default"] is ours.model.layers[0].self_attn.q_proj.lily_A["default"]


def test_the_router_averages_over_the_batch_so_merging_and_routing_are_refused():
    base, ids = tiny_model("llama"), sample_ids()
    model = _dt_model(base, "lily-llama-stride2-numB3")
    randomize_adapter(model)
    alone, together = eval_logits(model, ids[:1]), eval_logits(model, ids)[:1]
    assert (alone - together).abs().max() > 1e-6  # row 0's output depends on the other rows
    with pytest.raises(ValueError, match="cannot be merged.*over the whole batch"):
        dt.merge(model, verbose=False)
    with pytest.raises(NotImplementedError, match="routed per row.*every token of the batch"), \
            dt.adapter_per_row(model, ["default", None, "default"]):
        model(ids)
    with dt.adapter_per_row(model, [None, None, None]):  # rows without Lily are the base model
        torch.testing.assert_close(eval_logits(model, ids), eval_logits(base, ids), atol=0, rtol=0)


def test_what_peft_refuses_is_refused():
    with pytest.raises(TypeError, match="Conv1D"):
        dt.add_adapter(tiny_model("gpt2"), dt.LilyConfig(r=4, target_modules=["c_attn"]))
    with pytest.raises(NotImplementedError):
        peft.get_peft_model(tiny_model("gpt2"), peft.LilyConfig(r=4, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="LilyConfig.num_B must be an integer of at least 2"):
        dt.LilyConfig(num_B=1)
    with pytest.raises(ValueError):
        peft.LilyConfig(num_B=1)
    with pytest.raises(ValueError, match="LilyConfig.stride_A"):
        dt.LilyConfig(stride_A=0)
    with pytest.raises(ValueError, match="LilyConfig.scaling"):
        dt.LilyConfig(scaling=float("nan"))


def test_peft_second_adapter_unshared_loads_unshared(tmp_path, parity_results):
    """PEFT shares Lily's factors only for a model's first adapter; a later one is built (and
    trained, and saved) unshared, with differing copies in its file: it loads unshared."""
    base, ids = tiny_model("llama"), sample_ids()
    theirs = _peft_model(base, "lily-llama-stride2-numB3")
    theirs.add_adapter("other", peft.LilyConfig(r=2, stride_A=1, num_B=2, target_modules=["q_proj"],
                                                init_weights=False))
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path)
    with pytest.warns(UserWarning, match="second and later Lily adapters"):
        dt.load_adapter(ours, tmp_path / "other", name="other")
    q0, q1 = (layer.self_attn.q_proj for layer in ours.model.layers)
    assert q0.lily_B["other"] is not q1.lily_B["other"] and q0.lily_B["default"] is q1.lily_B["default"]
    for name in ("default", "other"):
        theirs.set_adapter(name)
        dt.set_adapter(ours, name)
        diff = (eval_logits(ours, ids) - eval_logits(theirs, ids)).abs().max().item()
        parity_results[f"lily-llama-two-adapters-{name}: PEFT file -> deltatune"] = diff
        assert diff <= ATOL


def test_lily_on_an_nf4_base_matches_peft_on_the_dequantized_base(tmp_path, parity_results):
    from deltatune.quant import QuantizeConfig, dequantize_model, quantize_model

    quantized = quantize_model(tiny_model("llama"), QuantizeConfig(quant_type="nf4"))
    reference = dequantize_model(copy.deepcopy(quantized))
    theirs = _peft_model(reference, "lily-llama-stride2-numB3")
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(quantized, tmp_path)
    ids = sample_ids()
    diff = (eval_logits(ours, ids) - eval_logits(theirs, ids)).abs().max().item()
    parity_results["lily-llama-nf4-base: PEFT file (dequantized base) -> deltatune"] = diff
    assert diff <= 1e-4


def test_the_server_serves_lily_rows_in_batches_of_their_own(tmp_path):
    from deltatune.serve.adapters import describe

    model = _dt_model(tiny_model("llama"), "lily-llama-stride1-numB2")
    entry = describe(dt.save_adapter(model, tmp_path / "lily"), "lily")
    assert entry.method == "LILY" and not entry.routable  # never routed per row beside other adapters' rows
