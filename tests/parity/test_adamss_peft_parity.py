"""PEFT parity for AdaMSS: the start (SVD, k-means clusters, factors) is PEFT's bit for bit under
the same torch seed, files loaded both ways give the same logits, the files carry PEFT's keys,
shapes, dtypes and config fields, one backward step gives PEFT's gradients, merging matches PEFT's
merged model with an exact unmerge, and ASA freezes the subspaces PEFT's update_and_allocate
freezes. PEFT's AdaMSS wraps nn.Linear only: no GPT-2 cases. PEFT needs scikit-learn for its
k-means (deltatune does not)."""

import copy

import numpy as np
import pytest
import torch

import deltatune as dt
from deltatune.adapters.low_rank.adamss import AdamssLinear, AdamssMethod
from deltatune.adapters.low_rank.adamss_init import kmeans_labels
from deltatune.adapters.method import METHODS
from peft_roundtrip import (assert_same_files, assert_same_gradients, deltatune_file_to_peft, load_peft_file,
                            merged_vs_peft_merged, peft_file_to_deltatune)
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")
sklearn_cluster = pytest.importorskip("sklearn.cluster")  # PEFT's AdamssConfig refuses to start without it

ATOL = 1e-5

# case -> (architecture, fields given to both tools)
CASES = {
    "adamss-llama": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=8, num_subspaces=3,
                                   subspace_rank=2)),
    "adamss-defaults-qwen2": ("qwen2", dict()),  # PEFT's defaults: r=100 (clamped to the widths), 5 subspaces
    "adamss-dynamic-rank-qwen2": ("qwen2", dict(target_modules="all-linear", r=16, num_subspaces=4, subspace_rank=3,
                                                use_dynamic_rank=True, svd_threshold=0.2, random_seed=3)),
    "adamss-random-start-llama": ("llama", dict(target_modules=["k_proj", "o_proj", "up_proj"], r=12,
                                                num_subspaces=6, init_weights=None, layers_to_transform=[1])),
}


def _peft_model(base, case, seed=0):
    torch.manual_seed(seed)  # PEFT's A start draws from the global generator
    return peft.get_peft_model(copy.deepcopy(base), peft.AdamssConfig(**CASES[case][1]))


def _dt_model(base, case, seed=0):
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    dt.add_adapter(model, dt.AdamssConfig(**CASES[case][1]))
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
def test_start_files_and_clusters_are_peft_s_bit_for_bit(case, tmp_path):
    base = tiny_model(CASES[case][0])
    theirs_model, ours_model = _peft_model(base, case, seed=11), _dt_model(base, case, seed=11)
    ours, theirs = assert_same_files(theirs_model, ours_model, tmp_path, CASES[case][1])
    assert theirs and all(".adamss_" in k for k in theirs)
    for key in theirs:  # A (orthonormal start), B and the frozen Vᵀ
        assert torch.equal(ours[key], theirs[key]), key
    mine = {k: m for k, m in ours_model.named_modules() if isinstance(m, AdamssLinear)}
    layers = [(k, m) for k, m in theirs_model.named_modules() if hasattr(m, "scatter_index")]
    assert layers and len(layers) == len(mine)
    for key, module in layers:
        layer = mine[key.removeprefix("base_model.model.")]
        order = torch.argsort(layer.adamss_rows["default"])  # our row placement, inverted: PEFT's scatter index
        assert torch.equal(order, module.scatter_index["default"]), key


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_model_equals_peft_merged_and_unmerge_is_exact(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    diff = parity_results[f"{case}: merged, deltatune vs PEFT"] = merged_vs_peft_merged(base, theirs, tmp_path)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_of_one_step_equal_peft(case, tmp_path):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    ours = load_peft_file(base, theirs, tmp_path, trainable=True)
    assert_same_gradients(theirs, ours, sample_ids(), atol=1e-5, rtol=1e-4, nonzero=True)


def test_per_row_routing_gives_each_row_its_own_adapter(tmp_path):
    base, ids = tiny_model("qwen2"), sample_ids()
    model = _dt_model(base, "adamss-llama")
    randomize_adapter(model)
    torch.manual_seed(1)
    dt.add_adapter(model, dt.AdamssConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=6,
                                          init_weights=None), name="b")
    randomize_adapter(model, seed=5)
    expected = []
    for row, name in enumerate(["b", None, "default"]):
        if name is None:
            expected.append(eval_logits(base, ids[row:row + 1]))
        else:
            dt.set_adapter(model, name)
            expected.append(eval_logits(model, ids[row:row + 1]))
    with dt.adapter_per_row(model, ["b", None, "default"]):
        routed = eval_logits(model, ids)
    torch.testing.assert_close(routed, torch.cat(expected), atol=1e-5, rtol=0)


