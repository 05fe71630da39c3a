"""PEFT parity for LoRA's variant fields (layer_replication, aLoRA, QA-LoRA, BD-LoRA, KaSA,
VeLoRA): files loaded both ways give the same logits, the files carry PEFT's keys, shapes and
config fields, one backward step gives PEFT's gradients, merging matches PEFT's merge, and
(aLoRA) generation follows PEFT token for token."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from peft_roundtrip import assert_same_files, assert_same_gradients, load_peft_file
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")

INVOCATION = [5, 6]
# case -> (architecture, LoraConfig fields)
CASES = {
    "replication-llama": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4,
                                        layer_replication=[[0, 2], [1, 2]])),
    "replication-reorder-all-linear-llama": ("llama", dict(target_modules="all-linear", r=2,
                                                          layer_replication=[[1, 2], [0, 2], [0, 1]])),
    "replication-qwen2": ("qwen2", dict(target_modules=["q_proj", "o_proj", "up_proj"], r=4,
                                        layer_replication=[[0, 2], [0, 2]])),
    "replication-bias-all-qwen2": ("qwen2", dict(target_modules=["q_proj"], r=4, bias="all",
                                                 layer_replication=[[0, 2], [1, 2]])),
    "alora-llama": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4,
                                  alora_invocation_tokens=INVOCATION, task_type="CAUSAL_LM")),
    "alora-qwen2": ("qwen2", dict(target_modules="all-linear", r=4, alora_invocation_tokens=[9],
                                  task_type="CAUSAL_LM")),
    "bdlora-llama": ("llama", dict(target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], r=4,
                                   use_bdlora=dict(target_modules_bd_a=["o_proj", "down_proj"],
                                                   target_modules_bd_b=["q_proj", "v_proj", "up_proj"], nblocks=2))),
    "bdlora-loose-qwen2": ("qwen2", dict(target_modules="all-linear", r=4,
                                         use_bdlora=dict(target_modules_bd_a=["down_proj"], nblocks=4,
                                                         match_strict=False))),
    "kasa-llama": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, kasa_config={})),
    "kasa-qwen2": ("qwen2", dict(target_modules="all-linear", r=2, lora_alpha=6,
                                 kasa_config=dict(beta=0.01, gamma=0.1))),
    "velora-llama": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4,
                                   velora_config=dict(num_groups=5, scale=0.7))),
    "velora-once-qwen2": ("qwen2", dict(target_modules="all-linear", r=4,
                                        velora_config=dict(num_groups=4, init_type="batch_average_once"))),
    "monteclora-llama": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4,
                                       monteclora_config=dict(use_entropy=True, buffer_size=2))),
    "monteclora-qwen2": ("qwen2", dict(target_modules="all-linear", r=2, monteclora_config=dict(num_samples=3))),
}
# MonteCLoRA's training forward draws random perturbations (PEFT and deltatune draw differently)
DETERMINISTIC = sorted(c for c, (_, fields) in CASES.items() if "monteclora_config" not in fields)
# PEFT takes its sub-configs as its own classes; deltatune (like PEFT's files) as dicts
_PEFT_SUBCONFIGS = {"use_bdlora": "BdLoraConfig", "kasa_config": "KasaConfig", "velora_config": "VeloraConfig",
                    "monteclora_config": "MontecloraConfig"}


def _peft_fields(fields):
    from peft.tuners.lora import config as lora_config

    return {k: getattr(lora_config, _PEFT_SUBCONFIGS[k])(**v) if k in _PEFT_SUBCONFIGS else v
            for k, v in fields.items()}
ATOL = 1e-5


def _ids(case):
    """Rows that hold the invocation sequence at different places, and one that does not."""
    ids = sample_ids(batch=4, length=9)
    tokens = CASES[case][1].get("alora_invocation_tokens")
    if tokens:
        ids[ids == tokens[0]] = 3  # no accidental occurrences
        ids[0, 2:2 + len(tokens)] = torch.tensor(tokens)
        ids[1, 6:6 + len(tokens)] = torch.tensor(tokens)
        ids[3, 1:1 + len(tokens)] = torch.tensor(tokens)
        ids[3, 4:4 + len(tokens)] = torch.tensor(tokens)  # the last occurrence counts
    return ids


def _fix_peft_layer_types(model):
    """PEFT 0.21 replicates the layers but leaves ``config.layer_types`` at the old length, which
    Qwen2's forward indexes by position; extend it as deltatune does, to compare the math."""
    config = model.config
    types = getattr(config, "layer_types", None)
    if types is not None and len(types) < config.num_hidden_layers:
        config.layer_types = [types[0]] * config.num_hidden_layers  # every tiny layer is full attention


def _peft_model(base, case):
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False,
                                                                     **_peft_fields(CASES[case][1])))
    _fix_peft_layer_types(model)
    return model


