"""PEFT parity for the orthogonal family (OFT, BOFT, HRA): files loaded both ways give the same
logits, the files carry PEFT's keys, shapes, dtypes and config fields, and one backward step
gives PEFT's gradients.

PEFT 0.21.2 puts these methods on ``nn.Linear`` (and Conv2d/Embedding) only, not on GPT-2's
``Conv1D``, so the cases cover the tiny Llama and Qwen2 models (deltatune's own GPT-2 support is
checked in tests/unit/test_method_matrix.py).
"""

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.io import adapter_tensors
from peft_roundtrip import (assert_same_files, assert_same_gradients, deltatune_file_to_peft, load_peft_file,
                            peft_file_to_deltatune)
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")

# case -> (architecture, config class name (the same in PEFT and deltatune), fields)
CASES = {
    "oft-llama": ("llama", "OFTConfig", dict(target_modules="all-linear", oft_block_size=8)),
    "oft-qwen2": ("qwen2", "OFTConfig", dict(target_modules="all-linear", oft_block_size=8)),
    "oft-r-exact-cayley-llama": ("llama", "OFTConfig", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4,
                                                            oft_block_size=0, use_cayley_neumann=False)),
    "oft-block-share-qwen2": ("qwen2", "OFTConfig", dict(target_modules=["k_proj", "up_proj"], oft_block_size=4,
                                                         block_share=True, num_cayley_neumann_terms=3)),
    "oft-coft-llama": ("llama", "OFTConfig", dict(target_modules=["q_proj", "o_proj"], oft_block_size=16, coft=True,
                                                  eps=1e-2)),
    "oft-bias-qwen2": ("qwen2", "OFTConfig", dict(target_modules=["q_proj", "v_proj"], oft_block_size=8,
                                                  bias="oft_only")),
    "oft-adjusted-block-llama": ("llama", "OFTConfig", dict(target_modules=["q_proj", "down_proj"],
                                                            oft_block_size=12)),
    "hra-llama": ("llama", "HRAConfig", dict(target_modules="all-linear", r=4)),
    "hra-qwen2": ("qwen2", "HRAConfig", dict(target_modules="all-linear", r=6)),
    "hra-gram-schmidt-llama": ("llama", "HRAConfig", dict(target_modules=["q_proj", "v_proj", "up_proj"], r=4,
                                                          apply_GS=True)),
    "hra-odd-bias-qwen2": ("qwen2", "HRAConfig", dict(target_modules=["q_proj", "k_proj", "down_proj"], r=3,
                                                      bias="hra_only")),
    "boft-llama": ("llama", "BOFTConfig", dict(target_modules="all-linear", boft_block_size=8)),
    "boft-block-num-qwen2": ("qwen2", "BOFTConfig", dict(target_modules="all-linear", boft_block_size=0,
                                                         boft_block_num=4)),
    "boft-butterfly2-llama": ("llama", "BOFTConfig", dict(target_modules=["q_proj", "v_proj", "down_proj"],
                                                          boft_block_size=4, boft_n_butterfly_factor=2)),
    "boft-butterfly3-bias-qwen2": ("qwen2", "BOFTConfig", dict(target_modules=["q_proj", "o_proj", "up_proj"],
                                                               boft_block_size=2, boft_n_butterfly_factor=3,
                                                               bias="boft_only")),
}
ATOL = 1e-5


class _BlockDiagonalStandIn:
    """PEFT's BOFT uses more than one butterfly factor only when its CUDA extension (``fbd_cuda``,
    a block-diagonal assembly and its gradient) compiles; otherwise it silently trains one factor.
    The butterfly cases give PEFT this plain-PyTorch equivalent of the extension, so that PEFT runs
    its real multi-factor code on a CPU."""

    @staticmethod
    def forward(blocks):  # (m, n, b, b) -> [(m, n·b, n·b)]
        return [torch.stack([torch.block_diag(*torch.unbind(factor)) for factor in blocks])]

    @staticmethod
    def backward(grad, blocks):  # the gradient of each block is its diagonal tile
        m, n, b, _ = blocks.shape
        return [torch.stack([torch.stack([grad[i, j * b:(j + 1) * b, j * b:(j + 1) * b] for j in range(n)])
                             for i in range(m)])]


@pytest.fixture(autouse=True)
def _butterfly_extension(request, monkeypatch):
    case = getattr(getattr(request.node, "callspec", None), "params", {}).get("case", "")
    if "butterfly" in case:
        import peft.tuners.boft.layer as boft_layer

        monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: _BlockDiagonalStandIn)


def _peft_model(base, case):
    _, cls, kwargs = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), getattr(peft, cls)(**kwargs, init_weights=False))