def test_a_bfloat16_base_gives_peft_s_dtypes_and_logits(tmp_path):
    base = tiny_model("qwen2").to(torch.bfloat16)
    fields = CASES["adamss-llama"][1]
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdamssConfig(**fields))
    torch.manual_seed(0)
    ours, their_tensors = assert_same_files(theirs, dt.add_adapter(copy.deepcopy(base), dt.AdamssConfig(**fields)),
                                            tmp_path, fields)
    for key, value in their_tensors.items():
        assert torch.equal(ours[key], value), key
    randomize_adapter(theirs)
    loaded = load_peft_file(base, theirs, tmp_path / "random")
    ids = sample_ids()
    assert (eval_logits(loaded, ids).float() - eval_logits(theirs, ids).float()).abs().max() <= 1e-2


def test_adamss_on_an_nf4_base_matches_peft_on_the_dequantized_base(tmp_path, parity_results):
    from deltatune.quant import QuantizeConfig, dequantize_model, quantize_model

    quantized = quantize_model(tiny_model("llama"), QuantizeConfig(quant_type="nf4"))
    reference = dequantize_model(copy.deepcopy(quantized))
    theirs = _peft_model(reference, "adamss-llama")
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(quantized, tmp_path)
    ids = sample_ids()
    diff = (eval_logits(ours, ids) - eval_logits(theirs, ids)).abs().max().item()
    parity_results["adamss-llama-nf4-base: PEFT file (dequantized base) -> deltatune"] = diff
    assert diff <= 1e-4


def test_kmeans_gives_scikit_learn_s_labels():
    """PEFT's clustering call (random start, one run, 10 steps, fixed seed) on matrices shaped like
    singular vectors and on plain random ones, some with more rows than scikit-learn's chunk."""
    for trial in range(60):
        rs = np.random.RandomState(trial)
        n, d = int(rs.choice([6, 32, 64, 300])), int(rs.choice([2, 8, 32]))
        X = rs.randn(n, d).astype(np.float32)
        if trial % 2:
            X = np.linalg.qr(rs.randn(n, min(n, d)))[0].astype(np.float32)
        k = min(n, int(rs.choice([2, 5, 16])))
        expected = sklearn_cluster.KMeans(n_clusters=k, init="random", n_init=1, max_iter=10,
                                          random_state=123456789).fit_predict(X)
        assert np.array_equal(kmeans_labels(X, k), expected), trial


def _asa_pair(base, tmp_path):
    fields = dict(target_modules=["q_proj", "v_proj", "down_proj"], r=8, num_subspaces=3, subspace_rank=2,
                  use_asa=True, asa_target_subspaces=5, init_warmup=1, final_warmup=7, mask_interval=2,
                  asa_schedule_exponent=2.0)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdamssConfig(**fields))
    randomize_adapter(theirs)
    ours = load_peft_file(base, theirs, tmp_path, trainable=True)
    return theirs, ours


def test_asa_freezes_what_peft_freezes_and_training_stays_equal(tmp_path):
    base, ids = tiny_model("llama"), sample_ids()
    theirs, ours = _asa_pair(base, tmp_path)
    method = METHODS["ADAMSS"]
    assert isinstance(method, AdamssMethod)
    config = dt.read_adapter_config(tmp_path)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (theirs, ours)]
    for step in range(10):
        for model, opt in zip((theirs, ours), opts):
            model.train()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        theirs.base_model.update_and_allocate(step)  # what PEFT's AdamssAsaCallback does after each step
        method.after_step(ours, "default", ours_config(ours), step + 1)  # the training loop's hook
        for opt in opts:
            opt.zero_grad(set_to_none=True)
    frozen_theirs = {(k.removeprefix("base_model.model."), i) for k, m in theirs.named_modules()
                     if hasattr(m, "scatter_index") for i, p in enumerate(m.adamss_A["default"]) if not p.requires_grad}
    frozen_ours = {(k, i) for k, m in ours.named_modules() if isinstance(m, AdamssLinear) for i in m.frozen["default"]}
    assert frozen_theirs == frozen_ours
    total = 2 * 3 * 3
    assert len(frozen_ours) == total - (5 - 1)  # kept: strictly above the 5th best score, as PEFT keeps
    assert config.use_asa
    theirs_params = {n.removeprefix("base_model.model.").replace(".default", ""): p
                     for n, p in theirs.named_parameters() if ".adamss_" in n}
    for n, p in ours.named_parameters():
        if ".adamss_" in n:
            torch.testing.assert_close(p, theirs_params[n.replace(".default", "")], atol=1e-5, rtol=1e-4, msg=n)


def ours_config(model):
    from deltatune.adapter_ops import get_state

    return get_state(model).configs["default"]


def test_asa_state_resumes(tmp_path):
    base, ids = tiny_model("llama"), sample_ids()
    _, ours = _asa_pair(base, tmp_path)
    method, config = METHODS["ADAMSS"], ours_config(ours)
    for step in range(4):
        ours(input_ids=ids, labels=ids).loss.backward()
        method.after_step(ours, "default", config, step + 1)
        ours.zero_grad(set_to_none=True)
    state = method.training_state(ours, "default", config)
    again = dt.load_adapter(copy.deepcopy(base), tmp_path, trainable=True)
    method.load_training_state(again, "default", ours_config(again), state)
    for (k, a), (_, b) in zip(((k, m) for k, m in ours.named_modules() if isinstance(m, AdamssLinear)),
                              ((k, m) for k, m in again.named_modules() if isinstance(m, AdamssLinear))):
        assert a.frozen["default"] == b.frozen["default"], k
    assert any(m.frozen["default"] for m in again.modules() if isinstance(m, AdamssLinear))