def _peft_load(base, path):
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), path)
    _fix_peft_layer_types(model)
    return model.eval()


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits  # by keyword: PEFT's aLoRA reads input_ids from the keywords


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saves_deltatune_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path)
    ids = _ids(case)
    expected = _logits(theirs, ids)
    diff = (_logits(ours, ids) - expected).abs().max().item()
    parity_results[f"lora-fields {case}: PEFT file -> deltatune"] = diff
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_saves_peft_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    ours = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(**CASES[case][1]))
    randomize_adapter(ours, seed=7)
    dt.save_adapter(ours, tmp_path)
    theirs = _peft_load(base, tmp_path)
    ids = _ids(case)
    expected = _logits(ours, ids)
    assert (expected - eval_logits(base, ids)).abs().max() > 1e-2
    diff = (_logits(theirs, ids) - expected).abs().max().item()
    parity_results[f"lora-fields {case}: deltatune file -> PEFT"] = diff
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_have_peft_keys_shapes_and_config_fields(case, tmp_path):
    base = tiny_model(CASES[case][0])
    assert_same_files(_peft_model(base, case), dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(**CASES[case][1])),
                      tmp_path,
                      ("layer_replication", "alora_invocation_tokens", "use_bdlora", "kasa_config", "velora_config",
                       "monteclora_config", "r", "task_type"), unordered_lists=False)


@pytest.mark.parametrize("case", DETERMINISTIC)
def test_gradients_of_one_step_equal_peft(case, tmp_path):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    ours = load_peft_file(base, theirs, tmp_path, trainable=True)
    assert_same_gradients(theirs, ours, _ids(case), atol=1e-6, rtol=1e-4)
    if "velora_config" in CASES[case][1]:  # the vectors refreshed from the batch are PEFT's too
        dt.save_adapter(ours, tmp_path / "ours")
        theirs.save_pretrained(tmp_path / "theirs")
        mine, other = (load_file(tmp_path / p / "adapter_model.safetensors") for p in ("ours", "theirs"))
        vectors = [k for k in other if k.endswith("lora_velora_embed")]
        assert vectors and all(torch.allclose(mine[k], other[k], atol=1e-6) for k in vectors)


@pytest.mark.parametrize("case", ["bdlora-llama", "kasa-llama", "kasa-qwen2", "velora-llama", "monteclora-qwen2"])
def test_merge_round_trip_matches_peft_merge(case, tmp_path):
    base, ids = tiny_model(CASES[case][0]), sample_ids()
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path)
    tuned = _logits(ours, ids)
    dt.merge(ours, verbose=False)
    merged = _logits(ours, ids)
    torch.testing.assert_close(merged, tuned, atol=1e-5, rtol=1e-5)
    dt.unmerge(ours)
    assert torch.equal(_logits(ours, ids), tuned)
    peft_merged = theirs.merge_and_unload()
    assert (_logits(peft_merged, ids) - merged).abs().max() <= ATOL


@pytest.mark.parametrize("case", ["alora-llama", "alora-qwen2"])
def test_alora_rows_without_the_invocation_are_the_base_and_generation_follows_peft(case, tmp_path):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path)
    ids = _ids(case)
    tuned, plain = _logits(ours, ids), _logits(base, ids)
    assert torch.equal(tuned[2], plain[2])  # row 2 holds no invocation sequence
    start = 2  # row 0: the base before the sequence, the adapter from its first token on
    assert torch.equal(tuned[0, :start], plain[0, :start])
    assert (tuned[0, start:] - plain[0, start:]).abs().amax(dim=-1).min() > 1e-4
    theirs.eval()
    settings = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    mine, peft_out = ours.generate(input_ids=ids, **settings), theirs.generate(input_ids=ids, **settings)
    assert mine.sequences.tolist() == peft_out.sequences.tolist()
    worst = max((a - b).abs().max().item() for a, b in zip(mine.scores, peft_out.scores))
    assert worst <= ATOL


def test_replicated_merge_round_trip(tmp_path):
    """Merging a replicated model folds each position into its own copy of the shared weights
    (the other positions keep theirs) and unmerging restores them bit for bit. (PEFT means to
    refuse this merge, but 0.21.2's check looks the field up in the wrong dict.)"""
    base = tiny_model("llama")
    theirs = _peft_model(base, "replication-llama")
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path)
    ids = _ids("replication-llama")
    tuned = _logits(ours, ids)
    dt.merge(ours, verbose=False)
    torch.testing.assert_close(_logits(ours, ids), tuned, atol=1e-5, rtol=1e-5)
    dt.unmerge(ours)
    assert torch.equal(_logits(ours, ids), tuned)
    assert torch.equal(_logits(ours, ids), _logits(theirs, ids))
    merged = dt.unload(copy.deepcopy(ours), merge=True, verbose=False)  # the deeper model, plain
    assert len(merged.model.layers) == 3 and merged.config.num_hidden_layers == 3
    torch.testing.assert_close(_logits(merged, ids), tuned, atol=1e-5, rtol=1e-5)