def _dt_model(base, case):
    _, cls, kwargs = CASES[case]
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dt.add_adapter(model, getattr(dt, cls)(**kwargs))
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saves_deltatune_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    diff = parity_results[f"{case}: PEFT file -> deltatune"] = peft_file_to_deltatune(base, theirs, tmp_path,
                                                                                      min_change=1e-3, quiet=True)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_saves_peft_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    ours = _dt_model(base, case)
    randomize_adapter(ours, seed=7)
    diff = parity_results[f"{case}: deltatune file -> PEFT"] = deltatune_file_to_peft(base, ours, tmp_path,
                                                                                      min_change=1e-3, quiet=True)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_have_peft_keys_shapes_and_config_fields(case, tmp_path):
    base = tiny_model(CASES[case][0])
    assert_same_files(_peft_model(base, case), _dt_model(base, case), tmp_path, CASES[case][2])


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_of_one_step_equal_peft(case, tmp_path):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    ours = load_peft_file(base, theirs, tmp_path, trainable=True, quiet=True)
    # deltatune's tensors under the names its files give them, PEFT's under its own parameter names
    assert_same_gradients(theirs, ours, sample_ids(), atol=1e-6, rtol=1e-4,
                          their_name=lambda n: n.replace(".default", ""), our_name=lambda n: n,
                          our_tensors=lambda model: adapter_tensors(model, "default"))


def test_boft_file_of_peft_without_its_extension_loads_as_one_factor(tmp_path, parity_results):
    """Without fbd_cuda PEFT trains one butterfly factor whatever the config says and writes boft_R as
    (1, n, b, b); deltatune loads that file as the one-factor adapter it is."""
    base, ids = tiny_model("llama"), sample_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(
            target_modules=["q_proj", "down_proj"], boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False))
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path)
    assert all(v.shape[0] == 1 for k, v in load_file(tmp_path / "adapter_model.safetensors").items() if "boft_R" in k)
    with pytest.warns(UserWarning, match="one butterfly factor"):
        ours = dt.load_adapter(copy.deepcopy(base), tmp_path)
    diff = (eval_logits(ours, ids) - eval_logits(theirs, ids)).abs().max().item()
    parity_results["boft-one-factor-file-llama: PEFT file -> deltatune"] = diff
    assert diff <= ATOL
    dt.save_adapter(ours, tmp_path / "again")  # and writes it back in the same shapes
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert all(v.shape[0] == 1 for k, v in again.items() if "boft_R" in k)


@pytest.mark.parametrize("case", ["oft-llama", "oft-coft-llama", "hra-gram-schmidt-llama", "boft-butterfly2-llama"])
def test_merged_weights_equal_peft_merged(case, tmp_path):
    """Merging folds the same map into the weights as PEFT's merge_and_unload (one adapter)."""
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = dt.load_adapter(copy.deepcopy(base), tmp_path)
        their_merged = theirs.merge_and_unload()
    dt.merge(ours, verbose=False)
    theirs_state = dict(their_merged.named_parameters())
    merged = [(key, layer) for key, layer in ours.named_modules() if getattr(layer, "merged_adapters", None)]
    assert merged
    for key, layer in merged:
        torch.testing.assert_close(layer.base_layer.weight, theirs_state[f"{key}.weight"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cls, kwargs", [("HRAConfig", dict(r=4)), ("BOFTConfig", dict(boft_block_size=8)),
                                         ("OFTConfig", dict(oft_block_size=8))])
def test_two_active_adapters_compose_as_peft_merges_them(cls, kwargs, tmp_path):
    """Maps do not commute, so the order of two active adapters matters. deltatune applies them as
    successive changes of the layer, which is how PEFT merges all three methods and how PEFT's HRA
    and BOFT run unmerged; PEFT's unmerged OFT rotates in the other order (disagreeing with its merge)."""
    base, ids = tiny_model("llama"), sample_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make = lambda: getattr(peft, cls)(target_modules=["q_proj", "down_proj"], init_weights=False, **kwargs)  # noqa: E731
        theirs = peft.get_peft_model(copy.deepcopy(base), make(), adapter_name="a")
        theirs.add_adapter("b", make())
    theirs.base_model.set_adapter(["a", "b"])  # both active and trainable, so both get random values
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path, selected_adapters=["a", "b"])
    ours = copy.deepcopy(base)
    for name in ("a", "b"):
        dt.load_adapter(ours, tmp_path / name, name)
    dt.set_adapter(ours, ["a", "b"])
    expected = eval_logits(theirs, ids)
    if cls == "OFTConfig":
        assert (eval_logits(ours, ids) - expected).abs().max() > 1e-4  # PEFT's unmerged order differs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = eval_logits(theirs.merge_and_unload(), ids)
    torch.testing.assert_close(eval_logits(ours, ids), expected, atol=ATOL, rtol=0)