def test_starts_as_a_no_op_and_trains_only_the_factors():
    base, ids = tiny_model("llama"), sample_ids()
    model = dt.add_adapter(copy.deepcopy(base), dt.AdamssConfig(target_modules=["q_proj", "v_proj"], r=8,
                                                                num_subspaces=3, subspace_rank=2))
    assert (eval_logits(model, ids) - eval_logits(base, ids)).abs().max() == 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adamss_A.default." in n or ".adamss_B.default." in n for n in trainable)
    # per subspace k: A (r_k × 8) and B (rows_k × r_k), r_k = min(rows_k, 2): PEFT's count
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdamssConfig(target_modules=["q_proj", "v_proj"], r=8,
                                                                        num_subspaces=3, subspace_rank=2))
    count = dt.trainable_parameters(model)[0]
    assert count == theirs.get_nb_trainable_parameters()[0]
    assert 2 * (3 * 8 + 32 + 3 * 8 + 16) <= count <= 2 * ((3 * 16 + 32 * 2) + (3 * 16 + 16 * 2))


def test_a_file_for_another_base_is_refused(tmp_path):
    theirs = _peft_model(tiny_model("llama"), "adamss-llama")
    theirs.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="another base"):
        dt.load_adapter(tiny_model("llama", seed=5), tmp_path)


@pytest.mark.parametrize("make, message", [
    (lambda: dt.AdamssConfig(r=0), "AdamssConfig.r"),
    (lambda: dt.AdamssConfig(num_subspaces=0), "AdamssConfig.num_subspaces"),
    (lambda: dt.AdamssConfig(subspace_rank=1.5), "AdamssConfig.subspace_rank"),
    (lambda: dt.AdamssConfig(init_weights="gaussian"), "AdamssConfig.init_weights"),
    (lambda: dt.AdamssConfig(use_asa=True, init_warmup=10, final_warmup=10), "AdamssConfig.init_warmup"),
    (lambda: dt.AdamssConfig(use_asa=True, mask_interval=0), "AdamssConfig.mask_interval"),
    (lambda: dt.AdamssConfig(use_asa=True, asa_target_subspaces=0), "AdamssConfig.asa_target_subspaces"),
    (lambda: dt.AdamssConfig(use_asa=True, asa_schedule_exponent=0), "AdamssConfig.asa_schedule_exponent"),
    (lambda: dt.AdamssConfig(asa_importance_beta=1.5), "AdamssConfig.asa_importance_beta"),
    (lambda: dt.AdamssConfig(svd_threshold=-1), "AdamssConfig.svd_threshold"),
    (lambda: dt.AdamssConfig(use_dynamic_rank="yes"), "AdamssConfig.use_dynamic_rank"),
    (lambda: dt.AdamssConfig(random_seed="seven"), "AdamssConfig.random_seed"),
])
def test_bad_settings_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_init_weights_false_reads_as_none_as_in_peft():
    assert dt.AdamssConfig(init_weights=False).init_weights is None


def test_gpt2_conv1d_is_refused_as_peft_refuses_it():
    with pytest.raises(TypeError, match="AdaMSS cannot wrap a Conv1D"):
        dt.add_adapter(tiny_model("gpt2"), dt.AdamssConfig(target_modules=["c_attn"], r=4))
    with pytest.raises(TypeError):
        peft.get_peft_model(tiny_model("gpt2"), peft.AdamssConfig(target_modules=["c_attn"], r=4))


def test_the_training_loop_runs_asa_through_the_method_hook(tmp_path, default_tokenizer):
    """``deltatune train`` calls ``after_step`` each step: by PEFT's schedule (steps 1 to 6, a mask
    every 2nd, 6 subspaces kept at the end, i.e. 5 strictly above the 6th score) 11 of the tiny
    model's 16 q/v subspaces end frozen, and the checkpoint's state carries them for a resume."""
    from deltatune.train import load_config, train
    from deltatune.train.checkpoint import STATE
    from tiny_models import tiny_chat_model_dir, word_meaning_data

    model = tiny_chat_model_dir(tmp_path / "model", default_tokenizer)
    data = word_meaning_data(tmp_path / "data.jsonl", 48)
    options = {"r": 16, "num_subspaces": 4, "subspace_rank": 2, "use_asa": True, "asa_target_subspaces": 6,
               "init_warmup": 1, "final_warmup": 6, "mask_interval": 2}
    out = tmp_path / "run"
    train(load_config(None, {"model": str(model), "data.path": str(data), "batch_size": 4, "max_steps": 8,
                             "eval_steps": 4, "seed": 3, "save_steps": 8, "method": "adamss", "adapter": options,
                             "output_dir": str(out)}), log=lambda *_: None)
    state = torch.load(out / "checkpoint-8" / STATE, weights_only=True)["method"]
    frozen = state["frozen"]
    assert len(frozen) == 4 and sum(len(v) for v in frozen.values()) == 16 - 5