# ----- QA-LoRA -------------------------------------------------------------------------------
# PEFT 0.21.2 runs QA-LoRA on GPTQ layers only (gptq.py picks QALoraLinearVariant); no GPTQ base
# exists here, so the PEFT side is its plain LoRA layers given PEFT's own QA-LoRA variant, exactly
# as its GPTQ layer attaches it (test-only: deltatune never imports peft).
QALORA = {
    "qalora-llama": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, use_qalora=True,
                                   qalora_group_size=8)),
    "qalora-qwen2": ("qwen2", dict(target_modules="all-linear", r=2, lora_alpha=4, use_qalora=True,
                                   qalora_group_size=16)),
}


def _peft_qalora(base, case):
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.lora.variants import QALoraLinearVariant

    config = peft.LoraConfig(init_lora_weights=False, **QALORA[case][1])
    model = peft.get_peft_model(copy.deepcopy(base), config)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            QALoraLinearVariant.init(module, "default", config)
            module.lora_variant["default"] = QALoraLinearVariant()
    return model


@pytest.mark.parametrize("case", sorted(QALORA))
def test_qalora_files_both_ways_and_gradients(case, tmp_path, parity_results):
    base, ids = tiny_model(QALORA[case][0]), sample_ids()
    theirs = _peft_qalora(base, case)
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path / "theirs", trainable=True)
    expected = _logits(theirs, ids)
    assert (expected - eval_logits(base, ids)).abs().max() > 1e-2
    diff = (_logits(ours, ids) - expected).abs().max().item()
    parity_results[f"lora-fields {case}: PEFT file -> deltatune"] = diff
    assert diff <= ATOL
    for model in (theirs, ours):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    their_grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                   for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {n.replace(".default", ""): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(our_grads) == set(their_grads)
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], atol=1e-6, rtol=1e-4, msg=name)

    mine = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(**QALORA[case][1]))
    randomize_adapter(mine, seed=7)
    dt.save_adapter(mine, tmp_path / "ours")
    their_file = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    our_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: (tuple(v.shape), v.dtype) for k, v in our_file.items()} == {
        k: (tuple(v.shape), v.dtype) for k, v in their_file.items()}
    their_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    our_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(our_cfg) == set(their_cfg)
    assert (our_cfg["use_qalora"], our_cfg["qalora_group_size"]) == (True, QALORA[case][1]["qalora_group_size"])
    loaded = _peft_qalora(base, case)
    result = peft.set_peft_model_state_dict(loaded, our_file)
    assert not result.unexpected_keys
    expected = _logits(mine, ids)
    diff = (_logits(loaded, ids) - expected).abs().max().item()
    parity_results[f"lora-fields {case}: deltatune file -> PEFT"] = diff
    assert diff <= ATOL


def test_qalora_merge_round_trip_and_peft_files_of_plain_layers(tmp_path):
    base, ids = tiny_model("llama"), sample_ids()
    theirs = _peft_qalora(base, "qalora-llama")
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path / "pooled")
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path / "pooled")
    tuned = _logits(ours, ids)
    dt.merge(ours, verbose=False)  # PEFT cannot merge QA-LoRA (GPTQ); the pooled update is linear
    torch.testing.assert_close(_logits(ours, ids), tuned, atol=1e-5, rtol=1e-5)
    dt.unmerge(ours)
    assert torch.equal(_logits(ours, ids), tuned)
    # on a non-GPTQ layer PEFT 0.21.2 ignores use_qalora (full-size A): deltatune loads the plain LoRA it ran
    plain = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False,
                                                                     **QALORA["qalora-llama"][1]))
    randomize_adapter(plain)
    plain.save_pretrained(tmp_path / "full")
    with pytest.warns(UserWarning, match="PEFT ran plain LoRA there"):
        again = dt.load_adapter(copy.deepcopy(base), tmp_path / "full")
    assert (_logits(again, ids) - _logits(plain, ids)).abs().max() <= ATOL


@pytest.mark.parametrize("case", ["monteclora-llama", "monteclora-qwen2"])
def test_monteclora_state_and_variational_loss_equal_peft(case, tmp_path):
    """After a training draw in PEFT, its file carries the sampler's state; deltatune loads it
    to the same evaluation logits and the same variational loss, and a training forward of
    deltatune's mixes perturbed copies of A (the output moves by about sample_scaler)."""
    from deltatune.adapter_ops import get_state
    from deltatune.adapters.method import method_for

    base, ids = tiny_model(CASES[case][0]), sample_ids()
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    theirs.train()
    with torch.no_grad():
        theirs(input_ids=ids)  # a draw: the sampler's last draw is part of the file
        expected_loss = theirs.base_model._get_monteclora_loss()
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path, trainable=True)
    assert (_logits(ours, ids) - _logits(theirs, ids)).abs().max() <= ATOL
    ours.train()
    config = get_state(ours).configs["default"]
    penalty = method_for(config).loss_penalty(ours, "default", config)
    torch.testing.assert_close(penalty.detach(), expected_loss, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        drawn = ours(input_ids=ids).logits
    moved = (drawn - _logits(ours, ids)).abs().max().item()
    assert 0 < moved < 1e-1
    ours.train()
    loss = ours(input_ids=ids, labels=ids).loss + method_for(config).loss_penalty(ours, "default", config)
    loss.backward()
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)


# ----- Arrow ---------------------------------------------------------------------------------
@pytest.mark.parametrize("gks", [False, True], ids=["arrow", "arrow-gks"])
def test_arrow_router_both_ways(gks, tmp_path, parity_results):
    """PEFT's create_arrow_model over three task adapters (and a general one for GKS) against
    deltatune's router over the same adapters loaded under PEFT's names, from PEFT's router file
    and made by deltatune. (PEFT 0.21.2 cannot load any router file, its own included: its
    ArrowConfig drops the saved task_adapter_names, which it declares init=False.)"""
    from peft.tuners.lora.arrow import create_arrow_model
    from peft.tuners.lora.config import ArrowConfig

    base, ids = tiny_model("llama"), sample_ids()
    fields = dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4)
    paths = []
    for i in range(4):
        expert = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **fields))
        randomize_adapter(expert, seed=10 + i)
        expert.save_pretrained(tmp_path / f"expert{i}")
        paths.append(str(tmp_path / f"expert{i}"))
    settings = dict(top_k=2, rng_seed=3, router_temperature=0.5, use_gks=gks)
    theirs = create_arrow_model(copy.deepcopy(base), paths[:3], ArrowConfig(**settings),
                                general_adapter_paths=paths[3:] if gks else None)
    expected = _logits(theirs, ids)
    theirs.save_pretrained(tmp_path / "theirs", selected_adapters=["arrow_router"])

    def library(model):
        for i, path in enumerate(paths[:3]):
            dt.load_adapter(model, path, name=f"task_{i}")
        if gks:
            dt.load_adapter(model, paths[3], name="gks_0")
        return model

    ours = library(copy.deepcopy(base))
    dt.load_adapter(ours, tmp_path / "theirs" / "arrow_router", name="arrow_router")
    dt.set_adapter(ours, "arrow_router")
    assert (expected - eval_logits(base, ids)).abs().max() > 1e-2
    diff = (_logits(ours, ids) - expected).abs().max().item()
    parity_results[f"lora-fields arrow{'-gks' if gks else ''}-llama: PEFT file -> deltatune"] = diff
    assert diff <= ATOL
    with pytest.raises(ValueError, match="cannot be merged.*Arrow router"):
        dt.merge(ours, verbose=False)

    mine = library(copy.deepcopy(base))
    dt.add_adapter(mine, dt.LoraConfig(**fields, arrow_config=dict(
        settings, task_adapter_names=["task_0", "task_1", "task_2"], gks_adapter_names=["gks_0"] if gks else [])),
        name="arrow_router")
    dt.set_adapter(mine, "arrow_router")
    dt.save_adapter(mine, tmp_path / "ours", name="arrow_router")
    their_file = load_file(tmp_path / "theirs" / "arrow_router" / "adapter_model.safetensors")
    our_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in our_file.items()} == {k: tuple(v.shape) for k, v in their_file.items()}
    their_cfg = json.loads((tmp_path / "theirs" / "arrow_router" / "adapter_config.json").read_text())
    our_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(our_cfg) == set(their_cfg) and our_cfg["arrow_config"] == their_cfg["arrow_config"]
    diff = (_logits(mine, ids) - expected).abs().max().item()
    parity_results[f"lora-fields arrow{'-gks' if gks else ''}-llama: deltatune router vs PEFT's"] = diff
    assert diff <= ATOL
    reloaded = library(copy.deepcopy(base))
    dt.load_adapter(reloaded, tmp_path / "ours", name="arrow_router")
    dt.set_adapter(reloaded, "arrow_router")
    assert torch.equal(_logits(reloaded, ids), _logits(mine, ids))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name="task_0")
    with pytest.raises(AttributeError):  # see the docstring: PEFT's own limitation
        loaded.load_adapter(tmp_path / "theirs" / "arrow_router", adapter_name="arrow_router")
